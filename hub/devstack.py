"""The dev stack behind `make run`: local S3, OIDC issuer, API and worker, stopped together."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
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


def _stop_on_signals() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to the Ctrl-C path, so children are stopped too."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGINT too: a shell without job control starts background commands with
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(children: list[subprocess.Popen[bytes]], *, grace_seconds: float = 20) -> None:
    """Stop every child and its process group: SIGTERM, then SIGKILL after the grace time."""
    # The leaders first: uvicorn's master and Celery's main process then stop
    # their own workers cleanly (Celery finishes running tasks); signalling the
    # whole group at once would kill tasks mid-flight.
    for child in children:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
    # Waiting for a leader is not enough: a worker of its group may outlive it.
    for child in children:
        if _group_alive(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
    while any(_group_alive(child.pid) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def token_help(issuer_url: str, token_commands: Sequence[tuple[str, str]], api_port: int) -> str:
    """Return the lines that tell how to get a token for each demo user and unit."""
    if not token_commands:
        return ""
    lines = [
        f"  OIDC issuer   {issuer_url}",
        "  Tokens        one curl per demo account (append | jq -r .access_token):",
    ]
    for label, command in token_commands:
        lines += [f"    {label}", f"      {command}"]
    lines.append(
        f'  Use one       curl -H "Authorization: Bearer $TOKEN" '
        f"http://127.0.0.1:{api_port}/fhir/Patient?_count=5"
    )
    return "\n".join(lines) + "\n"


def run(
    *,
    api_port: int,
    s3_port: int,
    load_demo: bool,
    issuer_port: int = 8080,
    realm_name: str = "waha",
    token_commands: Sequence[tuple[str, str]] = (),
) -> None:
    """Start every dev process, load demo data, print where things are, wait for Ctrl-C."""
    if _port_open(api_port):
        # Another server answering there would pass the health check and receive
        # the demo data; refuse instead of silently using it.
        raise SystemExit(
            f"waha: 127.0.0.1:{api_port} is already in use; stop that server or pass --api-port"
        )
    env = dict(os.environ)
    env.setdefault("WAHA_ENV", "dev")
    # The ports given on the command line win over the environment: every
    # process of the stack must agree on where the API and S3 are.
    env["WAHA_S3_ENDPOINT"] = f"127.0.0.1:{s3_port}"
    env["WAHA_PUBLIC_BASE_URL"] = f"http://127.0.0.1:{api_port}"
    issuer_url = f"http://127.0.0.1:{issuer_port}/realms/{realm_name}"
    # The API must expect the issuer this stack uses, whichever port it is on.
    env["WAHA_OIDC_ISSUER"] = issuer_url
    env["WAHA_OIDC_INTERNAL_URL"] = issuer_url
    state = Path("var")
    state.mkdir(exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []

    def start(name: str, *command: str) -> None:
        print(f"waha: starting {name}", flush=True)
        # A session of its own: Ctrl-C reaches only this process, which then
        # stops each child's whole group in order.
        children.append(subprocess.Popen(command, env=env, start_new_session=True))  # noqa: S603

    _stop_on_signals()
    exit_code = 0
    try:
        if _port_open(s3_port):
            print(f"waha: an S3 server already answers on 127.0.0.1:{s3_port}; using it")
        else:
            start(
                "local S3 server",
                str(BIN / "moto_server"),
                "-H",
                "127.0.0.1",
                "-p",
                str(s3_port),
            )
        discovery = f"{issuer_url}/.well-known/openid-configuration"
        if _port_open(issuer_port):
            # Keycloak from docker-compose, or a dev issuer left running: use it.
            print(f"waha: something already answers on 127.0.0.1:{issuer_port}; using it as issuer")
        else:
            start(
                "dev OIDC issuer",
                str(BIN / "uvicorn"),
                "auth.dev_issuer.app:create_issuer_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(issuer_port),
            )
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
            # Raw URLs carry patient data in their query strings; the API logs
            # each request by route template instead.
            "--no-access-log",
        )
        start(
            "worker",
            str(BIN / "celery"),
            "-A",
            "hub.celery_app:celery_app",
            "worker",
            "--beat",
            "--schedule-filename",
            str(state / "celerybeat-schedule"),
            "--concurrency",
            "2",
            "--loglevel",
            "INFO",
        )
        if not _wait_http(f"http://127.0.0.1:{api_port}/healthz", 60):
            raise SystemExit("waha: the API did not come up; see its log above")
        issuer_note = ""
        if not _wait_http(discovery, 30):
            issuer_note = f"  OIDC issuer   NOT answering at {discovery}\n"
        demo_note = ""
        if load_demo:
            loaded = subprocess.run([str(BIN / "waha"), "load-demo"], env=env, check=False)  # noqa: S603
            # The API and worker are still useful without the demo data, so
            # the stack keeps running and says so instead of stopping.
            if loaded.returncode != 0:
                demo_note = "  Demo data     NOT loaded: `waha load-demo` failed (see above)\n"
        print(
            "\n"
            f"  Waha is running.\n"
            f"{demo_note}"
            f"  FHIR API      http://127.0.0.1:{api_port}/fhir  (metadata: /fhir/metadata)\n"
            f"  API docs      http://127.0.0.1:{api_port}/docs\n"
            f"  Local S3      http://127.0.0.1:{s3_port}\n"
            f"  Worker        Celery on {env.get('WAHA_REDIS_URL', 'redis://127.0.0.1:6379/0')}\n"
            f"{issuer_note or token_help(issuer_url, token_commands, api_port)}"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("waha: a process stopped; shutting the rest down", flush=True)
        exit_code = 1
    except KeyboardInterrupt:
        print("\nwaha: stopping", flush=True)
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave orphans;
        # _stop escalates to SIGKILL on its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(children)
        print("waha: stopped", flush=True)
    if exit_code:
        raise SystemExit(exit_code)
