"""The Celery application (Redis broker) and the outbox relay tasks."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import structlog
from celery import Celery, Task, shared_task
from celery.signals import celeryd_init, worker_process_init
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from fhir_api.writes import RESOURCE_CHANGED
from hub import db, outbox
from hub.logging import configure_logging
from hub.settings import Settings, get_settings
from imaging_store.derivatives.handlers import handle_resource_changed

log = structlog.get_logger()

DRAIN_TASK = "hub.drain_outbox"
PURGE_TASK = "hub.purge_outbox"
PURGE_INTERVAL_SECONDS = 3600.0
PURGE_BATCH = 5_000
_last_enqueue = 0.0
# At most one drain request per interval from a process; the periodic drain
# covers whatever a skipped request would have delivered.
ENQUEUE_INTERVAL_SECONDS = 0.2
# A drain request nobody consumed for this long is discarded: while no worker
# runs, the API would otherwise pile up thousands of identical requests, and
# the first drain after start-up delivers every pending event anyway.
DRAIN_REQUEST_EXPIRES_SECONDS = 60
PERIODIC_DRAIN_SECONDS = 2.0
# One task delivers at most this many batches, then hands the rest to a fresh
# task, so a backlog cannot hold a worker slot (or a warm shutdown) for minutes.
MAX_BATCHES_PER_TASK = 25
_IMPORTED_IN_PID = os.getpid()


def make_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app from the settings."""
    settings = settings or get_settings()
    app = Celery("waha", broker=str(settings.redis_url), backend=None)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        # structlog already writes JSON lines to stdout; Celery's redirect would
        # wrap each of them in a second, WARNING-level log line.
        worker_redirect_stdouts=False,
        beat_schedule={
            "purge-outbox": {
                "task": PURGE_TASK,
                "schedule": PURGE_INTERVAL_SECONDS,
                "options": {"expires": PURGE_INTERVAL_SECONDS},
            },
            "drain-outbox": {
                "task": DRAIN_TASK,
                "schedule": PERIODIC_DRAIN_SECONDS,
                "options": {"expires": PERIODIC_DRAIN_SECONDS * 5},
            },
            "sweep-expired-uploads": {
                "task": "imaging_store.sweep_expired_uploads",
                "schedule": 3600,
                "options": {"expires": 3600},
            },
            "purge-deleted-binaries": {
                "task": "imaging_store.purge_deleted_binaries",
                "schedule": 3600,
                "options": {"expires": 3600},
            },
            "sweep-orphan-binaries": {
                "task": "imaging_store.sweep_orphan_binaries",
                "schedule": 3600,
                "options": {"expires": 3600},
            },
            # Lists the whole bucket: daily, strays are rare (crashes only).
            "sweep-stray-objects": {
                "task": "imaging_store.sweep_stray_objects",
                "schedule": 86400,
                "options": {"expires": 86400},
            },
        },
        imports=(
            "hub.celery_app",
            "imaging_store.uploads.tasks",
            "imaging_store.retention_tasks",
        ),
    )
    return app


celery_app = make_celery()


def register_outbox_handlers() -> None:
    """Subscribe the domains' handlers to outbox topics (in worker processes only).

    Not at import: the API imports this module to request drains, and a test
    process registers handlers bound to its own settings.
    """
    # Thumbnails, previews, quality checks and DICOM studies follow stored Binaries.
    outbox.register_handler(RESOURCE_CHANGED, handle_resource_changed)


@celeryd_init.connect
def _register_handlers(**_: object) -> None:
    register_outbox_handlers()


@worker_process_init.connect
def _init_worker(**_: object) -> None:
    configure_logging(get_settings())
    bind = db.session_factory.kw.get("bind")
    if isinstance(bind, Engine) and os.getpid() != _IMPORTED_IN_PID:
        # A forked pool process must not reuse the parent's pooled connections.
        bind.dispose(close=False)
    _ensure_database()


def _ensure_database() -> None:
    """Bind the session factory from the settings unless something bound it already."""
    # The thread pool never sends worker_process_init; the solo pool sends it
    # in the process of an embedded test worker, whose factory is bound to the
    # test database and must not be rebound to the configured one.
    if db.session_factory.kw.get("bind") is None:
        db.configure(get_settings())


def enqueue_drain() -> None:
    """Ask a worker to deliver pending outbox events soon."""
    global _last_enqueue  # noqa: PLW0603 - per-process throttle
    now = time.monotonic()
    if now - _last_enqueue < ENQUEUE_INTERVAL_SECONDS:
        return
    _last_enqueue = now
    celery_app.send_task(DRAIN_TASK, expires=DRAIN_REQUEST_EXPIRES_SECONDS)


# Idempotent by construction: a delivered event is 'done' in the same
# transaction as its handlers' writes, and rows are claimed with SKIP LOCKED,
# so a redelivered or concurrent drain finds nothing left to do. A transient
# database error rolls the batch back and the task retries; once retries are
# spent the events stay pending for the periodic drain, never lost.
@shared_task(
    name=DRAIN_TASK,
    acks_late=True,
    ignore_result=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=5,
    bind=True,
)
def drain_outbox(self: Task) -> int:  # type: ignore[type-arg]  # Task is generic only in stubs
    """Deliver due outbox events to their handlers; return how many were handled."""
    settings = get_settings()
    _ensure_database()
    handled = 0
    for _ in range(MAX_BATCHES_PER_TASK):
        with db.session_scope() as session:
            count = outbox.drain(
                session,
                batch_size=settings.outbox_batch_size,
                max_attempts=settings.outbox_max_attempts,
            )
        handled += count
        if count < settings.outbox_batch_size:
            break
    else:
        self.apply_async(expires=DRAIN_REQUEST_EXPIRES_SECONDS)
        log.info("hub.outbox_backlog_continues", events=handled)
    if handled:
        log.info("hub.outbox_drained", events=handled)
    return handled


@shared_task(name=PURGE_TASK, acks_late=True, ignore_result=True)
def purge_outbox() -> int:
    """Remove delivered outbox events past their retention, in short batches."""
    settings = get_settings()
    _ensure_database()
    purged = 0
    while True:
        with db.session_scope() as session:
            count = outbox.purge_delivered(
                session,
                older_than=timedelta(hours=settings.outbox_retention_hours),
                limit=PURGE_BATCH,
            )
        purged += count
        if count < PURGE_BATCH:
            break
    if purged:
        log.info("hub.outbox_purged", events=purged)
    return purged
