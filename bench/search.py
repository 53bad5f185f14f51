"""Measure FHIR search on a large store: 8 clients per query kind, rps and p50/p95.

Query values are sampled read-only from the store itself (TABLESAMPLE), so the
benchmark needs no setup and works on any preloaded database. The same run also
measures the raw PostgreSQL index-lookup rate of the identifier query (8
connections, the bare GIN lookup) to show what the API layer costs on top.
`--explain DIR` writes EXPLAIN (ANALYZE, BUFFERS) of each kind's search SQL, as
the API builds it, to DIR/<kind>.txt.

    python -m bench.search --duration 20 --explain bench/explain
"""

from __future__ import annotations

import argparse
import base64
import math
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import orjson
import psycopg
from sqlalchemy import Connection, Select, create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from auth.policy import access_for
from auth.tokens import principal_from_claims
from bench import wrk
from bench.common import (
    FHIR_JSON,
    BenchError,
    Check,
    IssuerToken,
    add_http_arguments,
    check_api,
    credentials,
    make_client,
    percentile,
    print_checks,
)
from bench.population import SID_NATIONAL_ID
from fhir_api.scope import search_scope
from fhir_api.search import SearchScope
from fhir_api.search import parser as search_parser
from fhir_api.search import repository as search_repository

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/waha"
TARGETS = {
    "identifier": 0.010,
    "subject-code-date": 0.050,
    "encounter": 0.050,
    "name": 0.050,
    "date-sort": 0.050,
}
TARGET_IDENTIFIER_RPS = 1_000


@dataclass
class KindRun:
    """What the clients saw for one query kind."""

    kind: str
    requests: int = 0
    failures: int = 0
    elapsed: float = 0.0
    p50: float = math.nan
    p95: float = math.nan
    errors: list[str] = field(default_factory=list)
    driver: str = "python"

    @property
    def rps(self) -> float:
        """Return successful requests per second."""
        return self.requests / self.elapsed if self.elapsed else 0.0

    @classmethod
    def from_latencies(
        cls, kind: str, latencies: Sequence[float], failures: int, elapsed: float, errors: list[str]
    ) -> KindRun:
        """Summarise what the Python driver timed."""
        return cls(
            kind,
            requests=len(latencies),
            failures=failures,
            elapsed=elapsed,
            p50=percentile(latencies, 0.50),
            p95=percentile(latencies, 0.95),
            errors=errors,
        )


def _conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _sample(
    connection: psycopg.Connection[Any], template: str, params: tuple[object, ...]
) -> list[Any]:
    """Run a sampling query on ~2% of the table's pages; on a small store, on all of it."""
    for sample in ("TABLESAMPLE SYSTEM (2)", ""):
        # Only the fixed TABLESAMPLE clause is interpolated; values are parameters.
        sql = template.format(sample=sample)
        rows = connection.execute(sql.encode(), params).fetchall()
        if len(rows) >= 10:
            return rows
    return rows


def sample_queries(database_url: str, samples: int, seed: int) -> dict[str, list[str]]:
    """Return `Type?query` strings per kind, from values found in the store (read-only)."""
    rng = random.Random(seed)
    queries: dict[str, list[str]] = {}
    with psycopg.connect(_conninfo(database_url)) as connection:
        connection.read_only = True
        identifiers = _sample(
            connection,
            "SELECT t FROM fhir_resource {sample}, unnest(tokens) AS t "
            "WHERE resource_type = 'Patient' AND t LIKE %s LIMIT %s",
            # `_%`: a value after the bar, not the `system|` key every Patient has.
            (f"identifier={SID_NATIONAL_ID}|_%", samples),
        )
        queries["identifier"] = [
            "Patient?" + urlencode({"identifier": row[0].partition("=")[2]}) for row in identifiers
        ]
        observations = _sample(
            connection,
            "SELECT (SELECT r FROM unnest(refs) r WHERE r LIKE 'subject=%%' LIMIT 1), "
            "(SELECT t FROM unnest(tokens) t WHERE t LIKE 'code=http://loinc.org|%%' LIMIT 1), "
            "resource->>'effectiveDateTime' FROM fhir_resource {sample} "
            "WHERE resource_type = 'Observation' AND NOT deleted LIMIT %s",
            (samples,),
        )
        queries["subject-code-date"] = [
            "Observation?"
            + urlencode(
                {
                    "subject": subject.partition("=")[2],
                    "code": code.partition("=")[2],
                    "date": f"ge{effective[:10]}",
                }
            )
            for subject, code, effective in observations
            if subject and code and effective
        ]
        encounters = _sample(
            connection,
            "SELECT (SELECT r FROM unnest(refs) r WHERE r LIKE 'service-provider=%%' LIMIT 1), "
            "resource->'period'->>'start' FROM fhir_resource {sample} "
            "WHERE resource_type = 'Encounter' AND NOT deleted LIMIT %s",
            (samples,),
        )
        queries["encounter"] = []
        for provider, start in encounters:
            if not provider or not start:
                continue
            day = date.fromisoformat(start[:10])
            params = [
                ("service-provider", provider.partition("=")[2]),
                ("date", f"ge{day.isoformat()}"),
                ("date", f"lt{(day + timedelta(days=7)).isoformat()}"),
                ("_sort", "-date"),
                ("_include", "Encounter:subject"),
            ]
            queries["encounter"].append("Encounter?" + urlencode(params))
        # Sorted by a date without a window on it: the first page of a whole type, or of a code.
        codes = sorted({code.partition("=")[2] for _, code, _ in observations if code})
        queries["date-sort"] = [
            "Encounter?_sort=-date",
            "Encounter?_sort=date",
            "Patient?_sort=-birthdate",
            *("Observation?" + urlencode({"code": code, "_sort": "-date"}) for code in codes),
        ]
        names = _sample(
            connection,
            "SELECT value_normalized FROM fhir_search_string {sample} "
            "WHERE resource_type = 'Patient' AND param = 'family' LIMIT %s",
            (samples,),
        )
        queries["name"] = [
            "Patient?" + urlencode({"name": row[0][: max(4, len(row[0]) - 2)]}) for row in names
        ]
    for kind, found in queries.items():
        if not found:
            raise BenchError(f"the store has nothing to sample for {kind} searches")
        rng.shuffle(found)
    return queries


def _drive(
    clients: int, duration: float, work: Callable[[int, random.Random], float | None]
) -> tuple[list[float], int, float, list[str]]:
    """Run `work` in `clients` threads for `duration` s; return latencies, failures, time."""
    latencies: list[float] = []
    errors: list[str] = []
    failures = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def loop(number: int) -> None:
        nonlocal failures
        rng = random.Random(number)
        own: list[float] = []
        own_failures = 0
        own_errors: list[str] = []
        while time.perf_counter() < deadline:
            try:
                latency = work(number, rng)
            except (httpx.HTTPError, psycopg.Error, BenchError) as error:
                own_failures += 1
                own_errors.append(str(error)[:200] or type(error).__name__)
                continue
            if latency is not None:
                own.append(latency)
        with lock:
            latencies.extend(own)
            errors.extend(own_errors)
            failures += own_failures

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures, time.perf_counter() - started, errors


def measure_kind(args: argparse.Namespace, kind: str, queries: Sequence[str]) -> KindRun:
    """Send `queries` of one kind from `args.clients` clients for `args.duration` s."""
    if args.driver == "wrk" or (args.driver == "auto" and wrk.available()):
        return measure_kind_with_wrk(args, kind, queries)
    return measure_kind_in_python(args, kind, queries)


def measure_kind_with_wrk(args: argparse.Namespace, kind: str, queries: Sequence[str]) -> KindRun:
    """Send `queries` of one kind over `args.clients` wrk connections (warmed first, untimed)."""
    token = credentials(args)
    bearer = token.token() if isinstance(token, IssuerToken) else token
    headers = {"Accept": FHIR_JSON, "Authorization": f"Bearer {bearer}"}
    paths = ["/fhir/" + query for query in queries]

    def drive(some: Sequence[str], duration: float) -> wrk.WrkRun:
        return wrk.run(
            args.base_url,
            some,
            headers=headers,
            connections=args.clients,
            duration=duration,
            timeout=args.timeout,
        )

    try:
        drive(paths[:50], 2)  # warm the connections and caches
        measured = drive(paths, args.duration)
    except wrk.WrkError as error:
        raise BenchError(f"{kind}: {error}") from error
    return KindRun(
        kind,
        requests=measured.requests,
        failures=measured.failures,
        elapsed=measured.elapsed,
        p50=measured.p50,
        p95=measured.p95,
        errors=[f"{measured.failures} failed requests"] if measured.failures else [],
        driver="wrk",
    )


def measure_kind_in_python(args: argparse.Namespace, kind: str, queries: Sequence[str]) -> KindRun:
    """Send `queries` of one kind from Python client threads."""
    http_clients = [
        make_client(args.base_url, token=credentials(args), timeout=args.timeout)
        for _ in range(args.clients)
    ]

    def one(number: int, rng: random.Random) -> float:
        url = "/" + rng.choice(queries)
        started = time.perf_counter()
        response = http_clients[number].get(url)
        latency = time.perf_counter() - started
        if response.status_code != 200:
            raise BenchError(f"{kind}: HTTP {response.status_code}")
        return latency

    try:
        for client in http_clients:  # warm the connections and caches, untimed
            for query in queries[:5]:
                client.get("/" + query)
        latencies, failures, elapsed, errors = _drive(args.clients, args.duration, one)
    finally:
        for client in http_clients:
            client.close()
    return KindRun.from_latencies(kind, latencies, failures, elapsed, errors)


def measure_raw_lookup(args: argparse.Namespace, queries: Sequence[str]) -> KindRun:
    """Time the bare GIN lookup behind the identifier search over 8 connections."""
    keys = [f"identifier={dict(parse_qsl(q.partition('?')[2]))['identifier']}" for q in queries]
    connections = [
        psycopg.connect(_conninfo(args.database_url), options="-c jit=off")
        for _ in range(args.clients)
    ]
    statement = (
        "SELECT id FROM fhir_resource WHERE resource_type = 'Patient' AND NOT deleted "
        "AND tokens && %s::text[] LIMIT 2"
    )

    def one(number: int, rng: random.Random) -> float:
        started = time.perf_counter()
        connections[number].execute(statement, ([rng.choice(keys)],), prepare=True).fetchall()
        return time.perf_counter() - started

    try:
        latencies, failures, elapsed, errors = _drive(args.clients, args.duration, one)
    finally:
        for connection in connections:
            connection.close()
    return KindRun.from_latencies("raw identifier lookup", latencies, failures, elapsed, errors)


def server_settings(database_url: str) -> str:
    """Describe the PostgreSQL settings the figures depend on (docker-compose sets them)."""
    names = ("shared_buffers", "effective_cache_size", "random_page_cost", "jit")
    with psycopg.connect(_conninfo(database_url)) as connection:
        values = [connection.execute(f"SHOW {name}".encode()).fetchone() for name in names]
    pairs = zip(names, values, strict=True)
    shown = ", ".join(f"{name}={row[0] if row else '?'}" for name, row in pairs)
    return f"PostgreSQL: {shown}"


def _statistics_note(connection: Connection) -> str:
    """Describe when the store's tables were last analyzed: plans depend on it."""
    rows = connection.exec_driver_sql(
        "SELECT relname, n_live_tup, greatest(last_analyze, last_autoanalyze) "
        "FROM pg_stat_user_tables WHERE relname IN "
        "('fhir_resource', 'fhir_search_date', 'fhir_search_string', 'fhir_search_quantity') "
        "ORDER BY relname"
    ).all()
    return "\n".join(
        f"-- {name}: ~{live:,} rows, last analyzed {when}" for name, live, when in rows
    )


def caller_scope(args: argparse.Namespace) -> SearchScope:
    """Return the search scope of the caller the run acts as (`--as` or `--token`)."""
    auth = credentials(args)
    token = auth.token() if isinstance(auth, IssuerToken) else auth
    # Read, not verified: the claims only choose whose plans EXPLAIN shows;
    # the API checks the signature of every request the run makes.
    payload = token.split(".")[1]
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return search_scope(access_for(principal_from_claims(claims)))


def explain(args: argparse.Namespace, queries: dict[str, list[str]]) -> None:
    """Write EXPLAIN (ANALYZE, BUFFERS) of each kind's page query, as the API builds it.

    With the caller's scope in the SQL, as the API runs it for that caller: a
    unit's plans check each row against its care relationships.
    """
    folder = Path(args.explain)
    scope = caller_scope(args)
    caller = "a fixed token" if args.token else args.as_
    folder.mkdir(parents=True, exist_ok=True)
    url = args.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    # The API's engine runs with JIT off (hub.db.make_engine); the plans must match.
    engine = create_engine(url, connect_args={"options": "-c jit=off"})
    try:
        for kind, found in queries.items():
            query = found[0]
            resource_type, _, raw = query.partition("?")
            parsed = search_parser.parse_search(
                [resource_type], parse_qsl(raw), base_url=args.base_url.rstrip("/") + "/fhir"
            )
            # The plan the API would choose: a sorted date search may walk its dates.
            with Session(engine) as session:
                walk = search_repository.walks_dates(session, parsed.criteria, parsed.sort)
                sort_walk = search_repository.walks_sort_dates(
                    session, parsed.criteria, parsed.sort
                )
            statement = search_repository.first_page_statement(
                criteria=parsed.criteria,
                sort=parsed.sort,
                limit=parsed.count + 1,
                scope=scope,
                walk_dates=walk,
                walk_sort_dates=sort_walk,
            )
            compiled = statement.compile(engine, compile_kwargs={"render_postcompile": True})
            params = dict(compiled.params)
            with engine.connect() as connection:
                connection.exec_driver_sql("SET TRANSACTION READ ONLY")
                note = _statistics_note(connection)
                connection.exec_driver_sql(f"SET statement_timeout = {int(args.explain_timeout)}")
                try:
                    sql = "EXPLAIN (ANALYZE, BUFFERS) " + str(compiled)
                    rows = connection.exec_driver_sql(sql, params).fetchall()
                except OperationalError:
                    # Too slow to run: keep the plan the planner chose, without timings.
                    connection.rollback()
                    connection.exec_driver_sql("SET TRANSACTION READ ONLY")
                    sql = "EXPLAIN " + str(compiled)
                    rows = connection.exec_driver_sql(sql, params).fetchall()
                    note += f"\n-- EXPLAIN ANALYZE exceeded {args.explain_timeout} ms: plan only"
            plan = "\n".join(str(row[0]) for row in rows)
            text = f"-- {kind}: GET /fhir/{query} as {caller}\n{note}\n\n{compiled}\n\n{plan}\n"
            template = search_repository.first_page_template(
                criteria=parsed.criteria,
                sort=parsed.sort,
                limit=parsed.count + 1,
                scope=scope,
                walk_dates=walk,
                walk_sort_dates=sort_walk,
            )
            if template is not None:
                with engine.connect() as connection:
                    connection.exec_driver_sql(
                        f"SET statement_timeout = {int(args.explain_timeout)}"
                    )
                    try:
                        generic = generic_plan(connection, *template, analyze=True)
                    except psycopg.errors.QueryCanceled:
                        connection.rollback()
                        generic = generic_plan(connection, *template)
                        generic += f"\n-- EXPLAIN ANALYZE exceeded {args.explain_timeout} ms"
                text += (
                    "\n-- The same page as the reused statement, planned generically (blind to\n"
                    "-- the values), as PostgreSQL may come to plan a prepared statement:\n\n"
                    f"{generic}\n"
                )
            (folder / f"{kind}.txt").write_text(text, encoding="utf-8")
            print(f"  wrote {folder / f'{kind}.txt'}")
    finally:
        engine.dispose()


def generic_plan(
    connection: Connection,
    statement: Select[Any],
    values: dict[str, Any],
    *,
    analyze: bool = False,
    custom: bool = False,
) -> str:
    """Return EXPLAIN of a reused statement as PostgreSQL plans it generically (or custom).

    Inside the connection's transaction, which the caller ends: the plan mode
    goes with it. The prepared statement, which outlives transactions, is
    deallocated here, even when EXPLAIN fails (a timeout, say).
    """
    compiled = statement.compile(connection)
    state = compiled.construct_expanded_state({**compiled.construct_params(_check=False), **values})
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    # psycopg's placeholders become PREPARE's; its escaped percent signs, plain ones.
    sql = re.sub(r"%\((\w+)\)s", number, state.statement).replace("%%", "%")
    arguments = [state.parameters[name] for name in names]
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)  # noqa: S101 - psycopg is the driver
    # Client-side binding: EXECUTE takes its arguments as SQL literals.
    cursor = psycopg.ClientCursor(driver)
    mode = "force_custom_plan" if custom else "force_generic_plan"
    cursor.execute(f"SET LOCAL plan_cache_mode = {mode}")
    cursor.execute(f"PREPARE waha_explained AS {sql}")
    try:
        slots = ", ".join(["%s"] * len(arguments))
        options = "ANALYZE, BUFFERS" if analyze else "COSTS"
        # In a savepoint: a failed EXPLAIN leaves the transaction able to deallocate.
        with driver.transaction():
            cursor.execute(f"EXPLAIN ({options}) EXECUTE waha_explained({slots})", arguments)
            return "\n".join(str(row[0]) for row in cursor.fetchall())
    finally:
        # Rolling the savepoint back may have deallocated every prepared
        # statement of the connection (psycopg's DEALLOCATE ALL of its own cache).
        prepared = cursor.execute(
            "SELECT 1 FROM pg_prepared_statements WHERE name = 'waha_explained'"
        ).fetchone()
        if prepared:
            cursor.execute("DEALLOCATE waha_explained")


def search_checks(runs: Sequence[KindRun]) -> list[Check]:
    """Return the search figures against the issue's targets."""
    checks: list[Check] = []
    for run in runs:
        p95 = run.p95
        target = TARGETS[run.kind]
        checks.append(
            Check(
                f"search {run.kind} p95",
                f"{p95 * 1000:.1f} ms",
                f"< {target * 1000:.0f} ms",
                p95 < target,
            )
        )
        if run.kind == "identifier":
            checks.append(
                Check(
                    "search identifier rps",
                    f"{run.rps:,.0f}",
                    f">= {TARGET_IDENTIFIER_RPS:,}",
                    run.rps >= TARGET_IDENTIFIER_RPS,
                )
            )
        checks.append(
            Check(f"search {run.kind} failures", str(run.failures), "0", not run.failures)
        )
    return checks


def print_runs(runs: Sequence[KindRun], raw: KindRun | None, clients: int) -> None:
    """Print rps and latency per kind, and the API/raw ratio."""
    drivers = sorted({run.driver for run in runs})
    print(f"\nsearch, {clients} clients (load from {', '.join(drivers) or 'nothing'})")
    print(f"  {'kind':<24}{'rps':>9}{'p50 ms':>9}{'p95 ms':>9}{'fail':>6}")
    for run in [*runs, *([raw] if raw else [])]:
        p50, p95 = run.p50 * 1000, run.p95 * 1000
        print(f"  {run.kind:<24}{run.rps:>9,.0f}{p50:>9.1f}{p95:>9.1f}{run.failures:>6}")
        for error in sorted(set(run.errors))[:3]:
            print(f"      {error}")
    identifier = next((run for run in runs if run.kind == "identifier"), None)
    if raw and identifier and raw.rps:
        print(f"  API/raw identifier ratio  {identifier.rps / raw.rps:.2f}")


def run_all(args: argparse.Namespace) -> list[Check]:
    """Sample queries, optionally explain them, measure each kind; print and return checks."""
    check_api(args.base_url, token=credentials(args))
    print(server_settings(args.database_url))
    queries = sample_queries(args.database_url, args.samples, args.seed)
    print(", ".join(f"{kind}: {len(found)} queries" for kind, found in queries.items()))
    if args.explain:
        explain(args, queries)
    kinds = [k for k in queries if not args.kinds or k in args.kinds.split(",")]
    runs = [measure_kind(args, kind, queries[kind]) for kind in kinds]
    raw = measure_raw_lookup(args, queries["identifier"])
    print_runs(runs, raw, args.clients)
    checks = search_checks(runs)
    print_checks("search targets", checks)
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the search benchmark's options to a parser."""
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="read-only sampling")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per query kind")
    parser.add_argument("--samples", type=int, default=500, help="sampled queries per kind")
    parser.add_argument("--seed", type=int, default=20261123, help="shuffle seed")
    parser.add_argument("--kinds", default="", help="comma-separated subset of kinds")
    parser.add_argument(
        "--driver",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk when installed (auto), or Python client threads",
    )
    parser.add_argument("--explain", default="", help="folder for EXPLAIN ANALYZE plans")
    parser.add_argument(
        "--explain-timeout", type=int, default=20_000, help="ms before EXPLAIN drops ANALYZE"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search benchmark from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.search", description="Measure FHIR search throughput and latency."
    )
    add_http_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_all(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
