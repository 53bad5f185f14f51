"""Fixtures of the imaging store tests: a real local S3 server and an app that uses it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from minio import Minio
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from hub import db, outbox
from hub.app import create_app
from hub.settings import Settings

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
# Small enough to test the limit cheaply; the default is checked separately.
TEST_MAX_BINARY_BYTES = 256 * 1024


def free_port() -> int:
    """Return a port nothing listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_port(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Run moto's S3 server on a free port for this test process."""
    port = free_port()
    process = subprocess.Popen(  # noqa: S603 - our own venv's moto_server
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not _wait_port(port, 30):
            raise RuntimeError("moto_server did not start")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="session")
def settings(settings: Settings, s3_endpoint: str) -> Settings:
    """The suite's settings, with object storage on the local S3 server."""
    return settings.model_copy(
        update={"s3_endpoint": s3_endpoint, "max_binary_bytes": TEST_MAX_BINARY_BYTES}
    )


def _app_for(settings: Settings, db_engine: Engine) -> FastAPI:
    application = create_app(settings)
    db.session_factory.configure(bind=db_engine)
    outbox.set_notifier(None)
    return application


@pytest.fixture(scope="session")
def app(settings: Settings, db_engine: Engine) -> FastAPI:
    """The application under test, storing Binary content on the local S3 server."""
    # Overridden here (not only `settings`): the suite-wide `app` is cached per
    # session and may already have been built with the default endpoint.
    return _app_for(settings, db_engine)


@pytest.fixture(scope="session")
def s3_down_app(settings: Settings, db_engine: Engine) -> FastAPI:
    """An application whose object store is a closed port."""
    return _app_for(
        settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{free_port()}"}), db_engine
    )


@pytest.fixture
def s3_down_client(
    s3_down_app: FastAPI, session: Session, auth_headers: Callable[[str], dict[str, str]]
) -> Iterator[TestClient]:
    """An admin's HTTP client of the application whose object store is down."""
    with TestClient(
        s3_down_app, raise_server_exceptions=False, headers=auth_headers("admin")
    ) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def redirect_app(settings: Settings, db_engine: Engine) -> FastAPI:
    """An application that answers downloads with a presigned redirect."""
    return _app_for(settings.model_copy(update={"binary_download_redirect": True}), db_engine)


@pytest.fixture
def redirect_client(
    redirect_app: FastAPI, session: Session, auth_headers: Callable[[str], dict[str, str]]
) -> Iterator[TestClient]:
    """An admin's HTTP client of the application that redirects downloads."""
    with TestClient(
        redirect_app, raise_server_exceptions=False, headers=auth_headers("admin")
    ) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def s3(settings: Settings) -> Minio:
    """A plain S3 client on the test server, to look at what was stored."""
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=False,
        region=settings.s3_region,
    )


def stored_keys(s3: Minio, settings: Settings) -> set[str]:
    """Return every object key in the Binary bucket."""
    if not s3.bucket_exists(settings.s3_bucket):
        return set()
    return {
        str(item.object_name)
        for item in s3.list_objects(settings.s3_bucket, prefix="binaries/", recursive=True)
    }


def binary_rows(session: Session) -> int:
    """Count binary_object rows and Binary resources visible to the test."""
    return int(
        session.execute(
            text(
                "SELECT (SELECT count(*) FROM binary_object)"
                " + (SELECT count(*) FROM fhir_resource WHERE resource_type = 'Binary')"
            )
        ).scalar_one()
    )
