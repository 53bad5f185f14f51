"""Fixtures for the auth tests: a real dev issuer over HTTP on a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from jwcrypto import jwk, jwt

from auth.dev_issuer.app import create_issuer_app
from auth.dev_issuer.keys import KeyStore
from hub.settings import Settings

REALM = "waha"


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve an app with uvicorn on a free port; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", workers=1)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    else:
        raise RuntimeError("the dev issuer did not start")
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def issuer_settings(data_dir: Path) -> Settings:
    """Settings of a test dev issuer keeping its keys in `data_dir`."""
    return Settings(env="test", dev_issuer_data_dir=data_dir, log_json=True)


@pytest.fixture(scope="session")
def issuer_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dev data folder of this worker's shared issuer."""
    return tmp_path_factory.mktemp("dev-issuer")


@pytest.fixture(scope="session")
def issuer_base(issuer_data_dir: Path) -> Iterator[str]:
    """Base URL of a dev issuer shared by this worker's tests (never rotated)."""
    with serve(create_issuer_app(issuer_settings(issuer_data_dir))) as base:
        yield base


@pytest.fixture(scope="session")
def issuer_url(issuer_base: str) -> str:
    """The issuer identifier (`iss`) of the shared dev issuer."""
    return f"{issuer_base}/realms/{REALM}"


@pytest.fixture(scope="session")
def token_url(issuer_url: str) -> str:
    """The token endpoint of the shared dev issuer."""
    return f"{issuer_url}/protocol/openid-connect/token"


def decode_unverified(token: str) -> dict[str, Any]:
    """Return a JWT's claims without checking anything (for assertions only)."""
    parsed = jwt.JWT(jwt=token)
    claims: dict[str, Any] = jwt.json_decode(parsed.token.objects["payload"])
    return claims


def sign(
    claims: dict[str, Any], key: jwk.JWK, *, alg: str = "RS256", kid: str | None = None
) -> str:
    """Sign claims as a compact JWS with the given key."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    header["kid"] = kid if kid is not None else key.get("kid")
    token = jwt.JWT(header=header, claims=claims)
    token.make_signed_token(key)
    return str(token.serialize())


def issuer_key(data_dir: Path) -> jwk.JWK:
    """Return the private signing key the dev issuer of `data_dir` uses now."""
    return KeyStore(data_dir, retention_seconds=3600).active().key
