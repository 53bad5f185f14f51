"""Drive the API with wrk, a load generator written in C, over a list of request paths.

A Python client spends about as much CPU per request as a fast API does, and on
a small machine the two share the cores: with Python clients the benchmark
partly measures itself. wrk keeps one connection per client busy (a closed
loop, like the Python driver), sends each thread's requests round the path list
from its own starting point, and reports latency percentiles from its histogram.
`make bench` installs it (Debian package `wrk`); without it the scripts fall
back to their Python clients and say so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MARKER = "WAHA-WRK "
# One Lua state per wrk thread: `setup` numbers the threads so that each starts
# at its own place in the list; `done` prints the figures as one JSON line.
SCRIPT = r"""
local paths = {}
for line in io.lines(os.getenv("WAHA_WRK_PATHS")) do paths[#paths + 1] = line end
local headers = {}
for line in io.lines(os.getenv("WAHA_WRK_HEADERS")) do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then headers[name] = value end
end
local threads = 0
function setup(thread)
  thread:set("start", threads * 7919)
  threads = threads + 1
end
local position = 0
function init(args)
  position = start or 0
end
function request()
  position = position + 1
  return wrk.format("GET", paths[(position % #paths) + 1], headers)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WAHA-WRK {"requests": %d, "duration_us": %d, "status_errors": %d, ' ..
    '"socket_errors": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


class WrkError(RuntimeError):
    """wrk could not run or printed no figures."""


@dataclass(frozen=True)
class WrkRun:
    """What wrk measured: successful requests, failures, seconds, latency percentiles in s."""

    requests: int
    failures: int
    elapsed: float
    p50: float
    p95: float
    p99: float


def available() -> bool:
    """Return whether wrk is installed."""
    return shutil.which("wrk") is not None


def run(
    base_url: str,
    paths: Sequence[str],
    *,
    headers: Mapping[str, str],
    connections: int,
    duration: float,
    timeout: float,
) -> WrkRun:
    """Send GETs of `paths` over `connections` keep-alive connections for `duration` s."""
    executable = shutil.which("wrk")
    if executable is None:
        raise WrkError("wrk is not installed (make bench installs it)")
    if not paths:
        raise WrkError("no request paths to send")
    with tempfile.TemporaryDirectory(prefix="waha-wrk-") as folder:
        script = Path(folder, "paths.lua")
        script.write_text(SCRIPT, encoding="utf-8")
        path_file = Path(folder, "paths.txt")
        path_file.write_text("\n".join(paths) + "\n", encoding="utf-8")
        header_file = Path(folder, "headers.txt")
        header_file.write_text(
            "".join(f"{name}: {value}\n" for name, value in headers.items()), encoding="utf-8"
        )
        command = [
            executable,
            f"--threads={min(2, connections)}",
            f"--connections={connections}",
            f"--duration={max(1, round(duration))}s",
            f"--timeout={max(1, round(timeout))}s",
            f"--script={script}",
            base_url.rstrip("/"),
        ]
        environment = {"WAHA_WRK_PATHS": str(path_file), "WAHA_WRK_HEADERS": str(header_file)}
        try:
            finished = subprocess.run(  # noqa: S603 - a fixed executable and our own arguments
                command,
                capture_output=True,
                text=True,
                env=environment,
                timeout=duration + timeout + 30,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise WrkError(f"wrk did not finish: {error}") from error
    return parse_output(finished.stdout, finished.stderr)


def parse_output(stdout: str, stderr: str = "") -> WrkRun:
    """Read the figures line the script's `done` printed."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        raise WrkError(f"wrk printed no figures: {(stderr or stdout)[-300:]}")
    figures = json.loads(line[len(MARKER) :])
    # wrk counts an error status as an answered request; here it is a failure.
    refused = int(figures["status_errors"])
    return WrkRun(
        requests=int(figures["requests"]) - refused,
        failures=refused + int(figures["socket_errors"]),
        elapsed=int(figures["duration_us"]) / 1e6,
        p50=int(figures["p50_us"]) / 1e6,
        p95=int(figures["p95_us"]) / 1e6,
        p99=int(figures["p99_us"]) / 1e6,
    )
