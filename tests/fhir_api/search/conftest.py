"""A live server whose Bundle links point back at itself (for clients that follow them)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

from hub import db, outbox
from hub.app import create_app
from hub.settings import Settings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def paging_server(app: FastAPI, settings: Settings, db_engine: Engine) -> Iterator[str]:
    """Serve an app whose public base URL is its own address, over real connections."""
    port = _free_port()
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
