"""The development stack behind `make run`: local S3, API and worker, stopped together."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.3)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_http(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return True
        time.sleep(0.2)
    return False


def run(*, api_port: int, s3_port: int, load_demo: bool) -> None:
    """Start every dev process, load demo data, print where things are, wait for Ctrl-C."""
    env = dict(os.environ)
    env.setdefault("WAHA_ENV", "dev")
    env.setdefault("WAHA_S3_ENDPOINT", f"127.0.0.1:{s3_port}")
    env.setdefault("WAHA_PUBLIC_BASE_URL", f"http://127.0.0.1:{api_port}")
    children: list[subprocess.Popen[bytes]] = []

    def start(name: str, *command: str) -> None:
        print(f"waha: starting {name}")
        children.append(subprocess.Popen(command, env=env, start_new_session=True))  # noqa: S603

    if _port_open(s3_port):
        print(f"waha: an S3 server already answers on 127.0.0.1:{s3_port}; using it")
    else:
        start("local S3 server", str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port))
    start(
        "API",
        str(BIN / "uvicorn"),
        "hub.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(api_port),
        "--workers",
        "2",
    )
    start(
        "worker",
        str(BIN / "celery"),
        "-A",
        "hub.celery_app:celery_app",
        "worker",
        "--beat",
        "--concurrency",
        "2",
        "--loglevel",
        "INFO",
    )
    try:
        if not _wait_http(f"http://127.0.0.1:{api_port}/healthz", 60):
            raise SystemExit("waha: the API did not come up; see its log above")
        if load_demo:
            subprocess.run([str(BIN / "waha"), "load-demo"], env=env, check=True)  # noqa: S603
        print(
            "\n"
            f"  Waha is running.\n"
            f"  FHIR API      http://127.0.0.1:{api_port}/fhir  (metadata: /fhir/metadata)\n"
            f"  API docs      http://127.0.0.1:{api_port}/docs\n"
            f"  Local S3      http://127.0.0.1:{s3_port}\n"
            f"  Worker        Celery on {env.get('WAHA_REDIS_URL', 'redis://127.0.0.1:6379/0')}\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("waha: a process stopped; shutting the rest down")
    except KeyboardInterrupt:
        print("\nwaha: stopping")
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
