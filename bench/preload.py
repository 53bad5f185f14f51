"""Preload a large store (default 1M resources) in-process, with several worker processes.

No HTTP: each worker process configures its own engine (`hub.db.configure`) and
writes visit bundles through `fhir_api.service.process_bundle`, one transaction per
bundle, as the API would. Bundle identifiers are deterministic, so running it
again with the same arguments replays stored answers instead of writing twice
(a stopped preload resumes cheaply).

    python -m bench.preload --resources 1000000 --workers 2
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from multiprocessing.queues import Queue

from pydantic import PostgresDsn
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from bench.loader import LoadCounts, Writer, load_reference_resources, submit, unit_context
from bench.population import reference_resources, visit_bundle, visit_plan
from hub import db
from hub.settings import Settings, get_settings

PROGRESS_EVERY_BUNDLES = 50
PROGRESS_EVERY_SECONDS = 5.0
SAMPLE_VISITS = 400


@dataclass(frozen=True)
class PreloadSpec:
    """The population to write; every worker rebuilds the same plan from it."""

    seed: int
    patients: int
    visits_per_patient: int
    units: int
    start: date
    months: int
    bundles: int


def _settings(database_url: str | None) -> Settings:
    if database_url is None:
        return get_settings()
    return Settings(database_url=PostgresDsn(database_url))


def plan_size(
    seed: int, *, resources: int, visits_per_patient: int, units: int, start: date, months: int
) -> PreloadSpec:
    """Choose patients and bundles so that about `resources` resources get stored."""
    sample = visit_plan(
        seed,
        patients=max(1, SAMPLE_VISITS // visits_per_patient),
        visits_per_patient=visits_per_patient,
        units=units,
        start=start,
        months=months,
    )
    # Each visit stores its entries but the Patient, which only its first visit creates.
    per_visit = sum(len(visit_bundle(seed, visit)["entry"]) - 1 for visit in sample) / len(sample)
    visits_per_patient_seen = len(sample) / max(1, SAMPLE_VISITS // visits_per_patient)
    per_patient = 1 + visits_per_patient_seen * per_visit
    patients = max(1, math.ceil(resources / per_patient))
    bundles = len(
        visit_plan(
            seed,
            patients=patients,
            visits_per_patient=visits_per_patient,
            units=units,
            start=start,
            months=months,
        )
    )
    return PreloadSpec(seed, patients, visits_per_patient, units, start, months, bundles)


def _worker(
    worker: int,
    workers: int,
    spec: PreloadSpec,
    database_url: str | None,
    progress: Queue[tuple[int, LoadCounts, bool]],
) -> None:
    settings = _settings(database_url)
    db.configure(settings)
    writer = Writer.from_settings(settings)
    plan = visit_plan(
        spec.seed,
        patients=spec.patients,
        visits_per_patient=spec.visits_per_patient,
        units=spec.units,
        start=spec.start,
        months=spec.months,
    )
    # Interleaved slices keep every worker in the same months, as concurrent units would be.
    pending = LoadCounts()
    for number in range(worker, len(plan), workers):
        visit = plan[number]
        context = unit_context(visit.stop.unit.id, f"preload-{spec.seed}-{number}")
        pending.add(submit(visit_bundle(spec.seed, visit), context=context, writer=writer))
        if pending.bundles >= PROGRESS_EVERY_BUNDLES:
            progress.put((worker, pending, False))
            pending = LoadCounts()
    progress.put((worker, pending, True))


def _print_progress(counts: LoadCounts, spec: PreloadSpec, started: float) -> None:
    elapsed = time.perf_counter() - started
    rate = counts.created / elapsed if elapsed else 0.0
    share = counts.bundles / spec.bundles if spec.bundles else 1.0
    print(
        f"  {elapsed:7.0f} s  bundles {counts.bundles:,}/{spec.bundles:,} ({share:.0%})  "
        f"resources created {counts.created:,} ({rate:,.0f}/s)  failures {counts.failures:,}",
        flush=True,
    )


def preload(
    spec: PreloadSpec, *, workers: int, database_url: str | None
) -> tuple[LoadCounts, float]:
    """Write the reference data, then the visits from `workers` processes; return counts."""
    settings = _settings(database_url)
    db.configure(settings)
    references = reference_resources(
        spec.seed, units=spec.units, start=spec.start, months=spec.months
    )
    reference_counts = load_reference_resources(references, writer=Writer.from_settings(settings))
    if reference_counts.failures:
        raise RuntimeError(f"reference data refused: {reference_counts.errors}")
    print(f"  reference data: {len(references):,} resources", flush=True)

    context = multiprocessing.get_context("spawn")
    progress: Queue[tuple[int, LoadCounts, bool]] = context.Queue()
    processes = [
        context.Process(
            target=_worker,
            args=(worker, workers, spec, database_url, progress),
            name=f"preload-{worker}",
        )
        for worker in range(workers)
    ]
    started = time.perf_counter()
    for process in processes:
        process.start()
    total = LoadCounts()
    finished: set[int] = set()
    last_print = started
    while len(finished) < workers:
        try:
            worker, counts, done = progress.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                for process in processes:
                    process.terminate()
                raise RuntimeError(
                    f"worker {dead[0].name} exited with {dead[0].exitcode}"
                ) from None
            continue
        total.add(counts)
        if done:
            finished.add(worker)
        if time.perf_counter() - last_print >= PROGRESS_EVERY_SECONDS:
            _print_progress(total, spec, started)
            last_print = time.perf_counter()
    for process in processes:
        process.join()
    elapsed = time.perf_counter() - started
    _print_progress(total, spec, started)
    return total, elapsed


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preload from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.preload", description="Preload a large store in-process."
    )
    parser.add_argument("--resources", type=int, default=1_000_000, help="about this many")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--visits-per-patient", type=int, default=4)
    parser.add_argument("--start", type=date.fromisoformat, default=date(2025, 6, 1))
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument(
        "--database-url",
        default=None,
        help="postgresql+psycopg:// URL (default: WAHA_DATABASE_URL / the settings)",
    )
    args = parser.parse_args(argv)
    spec = plan_size(
        args.seed,
        resources=args.resources,
        visits_per_patient=args.visits_per_patient,
        units=args.units,
        start=args.start,
        months=args.months,
    )
    print(
        f"Preload: ~{args.resources:,} resources = {spec.patients:,} patients, "
        f"{spec.bundles:,} visit bundles, {spec.units} units, {args.workers} workers",
        flush=True,
    )
    counts, elapsed = preload(spec, workers=args.workers, database_url=args.database_url)
    print(
        f"\nPreload done: {counts.created:,} resources created from {counts.bundles:,} bundles "
        f"in {elapsed:,.0f} s ({counts.created / elapsed if elapsed else 0:,.0f} resources/s); "
        f"{counts.failures:,} bundles failed"
    )
    for error, count in sorted(counts.errors.items(), key=lambda item: -item[1])[:5]:
        print(f"  {count:>8} x {error}")
    analyze_store(str(get_settings().migration_database_url))
    return 1 if counts.failures else 0


def analyze_store(owner_url: str) -> None:
    """Vacuum and analyze the store after a bulk load, as the schema owner.

    Without statistics the planner picks the wrong indexes on a fresh million-row
    store, and without a vacuum GIN pending lists are emptied only by writers;
    a server with autovacuum off (or behind) never catches up by itself.
    """
    started = time.monotonic()
    engine = create_engine(owner_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text("VACUUM (ANALYZE)"))
    except DBAPIError as error:
        print(f"VACUUM (ANALYZE) failed ({type(error.orig).__name__}); run it as the owner")
        return
    finally:
        engine.dispose()
    print(f"VACUUM (ANALYZE) done in {time.monotonic() - started:,.0f} s")


if __name__ == "__main__":
    sys.exit(main())
