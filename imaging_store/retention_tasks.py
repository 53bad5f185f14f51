"""Celery tasks of Binary retention: the purge of deleted Binaries and the orphan sweep."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from celery import shared_task

from hub.db import read_scope, session_scope
from hub.settings import get_settings
from imaging_store import retention
from imaging_store.errors import StorageUnavailable
from imaging_store.service import binary_storage

PURGE_TASK = "imaging_store.purge_deleted_binaries"
SWEEP_TASK = "imaging_store.sweep_orphan_binaries"
STRAY_TASK = "imaging_store.sweep_stray_objects"


RETRIED_ON_STORAGE_OUTAGE: dict[str, Any] = {
    "acks_late": True,
    "ignore_result": True,
    "autoretry_for": (StorageUnavailable,),
    "retry_backoff": True,
    "retry_jitter": True,
    "max_retries": 8,
}


# Idempotent: a purged or swept Binary has no row left to select, and
# removing an object that is already gone is fine. A store outage rolls the
# batch back (StorageUnavailable propagates out of session_scope) and retries.
@shared_task(name=PURGE_TASK, **RETRIED_ON_STORAGE_OUTAGE)
def purge_deleted_binaries() -> int:
    """Remove the objects of Binaries deleted longer ago than the retention period."""
    settings = get_settings()
    with session_scope() as session:
        return retention.purge_deleted_binaries(
            session,
            storage=binary_storage(settings),
            now=datetime.now(UTC),
            retention=timedelta(days=settings.binary_retention_days),
            limit=retention.DEFAULT_BATCH,
        )


@shared_task(name=SWEEP_TASK, **RETRIED_ON_STORAGE_OUTAGE)
def sweep_orphan_binaries() -> int:
    """Delete uploaded Binaries that nothing linked within the orphan age."""
    settings = get_settings()
    with session_scope() as session:
        return retention.sweep_orphan_binaries(
            session,
            storage=binary_storage(settings),
            now=datetime.now(UTC),
            max_age=timedelta(hours=settings.orphan_binary_hours),
            limit=retention.DEFAULT_BATCH,
            base_url=settings.fhir_base_url,
        )


@shared_task(name=STRAY_TASK, **RETRIED_ON_STORAGE_OUTAGE)
def sweep_stray_objects() -> int:
    """Remove objects that no row owns, left by a crash between storing and recording."""
    settings = get_settings()
    # Autocommit: the walk of a large bucket holds no transaction (and no
    # table lock a migration would wait for) between its queries.
    with read_scope() as session:
        return retention.sweep_stray_objects(
            session,
            storage=binary_storage(settings),
            now=datetime.now(UTC),
            min_age=timedelta(hours=settings.stray_object_hours),
        )
