"""The wrk driver sends the given paths with the given headers and reads wrk's figures."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bench import wrk
from tests.servers import serve


def test_parse_output_reads_the_figures_line() -> None:
    stdout = (
        "Running 1s test @ http://127.0.0.1:1\n"
        'WAHA-WRK {"requests": 120, "duration_us": 2000000, "status_errors": 20, '
        '"socket_errors": 1, "p50_us": 1500, "p95_us": 9000, "p99_us": 12000}\n'
    )
    run = wrk.parse_output(stdout)
    assert run.requests == 100  # error statuses are failures, not answers
    assert run.failures == 21
    assert run.elapsed == 2.0
    assert (run.p50, run.p95, run.p99) == (0.0015, 0.009, 0.012)


def test_parse_output_without_figures_says_what_wrk_said() -> None:
    with pytest.raises(wrk.WrkError, match="unable to connect"):
        wrk.parse_output("", "unable to connect to 127.0.0.1:1")


@pytest.mark.skipif(not wrk.available(), reason="wrk is not installed (make bench installs it)")
def test_run_sends_every_path_with_the_headers() -> None:
    seen: list[tuple[str, str | None]] = []
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/fhir/{kind}")
    def answer(kind: str, request: Request) -> JSONResponse:
        seen.append((f"{kind}?{request.url.query}", request.headers.get("authorization")))
        return JSONResponse({"ok": True}, status_code=200 if kind != "Missing" else 404)

    with serve(app) as base:
        run = wrk.run(
            base,
            ["/fhir/Patient?identifier=a%7C1", "/fhir/Observation?code=x", "/fhir/Missing?x=1"],
            headers={"Authorization": "Bearer t0ken"},
            connections=2,
            duration=1,
            timeout=5,
        )
    assert run.requests > 0 and run.failures > 0  # the 404s count as failures
    assert {path for path, _ in seen} == {
        "Patient?identifier=a%7C1",
        "Observation?code=x",
        "Missing?x=1",
    }
    assert {header for _, header in seen} == {"Bearer t0ken"}
    assert 0 < run.p50 <= run.p95 <= run.p99
