"""The dev stack refuses a busy API port and leaves no process behind when stopped."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hub import devstack

# The leader dies on SIGTERM but its child ignores it: the case where waiting
# for the leader alone would leave a process behind.
STUBBORN_GROUP = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)"])
    time.sleep(600)
    """
)


def _live_members(pgid: int) -> list[int]:
    """Return the non-zombie processes of a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def test_stop_ends_every_process_of_each_group() -> None:
    leader = subprocess.Popen(  # noqa: S603 - this interpreter, fixed script
        [sys.executable, "-c", STUBBORN_GROUP], stdout=subprocess.PIPE, start_new_session=True
    )
    assert leader.stdout is not None
    assert leader.stdout.readline().strip() == b"ready"
    assert len(_live_members(leader.pid)) == 2

    devstack._stop([leader], grace_seconds=2)

    assert leader.returncode is not None
    # SIGKILL is delivered and the orphan reaped asynchronously: poll, with a deadline.
    deadline = time.monotonic() + 10
    while _live_members(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_members(leader.pid) == []


def test_run_refuses_an_api_port_another_server_holds() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"127.0.0.1:{port} is already in use"):
            devstack.run(api_port=port, s3_port=port + 1, load_demo=False)
