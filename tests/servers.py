"""Real servers for tests: uvicorn on a free port, and access tokens from the dev issuer."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI

DEV_PASSWORD = "waha-dev"  # noqa: S105 - the realm's published dev password
UNIT_SECRETS = {"unit-01": "unit-01-secret", "unit-02": "unit-02-secret"}


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
        raise RuntimeError(f"{app.title} did not start")
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class TokenSource:
    """Access tokens of the dev users and unit clients, fetched from a real issuer."""

    def __init__(self, token_url: str) -> None:
        self.token_url = token_url
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def token(self, name: str) -> str:
        """Return a fresh access token of a dev user (`admin`…) or unit client (`unit-01`)."""
        with self._lock:
            cached = self._tokens.get(name)
            if cached is not None and cached[1] > time.monotonic() + 60:
                return cached[0]
            if name in UNIT_SECRETS:
                form = {
                    "grant_type": "client_credentials",
                    "client_id": name,
                    "client_secret": UNIT_SECRETS[name],
                }
            else:
                form = {
                    "grant_type": "password",
                    "client_id": "waha-cli",
                    "username": name,
                    "password": DEV_PASSWORD,
                }
            response = httpx.post(self.token_url, data=form, timeout=10)
            response.raise_for_status()
            body = response.json()
            token = str(body["access_token"])
            self._tokens[name] = (token, time.monotonic() + float(body["expires_in"]))
            return token

    def headers(self, name: str) -> dict[str, str]:
        """Return the Authorization header of `name`."""
        return {"Authorization": f"Bearer {self.token(name)}"}
