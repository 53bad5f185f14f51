"""Shared pieces of the benchmark scripts: HTTP clients, percentiles, target tables."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

JSONObject = dict[str, Any]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/waha"
TOKEN_ENV = "WAHA_BENCH_TOKEN"  # noqa: S105 - the name of a variable, not a secret
FHIR_JSON = "application/fhir+json"


class BenchError(RuntimeError):
    """A benchmark cannot run (API down, setup refused); the message says why."""


@dataclass(frozen=True)
class Check:
    """One measured figure against its target."""

    name: str
    measured: str
    target: str
    passed: bool

    @property
    def verdict(self) -> str:
        """Return PASS or SHORT."""
        return "PASS" if self.passed else "SHORT"


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --base-url, --token and --timeout to a script's arguments."""
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="API root (not /fhir)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token sent as Authorization (default: ${TOKEN_ENV})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")


def make_client(base_url: str, *, token: str | None, timeout: float) -> httpx.Client:
    """Return an HTTP client for the FHIR base with the FHIR media type and optional token."""
    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(
        base_url=base_url.rstrip("/") + "/fhir",
        headers=headers,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
    )


def describe_failure(response: httpx.Response) -> str:
    """Summarise an error answer by status and OperationOutcome issue codes, not its body."""
    summary = f"HTTP {response.status_code}"
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return summary
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = [
            f"{issue.get('code')}@{','.join(issue.get('expression', []))}"
            for issue in body.get("issue", [])
            if isinstance(issue, dict)
        ]
        summary += " " + "; ".join(issues[:3])
        details = [
            str(issue.get("diagnostics", ""))[:120]
            for issue in body.get("issue", [])
            if isinstance(issue, dict) and issue.get("diagnostics")
        ]
        if details:
            summary += f" ({details[0]})"
    return summary


def check_api(base_url: str, *, token: str | None, timeout: float = 10.0) -> None:
    """Raise BenchError unless the API answers its CapabilityStatement."""
    with make_client(base_url, token=token, timeout=timeout) as client:
        try:
            response = client.get("/metadata")
        except httpx.HTTPError as error:
            raise BenchError(
                f"the API at {base_url} is not reachable ({type(error).__name__}: {error}); "
                "start it (make run) or pass --base-url"
            ) from error
    if response.status_code == 401:
        raise BenchError(f"the API at {base_url} wants a token: pass --token or ${TOKEN_ENV}")
    if response.status_code != 200:
        raise BenchError(f"GET {base_url}/fhir/metadata answered {describe_failure(response)}")


def put_resources(client: httpx.Client, resources: Sequence[JSONObject]) -> None:
    """PUT each resource at its client-chosen id; raise BenchError on the first refusal."""
    for resource in resources:
        path = f"/{resource['resourceType']}/{resource['id']}"
        try:
            response = client.put(path, content=orjson.dumps(resource))
        except httpx.HTTPError as error:
            raise BenchError(f"PUT {path} failed: {type(error).__name__}: {error}") from error
        if response.status_code not in (200, 201):
            raise BenchError(f"PUT {path} answered {describe_failure(response)}")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile (fraction in 0..1) of the values, or NaN if none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def print_checks(title: str, checks: Sequence[Check]) -> None:
    """Print a table of figures against targets with PASS/SHORT."""
    print(f"\n{title}")
    width = max([len(check.name) for check in checks] + [6])
    measured_width = max([len(check.measured) for check in checks] + [8])
    target_width = max([len(check.target) for check in checks] + [6])
    print(f"  {'figure':<{width}}  {'measured':>{measured_width}}  {'target':<{target_width}}  ")
    for check in checks:
        print(
            f"  {check.name:<{width}}  {check.measured:>{measured_width}}  "
            f"{check.target:<{target_width}}  {check.verdict}"
        )
