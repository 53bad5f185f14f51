"""Shared pieces of the benchmark scripts: HTTP clients, percentiles, target tables."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

JSONObject = dict[str, Any]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/waha"
TOKEN_ENV = "WAHA_BENCH_TOKEN"  # noqa: S105 - the name of a variable, not a secret
DEFAULT_ISSUER_URL = "http://127.0.0.1:8080/realms/waha"
# The dev realm's published credentials (platform/keycloak/waha-realm.json).
DEV_PASSWORD = "waha-dev"  # noqa: S105
DEV_UNIT_SECRETS = {"unit-01": "unit-01-secret", "unit-02": "unit-02-secret"}
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


class IssuerToken(httpx.Auth):
    """Bearer tokens of a dev user or unit client, fetched from the issuer and renewed.

    Access tokens live 300 s; a benchmark runs longer, so each request carries
    a token with at least a minute left. Thread-safe enough: a race fetches twice.
    """

    def __init__(self, issuer_url: str, name: str) -> None:
        self.issuer_url = issuer_url
        self.token_url = issuer_url.rstrip("/") + "/protocol/openid-connect/token"
        self.name = name
        self._token: tuple[str, float] | None = None

    def token(self) -> str:
        """Return a token with at least 60 s to live."""
        cached = self._token
        if cached is not None and cached[1] > time.monotonic() + 60:
            return cached[0]
        if self.name in DEV_UNIT_SECRETS:
            form = {
                "grant_type": "client_credentials",
                "client_id": self.name,
                "client_secret": DEV_UNIT_SECRETS[self.name],
            }
        else:
            form = {
                "grant_type": "password",
                "client_id": "waha-cli",
                "username": self.name,
                "password": DEV_PASSWORD,
            }
        try:
            response = httpx.post(self.token_url, data=form, timeout=10)
        except httpx.HTTPError as error:
            raise BenchError(
                f"the issuer at {self.token_url} is not reachable ({error})"
            ) from error
        if response.status_code != 200:
            raise BenchError(f"the issuer refused a token for {self.name}: {response.text[:200]}")
        body = response.json()
        self._token = (str(body["access_token"]), time.monotonic() + float(body["expires_in"]))
        return self._token[0]

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Add the bearer token to a request."""
        request.headers["Authorization"] = f"Bearer {self.token()}"
        yield request


def add_http_arguments(parser: argparse.ArgumentParser, *, default_as: str = "unit-01") -> None:
    """Add --base-url, --token/--issuer-url/--as and --timeout to a script's arguments."""
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="API root (not /fhir)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"a fixed bearer token (default: ${TOKEN_ENV}); else one from --issuer-url",
    )
    parser.add_argument(
        "--issuer-url", default=DEFAULT_ISSUER_URL, help="OIDC issuer to fetch dev tokens from"
    )
    parser.add_argument(
        "--as",
        dest="as_",
        default=default_as,
        help=f"dev user or unit client the requests act as (default {default_as})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s")


def credentials(args: argparse.Namespace) -> str | IssuerToken:
    """Return what authenticates the script's requests: a fixed token or an issuer source."""
    if args.token:
        return str(args.token)
    return IssuerToken(args.issuer_url, args.as_)


def admin_credentials(token: str | IssuerToken | None) -> str | IssuerToken | None:
    """Return credentials for reference-data set-up: admin's when tokens come from the issuer."""
    if isinstance(token, IssuerToken):
        return IssuerToken(token.issuer_url, "admin")
    return token


def make_client(base_url: str, *, token: str | IssuerToken | None, timeout: float) -> httpx.Client:
    """Return an HTTP client for the FHIR base with the FHIR media type and a bearer token."""
    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    auth: httpx.Auth | None = None
    if isinstance(token, IssuerToken):
        auth = token
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(
        base_url=base_url.rstrip("/") + "/fhir",
        headers=headers,
        auth=auth,
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


def check_api(base_url: str, *, token: str | IssuerToken | None, timeout: float = 10.0) -> None:
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
