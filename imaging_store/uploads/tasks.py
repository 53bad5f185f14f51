"""Celery tasks of resumable uploads."""

from __future__ import annotations

from datetime import UTC, datetime

from celery import shared_task

from hub.db import session_scope
from hub.settings import get_settings
from imaging_store.errors import StorageUnavailable
from imaging_store.service import binary_storage
from imaging_store.uploads import service


@shared_task(
    name="imaging_store.sweep_expired_uploads",
    acks_late=True,
    autoretry_for=(StorageUnavailable,),
    retry_backoff=True,
    max_retries=8,
)
def sweep_expired_uploads() -> int:
    """Remove resumable uploads past their expiry, with their stored parts."""
    with session_scope() as session:
        return service.sweep_expired_uploads(
            session, storage=binary_storage(get_settings()), now=datetime.now(UTC)
        )
