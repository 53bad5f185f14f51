"""Test fixtures: a migrated database per xdist worker, rolled-back tests, a live server."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from alembic import command
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from auth.dev_issuer.app import create_issuer_app
from hub import db, outbox
from hub.app import create_app
from hub.cli import alembic_config
from hub.settings import Settings
from tests.servers import TokenSource, free_port, serve

ADMIN_URL = os.environ.get(
    "WAHA_TEST_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
OWNER_ROLE = "waha"
APP_ROLE = "waha_app"
DATA_TABLES = (
    "fhir_resource",
    "fhir_resource_version",
    "fhir_search_string",
    "fhir_search_date",
    "fhir_search_quantity",
    "fhir_search_uri",
    "fhir_bundle_receipt",
    "outbox_event",
    "binary_object",
    "care_relationship",
    "audit_event",
    "tus_upload",
    "binary_derivative",
    "binary_link",
)


def _database_name(worker_id: str, run_id: str) -> str:
    # The run id keeps concurrent test runs on one machine (two developers, a
    # CI run beside a local one) out of each other's databases.
    return f"waha_test_{run_id}_{worker_id}"


@pytest.fixture(scope="session")
def run_id(request: pytest.FixtureRequest) -> str:
    """An id shared by every xdist worker of this test run."""
    workerinput: dict[str, Any] | None = getattr(request.config, "workerinput", None)
    if workerinput and "testrunuid" in workerinput:
        return str(workerinput["testrunuid"])[:10]
    return f"p{os.getpid()}"


@pytest.fixture(scope="session")
def issuer_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev data folder (signing keys) of this worker's issuer."""
    return tmp_path_factory.mktemp("dev-issuer")


@pytest.fixture(scope="session")
def issuer_base(issuer_data_dir: Path) -> Iterator[str]:
    """Base URL of a real dev issuer shared by this worker's tests (never rotated)."""
    issuer_settings = Settings(env="test", dev_issuer_data_dir=issuer_data_dir, log_json=True)
    with serve(create_issuer_app(issuer_settings)) as base:
        yield base


@pytest.fixture(scope="session")
def issuer_url(issuer_base: str) -> str:
    """The issuer identifier (`iss`) of the shared dev issuer."""
    return f"{issuer_base}/realms/waha"


@pytest.fixture(scope="session")
def token_url(issuer_url: str) -> str:
    """The token endpoint of the shared dev issuer."""
    return f"{issuer_url}/protocol/openid-connect/token"


@pytest.fixture(scope="session")
def tokens(token_url: str) -> TokenSource:
    """Access tokens of the dev users and unit clients."""
    return TokenSource(token_url)


@pytest.fixture(scope="session")
def auth_headers(tokens: TokenSource) -> Callable[[str], dict[str, str]]:
    """`auth_headers("unit-01")` → the Authorization header of that user or unit client."""
    return tokens.headers


@pytest.fixture(scope="session")
def settings(worker_id: str, run_id: str, issuer_url: str) -> Settings:
    """Settings of the test run: the app role on this worker's own database."""
    admin = make_url(ADMIN_URL)
    name = _database_name(worker_id, run_id)
    host, port = admin.host or "127.0.0.1", admin.port or 5432
    return Settings(
        env="test",
        database_url=f"postgresql+psycopg://{APP_ROLE}@{host}:{port}/{name}",
        migration_database_url=f"postgresql+psycopg://{OWNER_ROLE}@{host}:{port}/{name}",
        log_json=True,
        idempotency_wait_seconds=20,
        oidc_issuer=issuer_url,
        oidc_internal_url=issuer_url,
    )


@pytest.fixture(scope="session")
def db_engine(settings: Settings) -> Iterator[Engine]:
    """Create and migrate this worker's database with Alembic; drop it at the end."""
    name = str(settings.database_url).rsplit("/", 1)[1]
    admin_engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}" OWNER {OWNER_ROLE}'))
    command.upgrade(alembic_config(str(settings.migration_database_url)), "head")
    engine = db.make_engine(settings)
    db.session_factory.configure(bind=engine)
    yield engine
    engine.dispose()
    with admin_engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin_engine.dispose()


@pytest.fixture
def session(db_engine: Engine) -> Iterator[Session]:
    """Run one test inside a transaction that is always rolled back."""
    with db_engine.connect() as connection:
        outer = connection.begin()
        db.session_factory.configure(bind=connection, join_transaction_mode="create_savepoint")
        try:
            with Session(connection, join_transaction_mode="create_savepoint") as test_session:
                yield test_session
        finally:
            db.session_factory.kw.pop("join_transaction_mode", None)
            db.session_factory.configure(bind=db_engine)
            outer.rollback()


@pytest.fixture(scope="session")
def app(settings: Settings, db_engine: Engine) -> FastAPI:
    """The application under test, sharing the test's database binding."""
    application = create_app(settings)
    db.session_factory.configure(bind=db_engine)
    # Tests that want drain requests set their own notifier; others must not
    # queue real tasks on the shared broker, where a dev worker would run them.
    outbox.set_notifier(None)
    return application


@pytest.fixture
def client(
    app: FastAPI, session: Session, auth_headers: Callable[[str], dict[str, str]]
) -> Iterator[TestClient]:
    """An admin's HTTP client whose requests join the test's rolled-back transaction."""
    with TestClient(
        app, raise_server_exceptions=False, headers=auth_headers("admin")
    ) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve the app on a free port over real connections (committing for real)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", workers=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    base = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def committed(db_engine: Engine, settings: Settings) -> Iterator[Engine]:
    """For tests whose writes commit: empty every data table afterwards (as the owner)."""
    yield db_engine
    owner_engine = create_engine(str(settings.migration_database_url))
    with owner_engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(DATA_TABLES)}"))
    owner_engine.dispose()


@pytest.fixture(scope="session")
def worker_id(request: pytest.FixtureRequest) -> str:
    """The xdist worker id, or 'main' without xdist."""
    workerinput: dict[str, Any] | None = getattr(request.config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput else "main"


@pytest.fixture(scope="session")
def paging_server(app: FastAPI, settings: Settings, db_engine: Engine) -> Iterator[str]:
    """Serve an app whose public base URL is its own address, over real connections."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Paging links are absolute (settings.public_base_url); the shared live
    # server's would point at the fixed dev port, not at the test's server.
    own = create_app(settings.model_copy(update={"public_base_url": base}))
    outbox.set_notifier(None)
    db.session_factory.configure(bind=db_engine)
    config = uvicorn.Config(own, host="127.0.0.1", port=port, log_level="warning", workers=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(timeout=10)
