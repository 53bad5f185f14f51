"""Measure transaction ingest of 12-entry unit bundles against the live API.

N client threads (one httpx.Client each) post `unit_bundle_12` bundles whose
patients come from one shared pool, so conditional creates race. Afterwards the
database is checked for duplicate patients, and the raw PostgreSQL row rate of
the same machine (8 clients, transactions of 12 single-row JSONB inserts) is
measured so the ingest figure can be read as a fraction of what the database
alone does (DESIGN.md "Performance facts").

    python -m bench.ingest --duration 30 --clients 8
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import psycopg
from psycopg import sql

from bench.common import (
    DEFAULT_DSN,
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
    reference_resources,
    unit_bundle_12,
)

# Where the API keeps current resource versions (fhir_api/models.py ResourceRow).
RESOURCE_TABLE = "fhir_resource"
RESOURCE_COLUMN = "resource"
TYPE_COLUMN = "resource_type"
DELETED_COLUMN = "deleted"
ID_COLUMN = "id"

SCRATCH_SCHEMA = "bench_scratch"
SCRATCH_TABLE = "raw_resource"
ENTRIES_PER_BUNDLE = 12
RAW_ROWS_PER_TRANSACTION = 12

TARGET_RESOURCES_PER_SECOND = 1_000.0
TARGET_P95_SECONDS = 0.250
TARGET_RAW_FRACTION = 0.035


@dataclass
class IngestRun:
    """What the HTTP clients saw."""

    clients: int
    seed: int
    elapsed: float = 0.0
    bundles_ok: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    national_ids: set[str] = field(default_factory=set)

    @property
    def resources_per_second(self) -> float:
        """Return stored resources per wall-clock second."""
        return self.bundles_ok * ENTRIES_PER_BUNDLE / self.elapsed if self.elapsed else 0.0

    @property
    def bundles_per_second(self) -> float:
        """Return accepted bundles per wall-clock second."""
        return self.bundles_ok / self.elapsed if self.elapsed else 0.0


@dataclass(frozen=True)
class PatientCheck:
    """Duplicate patients found in the store after the run."""

    duplicated_national_ids: int
    run_national_ids: int
    run_patient_rows: int


@dataclass(frozen=True)
class RawRate:
    """PostgreSQL's own row rate on this machine."""

    rows_per_second: float
    method: str


@dataclass
class _Shared:
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def _national_id(bundle: JSONObject) -> str | None:
    for identifier in bundle["entry"][0]["resource"]["identifier"]:
        if identifier["system"] == SID_NATIONAL_ID:
            return str(identifier["value"])
    return None


def _accepted(response: httpx.Response) -> bool:
    if response.status_code != 200:
        return False
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(body, dict)
        and body.get("type") == "transaction-response"
        and len(body.get("entry", [])) == ENTRIES_PER_BUNDLE
    )


def _post(client: httpx.Client, url: str, bundle: JSONObject) -> tuple[bool, float, str]:
    body = orjson.dumps(bundle)
    started = time.perf_counter()
    try:
        response = client.post(url, content=body)
    except httpx.HTTPError as error:
        return False, time.perf_counter() - started, type(error).__name__
    latency = time.perf_counter() - started
    if _accepted(response):
        return True, latency, ""
    if response.status_code == 200:
        return False, latency, "HTTP 200 but not a 12-entry transaction-response"
    return False, latency, describe_failure(response)


def _client_loop(
    run: IngestRun,
    shared: _Shared,
    counter: itertools.count[int],
    *,
    base_url: str,
    token: str | IssuerToken | None,
    timeout: float,
    limit: int | None,
    shared_patients: int,
) -> None:
    url = base_url.rstrip("/") + "/fhir"
    latencies: list[float] = []
    national_ids: set[str] = set()
    errors: Counter[str] = Counter()
    accepted = 0
    with make_client(base_url, token=token, timeout=timeout) as client:
        while not shared.stop.is_set():
            # next() on itertools.count is atomic under the GIL: no two clients share an index.
            index = next(counter)
            if limit is not None and index > limit:
                break
            bundle = unit_bundle_12(run.seed, index, shared_patients=shared_patients)
            national_id = _national_id(bundle)
            if national_id is not None:
                national_ids.add(national_id)
            ok, latency, error = _post(client, url, bundle)
            if ok:
                accepted += 1
                latencies.append(latency)
            else:
                errors[error] += 1
    with shared.lock:
        run.bundles_ok += accepted
        run.failures += sum(errors.values())
        run.errors.update(errors)
        run.latencies.extend(latencies)
        run.national_ids.update(national_ids)


def run_ingest(
    *,
    base_url: str,
    token: str | IssuerToken | None,
    clients: int,
    duration: float | None,
    bundles: int | None,
    shared_patients: int,
    seed: int,
    timeout: float,
    setup: bool = True,
) -> IngestRun:
    """Post unit bundles from `clients` threads for `duration` s or `bundles` bundles."""
    check_api(base_url, token=token)
    run = IngestRun(clients=clients, seed=seed)
    if setup:
        # Reference data (Organizations, Devices, Locations) is an administrator's.
        with make_client(base_url, token=admin_credentials(token), timeout=timeout) as client:
            started = time.perf_counter()
            references = reference_resources(DEMO_SEED)
            put_resources(client, references)
            print(
                f"  reference data: {len(references)} PUTs in {time.perf_counter() - started:.1f} s"
            )
    with make_client(base_url, token=token, timeout=timeout) as client:
        # One bundle first, alone: a refusal here is a setup problem, not a load figure.
        probe = unit_bundle_12(seed, 0, shared_patients=shared_patients)
        ok, _, error = _post(client, base_url.rstrip("/") + "/fhir", probe)
        if not ok:
            raise BenchError(f"the API refused the first unit bundle: {error}")
    counter = itertools.count(1)
    shared = _Shared()
    threads = [
        threading.Thread(
            target=_client_loop,
            args=(run, shared, counter),
            kwargs={
                "base_url": base_url,
                "token": token,
                "timeout": timeout,
                "limit": bundles,
                "shared_patients": shared_patients,
            },
            name=f"ingest-client-{number}",
            daemon=True,
        )
        for number in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    if duration is not None:
        shared.stop.wait(duration)
        shared.stop.set()
    for thread in threads:
        thread.join()
    run.elapsed = time.perf_counter() - started
    return run


def check_patients(dsn: str, national_ids: Sequence[str]) -> PatientCheck:
    """Count national IDs held by more than one Patient, overall and for this run."""
    duplicated = sql.SQL(
        """
        SELECT count(*) FROM (
            SELECT ident->>'value'
            FROM {table} AS r
            CROSS JOIN LATERAL jsonb_array_elements(r.{resource}->'identifier') AS ident
            WHERE r.{type} = 'Patient' AND NOT r.{deleted} AND ident->>'system' = %s
            GROUP BY ident->>'value'
            HAVING count(DISTINCT r.{id}) > 1
        ) AS duplicated
        """
    )
    run_rows = sql.SQL(
        """
        SELECT count(DISTINCT r.{id})
        FROM {table} AS r
        CROSS JOIN LATERAL jsonb_array_elements(r.{resource}->'identifier') AS ident
        WHERE r.{type} = 'Patient' AND NOT r.{deleted}
          AND ident->>'system' = %s AND ident->>'value' = ANY(%s)
        """
    )
    names = {
        "table": sql.Identifier(RESOURCE_TABLE),
        "resource": sql.Identifier(RESOURCE_COLUMN),
        "type": sql.Identifier(TYPE_COLUMN),
        "deleted": sql.Identifier(DELETED_COLUMN),
        "id": sql.Identifier(ID_COLUMN),
    }
    with psycopg.connect(dsn, connect_timeout=10) as connection:
        row = connection.execute(duplicated.format(**names), (SID_NATIONAL_ID,)).fetchone()
        run_row = connection.execute(
            run_rows.format(**names), (SID_NATIONAL_ID, list(national_ids))
        ).fetchone()
    return PatientCheck(
        duplicated_national_ids=int(row[0]) if row else 0,
        run_national_ids=len(national_ids),
        run_patient_rows=int(run_row[0]) if run_row else 0,
    )


def _sample_json() -> str:
    observation = unit_bundle_12(DEMO_SEED, 0, shared_patients=1)["entry"][2]["resource"]
    return orjson.dumps(observation).decode()


def _raw_with_pgbench(pgbench: str, dsn: str, *, clients: int, seconds: float) -> float:
    literal = _sample_json().replace("'", "''")
    # A pgbench script is plain SQL text; the payload is our own JSON with quotes doubled.
    insert = f"INSERT INTO {SCRATCH_SCHEMA}.{SCRATCH_TABLE} (resource) VALUES ('{literal}');"  # noqa: S608
    script = "BEGIN;\n" + "\n".join([insert] * RAW_ROWS_PER_TRANSACTION) + "\nEND;\n"
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "raw12.sql"
        path.write_text(script, encoding="utf-8")
        # pgbench takes a libpq URI where the database name goes.
        command = [
            pgbench,
            "-n",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(max(1, round(seconds))),
            "-f",
            str(path),
            dsn,
        ]
        completed = subprocess.run(  # noqa: S603 - fixed argv, no shell
            command, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    if completed.returncode != 0:
        raise BenchError(f"pgbench failed: {completed.stderr.strip()[:300]}")
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", completed.stdout)
    if match is None:
        match = re.search(r"tps = ([0-9.]+)", completed.stdout)
    if match is None:
        raise BenchError(f"could not read pgbench output: {completed.stdout[-300:]}")
    return float(match.group(1)) * RAW_ROWS_PER_TRANSACTION


def _raw_worker(dsn: str, seconds: float, payload: str) -> int:
    insert = sql.SQL("INSERT INTO {}.{} (resource) VALUES (%s::jsonb)").format(
        sql.Identifier(SCRATCH_SCHEMA), sql.Identifier(SCRATCH_TABLE)
    )
    transactions = 0
    with psycopg.connect(dsn, connect_timeout=10) as connection:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            with connection.transaction(), connection.cursor() as cursor:
                cursor.executemany(insert, [(payload,)] * RAW_ROWS_PER_TRANSACTION)
            transactions += 1
    return transactions


def _raw_with_psycopg(dsn: str, *, clients: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    payload = _sample_json()
    with context.Pool(clients) as pool:
        counts = pool.starmap(_raw_worker, [(dsn, seconds, payload)] * clients)
    return sum(counts) * RAW_ROWS_PER_TRANSACTION / seconds


def measure_raw_rate(dsn: str, *, clients: int = 8, seconds: float = 10.0) -> RawRate:
    """Measure rows/s of 12-insert JSONB transactions from `clients` clients in a scratch schema."""
    create = sql.SQL(
        "CREATE SCHEMA IF NOT EXISTS {schema}; DROP TABLE IF EXISTS {schema}.{table}; "
        "CREATE TABLE {schema}.{table} (id bigserial PRIMARY KEY, resource jsonb NOT NULL)"
    ).format(schema=sql.Identifier(SCRATCH_SCHEMA), table=sql.Identifier(SCRATCH_TABLE))
    drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCRATCH_SCHEMA))
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection:
        connection.execute(create)
    try:
        pgbench = shutil.which("pgbench")
        if pgbench is not None:
            rate = _raw_with_pgbench(pgbench, dsn, clients=clients, seconds=seconds)
            return RawRate(rate, "pgbench")
        # A Python client spends CPU the database would otherwise use: a lower bound.
        rate = _raw_with_psycopg(dsn, clients=clients, seconds=seconds)
        return RawRate(rate, "psycopg processes (pgbench not found; a lower bound)")
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection:
            connection.execute(drop)


def ingest_checks(
    run: IngestRun, patients: PatientCheck | None, raw: RawRate | None
) -> list[Check]:
    """Return the ingest figures against their targets."""
    p95 = percentile(run.latencies, 0.95)
    checks = [
        Check(
            "ingest resources/s",
            f"{run.resources_per_second:,.0f}",
            f">= {TARGET_RESOURCES_PER_SECOND:,.0f}",
            run.resources_per_second >= TARGET_RESOURCES_PER_SECOND,
        ),
        Check(
            "bundle latency p95",
            f"{p95 * 1000:.0f} ms",
            f"< {TARGET_P95_SECONDS * 1000:.0f} ms",
            p95 < TARGET_P95_SECONDS,
        ),
        Check("failed requests", str(run.failures), "0", run.failures == 0 and run.bundles_ok > 0),
    ]
    if patients is None:
        checks.append(Check("duplicate patients", "n/a", "0", False))
    else:
        duplicates = patients.duplicated_national_ids
        checks.append(Check("duplicate patients", str(duplicates), "0", duplicates == 0))
    if raw is None:
        checks.append(Check("ingest / raw PostgreSQL", "n/a", ">= 3.5%", False))
    else:
        fraction = run.resources_per_second / raw.rows_per_second if raw.rows_per_second else 0.0
        checks.append(
            Check(
                "ingest / raw PostgreSQL",
                f"{fraction:.1%}",
                f">= {TARGET_RAW_FRACTION:.1%}",
                fraction >= TARGET_RAW_FRACTION,
            )
        )
    return checks


def print_run(run: IngestRun) -> None:
    """Print the client-side figures of an ingest run."""
    print(f"\nIngest: {run.clients} clients, {run.elapsed:.1f} s, seed {run.seed}")
    print(f"  bundles accepted     {run.bundles_ok:,} ({run.bundles_per_second:,.1f}/s)")
    print(
        f"  resources stored     {run.bundles_ok * ENTRIES_PER_BUNDLE:,} "
        f"({run.resources_per_second:,.0f}/s)"
    )
    for label, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        print(f"  latency {label}          {percentile(run.latencies, fraction) * 1000:,.1f} ms")
    print(f"  failed requests      {run.failures:,}")
    for error, count in run.errors.most_common(5):
        print(f"    {count:>6} x {error}")


def run_all(args: argparse.Namespace) -> list[Check]:
    """Run the HTTP ingest, the duplicate check and the raw rate; print and return checks."""
    run = run_ingest(
        base_url=args.base_url,
        token=credentials(args),
        clients=args.clients,
        duration=None if args.bundles else args.duration,
        bundles=args.bundles,
        shared_patients=args.shared_patients,
        seed=args.seed,
        timeout=args.timeout,
        setup=not args.skip_setup,
    )
    print_run(run)
    patients: PatientCheck | None = None
    try:
        patients = check_patients(args.dsn, sorted(run.national_ids))
        print(
            f"  duplicate patients   {patients.duplicated_national_ids} national IDs on >1 Patient "
            f"(this run: {patients.run_national_ids} IDs sent, "
            f"{patients.run_patient_rows} Patient rows hold them)"
        )
    except psycopg.Error as error:
        print(
            f"  duplicate check skipped: cannot query {args.dsn}: {type(error).__name__}: {error}"
        )
    raw: RawRate | None = None
    if not args.skip_raw:
        try:
            print(
                f"\nRaw PostgreSQL: {args.raw_clients} clients x 12-insert transactions, "
                f"{args.raw_seconds:.0f} s ..."
            )
            raw = measure_raw_rate(args.dsn, clients=args.raw_clients, seconds=args.raw_seconds)
            print(f"  raw rows/s           {raw.rows_per_second:,.0f} ({raw.method})")
        except (psycopg.Error, BenchError, subprocess.TimeoutExpired) as error:
            print(f"  raw rate skipped: {type(error).__name__}: {error}")
    checks = ingest_checks(run, patients, raw)
    print_checks("Ingest targets", checks)
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ingest options to a parser."""
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--bundles", type=int, default=None, help="post this many instead")
    parser.add_argument(
        "--shared-patients", type=int, default=500, help="size of the patient pool all share"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="population seed (default: from the clock, so runs never replay idempotency keys)",
    )
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL for the checks")
    parser.add_argument("--raw-clients", type=int, default=8)
    parser.add_argument("--raw-seconds", type=float, default=10.0)
    parser.add_argument("--skip-raw", action="store_true", help="skip the raw PostgreSQL rate")
    parser.add_argument("--skip-setup", action="store_true", help="do not PUT reference data")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ingest benchmark from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="Measure unit-bundle ingest against the live API.",
    )
    add_http_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time())
    try:
        run_all(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
