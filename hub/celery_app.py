"""The Celery application (Redis broker) and the outbox relay tasks."""

from __future__ import annotations

import time

import structlog
from celery import Celery, shared_task
from celery.signals import worker_process_init

from hub import db, outbox
from hub.logging import configure_logging
from hub.settings import get_settings

log = structlog.get_logger()

DRAIN_TASK = "hub.drain_outbox"
_last_enqueue = 0.0
# At most one drain request per interval from a process; the periodic drain
# covers whatever a skipped request would have delivered.
ENQUEUE_INTERVAL_SECONDS = 0.2


def make_celery() -> Celery:
    """Build the Celery app from the settings."""
    settings = get_settings()
    app = Celery("waha", broker=str(settings.redis_url), backend=None)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        beat_schedule={
            "drain-outbox": {"task": DRAIN_TASK, "schedule": 2.0},
        },
        imports=("hub.celery_app",),
    )
    return app


celery_app = make_celery()


@worker_process_init.connect
def _init_worker(**_: object) -> None:
    settings = get_settings()
    configure_logging(settings)
    db.configure(settings)


def enqueue_drain() -> None:
    """Ask a worker to deliver pending outbox events soon."""
    global _last_enqueue  # noqa: PLW0603 - per-process throttle
    now = time.monotonic()
    if now - _last_enqueue < ENQUEUE_INTERVAL_SECONDS:
        return
    _last_enqueue = now
    celery_app.send_task(DRAIN_TASK)


@shared_task(name=DRAIN_TASK, acks_late=True, ignore_result=True)
def drain_outbox() -> int:
    """Deliver due outbox events to their handlers; return how many were handled."""
    settings = get_settings()
    db.configure(settings)
    handled = 0
    while True:
        with db.session_scope() as session:
            count = outbox.drain(
                session,
                batch_size=settings.outbox_batch_size,
                max_attempts=settings.outbox_max_attempts,
            )
        handled += count
        if count < settings.outbox_batch_size:
            break
    if handled:
        log.info("hub.outbox_drained", events=handled)
    return handled
