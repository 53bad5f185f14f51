"""Measure `Patient/$everything` for one patient with ~550 resources in the compartment.

Setup posts 50 twelve-entry bundles of one patient (conditional Patient, Encounter,
10 Observations: 1 + 550 compartment resources). The seed is fixed by default, so
a second run replays the same idempotency keys, writes nothing and measures the
same record. Each timed request asks `$everything?_count=<count>` (default 1000,
more than the compartment, so normally one page) and follows `next` links until
the record is complete: the figure is the time to fetch the whole record.

    python -m bench.everything --requests 200
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import orjson

from bench.common import (
    BenchError,
    Check,
    IssuerToken,
    JSONObject,
    add_http_arguments,
    admin_credentials,
    check_api,
    credentials,
    describe_failure,
    make_client,
    percentile,
    print_checks,
    put_resources,
)
from bench.population import (
    DEMO_SEED,
    SID_NATIONAL_ID,
    history_patient,
    patient_history_bundles,
    reference_resources,
)

DEFAULT_SEED = 20261118
DEFAULT_VISITS = 50
TARGET_P95_SECONDS = 0.100


@dataclass
class EverythingRun:
    """What the timed `$everything` requests saw."""

    patient_id: str
    expected: int
    latencies: list[float] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    response_bytes: list[int] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)


def _post_bundle(client: httpx.Client, url: str, bundle: JSONObject) -> JSONObject:
    try:
        response = client.post(url, content=orjson.dumps(bundle))
    except httpx.HTTPError as error:
        raise BenchError(f"POST /fhir failed: {type(error).__name__}: {error}") from error
    if response.status_code != 200:
        raise BenchError(f"POST /fhir answered {describe_failure(response)}")
    body: JSONObject = orjson.loads(response.content)
    return body


def _patient_id(client: httpx.Client, national_id: str) -> str:
    response = client.get("/Patient", params={"identifier": f"{SID_NATIONAL_ID}|{national_id}"})
    if response.status_code != 200:
        raise BenchError(f"GET /fhir/Patient?identifier=... answered {describe_failure(response)}")
    entries = orjson.loads(response.content).get("entry", [])
    if len(entries) != 1:
        raise BenchError(f"the identifier search found {len(entries)} patients, expected 1")
    return str(entries[0]["resource"]["id"])


def prepare_patient(
    base_url: str,
    *,
    token: str | IssuerToken | None,
    timeout: float,
    seed: int,
    visits: int,
    setup: bool,
) -> tuple[str, int]:
    """Store the patient's visits (idempotent for a given seed); return its id and size."""
    bundles = patient_history_bundles(seed, visits=visits)
    national_id = history_patient(seed).national_id
    if national_id is None:
        raise BenchError("the history patient has no national ID")
    started = time.perf_counter()
    if setup:
        # Reference data (Organizations, Devices, Locations) is an administrator's.
        with make_client(base_url, token=admin_credentials(token), timeout=timeout) as admin:
            put_resources(admin, reference_resources(DEMO_SEED))
    with make_client(base_url, token=token, timeout=timeout) as client:
        url = base_url.rstrip("/") + "/fhir"
        for bundle in bundles:
            _post_bundle(client, url, bundle)
        patient_id = _patient_id(client, national_id)
    print(
        f"  setup: {visits} bundles for Patient/{patient_id} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    # Every bundle adds an Encounter and 10 Observations; the Patient is matched.
    return patient_id, 1 + visits * 11


def _fetch_everything(client: httpx.Client, first_url: str) -> tuple[int, int, int]:
    """Fetch every page of one `$everything`; return entries, pages and bytes."""
    url: str | None = first_url
    entries = pages = size = 0
    while url is not None:
        response = client.get(url)
        if response.status_code != 200:
            raise BenchError(describe_failure(response))
        body = orjson.loads(response.content)
        pages += 1
        size += len(response.content)
        entries += len(body.get("entry", []))
        url = next(
            (link["url"] for link in body.get("link", []) if link.get("relation") == "next"),
            None,
        )
        if pages > 1_000:
            raise BenchError("more than 1,000 pages: the next links loop")
    return entries, pages, size


def measure(
    base_url: str,
    *,
    token: str | IssuerToken | None,
    timeout: float,
    patient_id: str,
    expected: int,
    requests: int,
    warmup: int,
    count: int,
) -> EverythingRun:
    """Time `requests` complete `$everything` fetches after `warmup` untimed ones."""
    run = EverythingRun(patient_id=patient_id, expected=expected)
    first_url = f"{base_url.rstrip('/')}/fhir/Patient/{patient_id}/$everything?_count={count}"
    with make_client(base_url, token=token, timeout=timeout) as client:
        for number in range(warmup + requests):
            started = time.perf_counter()
            try:
                entries, pages, size = _fetch_everything(client, first_url)
            except (httpx.HTTPError, orjson.JSONDecodeError, BenchError) as error:
                if number >= warmup:
                    run.failures += 1
                    run.errors.append(str(error) or type(error).__name__)
                continue
            latency = time.perf_counter() - started
            if number >= warmup:
                run.latencies.append(latency)
                run.entries.append(entries)
                run.pages.append(pages)
                run.response_bytes.append(size)
    return run


def everything_checks(run: EverythingRun) -> list[Check]:
    """Return the `$everything` figures against their targets."""
    p95 = percentile(run.latencies, 0.95)
    complete = bool(run.entries) and min(run.entries) >= run.expected
    return [
        Check(
            "$everything p95",
            f"{p95 * 1000:.1f} ms",
            f"< {TARGET_P95_SECONDS * 1000:.0f} ms",
            p95 < TARGET_P95_SECONDS,
        ),
        Check(
            "$everything entries",
            str(min(run.entries)) if run.entries else "n/a",
            f">= {run.expected}",
            complete,
        ),
        Check("$everything failures", str(run.failures), "0", run.failures == 0),
    ]


def print_run(run: EverythingRun) -> None:
    """Print the client-side figures of an `$everything` run."""
    print(f"\n$everything: Patient/{run.patient_id}, {len(run.latencies)} timed requests")
    for label, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        print(f"  latency {label}          {percentile(run.latencies, fraction) * 1000:,.1f} ms")
    if run.entries:
        print(
            f"  entries              {min(run.entries)}..{max(run.entries)} "
            f"(expected >= {run.expected}), pages {max(run.pages)}, "
            f"{max(run.response_bytes) / 1024:,.0f} KiB"
        )
    print(f"  failed requests      {run.failures}")
    for error in sorted(set(run.errors))[:5]:
        print(f"    {error}")


def run_all(args: argparse.Namespace) -> list[Check]:
    """Prepare the patient, time `$everything`; print and return checks."""
    check_api(args.base_url, token=credentials(args))
    patient_id, expected = prepare_patient(
        args.base_url,
        token=credentials(args),
        timeout=args.timeout,
        seed=args.everything_seed,
        visits=args.visits,
        setup=not args.skip_setup,
    )
    run = measure(
        args.base_url,
        token=credentials(args),
        timeout=args.timeout,
        patient_id=patient_id,
        expected=expected,
        requests=args.requests,
        warmup=args.warmup,
        count=args.count,
    )
    print_run(run)
    checks = everything_checks(run)
    print_checks("$everything targets", checks)
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `$everything` options to a parser."""
    parser.add_argument(
        "--everything-seed", type=int, default=DEFAULT_SEED, help="seed of the one big patient"
    )
    parser.add_argument("--visits", type=int, default=DEFAULT_VISITS, help="bundles of 11 + 1")
    parser.add_argument("--requests", type=int, default=200, help="timed requests")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests first")
    parser.add_argument("--count", type=int, default=1_000, help="_count of the first page")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `$everything` benchmark from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.everything", description="Measure Patient/$everything latency."
    )
    add_http_arguments(parser)
    add_arguments(parser)
    parser.add_argument("--skip-setup", action="store_true", help="do not PUT reference data")
    args = parser.parse_args(argv)
    try:
        run_all(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
