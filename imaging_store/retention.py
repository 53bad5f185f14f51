"""Retention of Binary objects: purge deleted ones, sweep orphans, follow Media deletions.

A deleted Binary keeps its FHIR history (the record store's versions are
never touched here); its bytes and derived JPEGs stay in object storage for
the retention period, then go, together with the metadata rows that pointed
at them. An orphan is a live Binary that no resource links and that names no
patient or encounter (X-Security-Context or Binary.securityContext), older
than the orphan age: it gets a FHIR delete by the system, so its history
says so, and its objects go at once. A stray object, which no row owns
(a crash between storing it and recording it), goes after the stray age.

Database changes are flushed before objects are removed, and the caller's
transaction commits after: if the store is down, StorageUnavailable rolls
back every row change of the batch and the task retries. Objects already
removed for earlier rows of that batch are removed again (a no-op) by the
retry, so no row outlives its object for longer than the retry delay.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog
from sqlalchemy.orm import Session

from fhir_api import service as fhir_service
from fhir_api.context import SYSTEM_CONTEXT
from fhir_api.writes import EntryRequest, WriteSettings
from hub.errors import WahaError
from imaging_store import media, repository
from imaging_store.derivatives.service import DERIVATIVE_PREFIX
from imaging_store.models import BinaryObjectRow
from imaging_store.storage import KEY_PREFIX, BinaryStorage
from imaging_store.uploads.service import STAGING_PREFIX

log = structlog.get_logger()

# How many rows one task run handles; a backlog is drained by the next runs.
DEFAULT_BATCH = 500
# How many listed keys one ownership query checks.
STRAY_BATCH = 500


def _remove_objects(storage: BinaryStorage, row: BinaryObjectRow) -> None:
    storage.remove(row.object_key)
    storage.remove_prefix(f"{DERIVATIVE_PREFIX}{row.id}/")


def _forget_binary(session: Session, row: BinaryObjectRow) -> None:
    repository.delete_binary_derivative_rows(session, row.id)
    repository.delete_purged_binary_object(session, row.id)


def purge_deleted_binaries(
    session: Session, *, storage: BinaryStorage, now: datetime, retention: timedelta, limit: int
) -> int:
    """Remove the objects and rows of Binaries deleted longer ago than `retention`."""
    rows = repository.lock_purgeable_binary_objects(
        session, deleted_before=now - retention, limit=limit
    )
    for row in rows:
        _forget_binary(session, row)
    # Row changes first: a database error then removes nothing from the store.
    session.flush()
    for row in rows:
        _remove_objects(storage, row)
    if rows:
        log.info("imaging_store.binaries_purged", binaries=len(rows))
    return len(rows)


def sweep_orphan_binaries(
    session: Session,
    *,
    storage: BinaryStorage,
    now: datetime,
    max_age: timedelta,
    limit: int,
    base_url: str,
) -> int:
    """Delete Binaries older than `max_age` that nothing links and that name no record."""
    # A Media citing one of these takes the row's lock first (the linker
    # locks the Binary's row), so a sweep and a new link cannot both win.
    rows = repository.lock_unlinked_binary_objects(
        session, created_before=now - max_age, limit=limit
    )
    write_settings = WriteSettings(base_url=base_url)
    for row in rows:
        # The system deletes the resource so its history records who did;
        # an already deleted or missing resource is fine (200/204/404/410).
        fhir_service.run_interaction(
            session,
            EntryRequest(method="DELETE", resource_type="Binary", resource_id=row.id),
            context=SYSTEM_CONTEXT,
            settings=write_settings,
        )
        _forget_binary(session, row)
    session.flush()
    for row in rows:
        _remove_objects(storage, row)
    if rows:
        log.info("imaging_store.orphan_binaries_swept", binaries=len(rows))
    return len(rows)


def sweep_stray_objects(
    session: Session, *, storage: BinaryStorage, now: datetime, min_age: timedelta
) -> int:
    """Remove objects and multipart uploads older than `min_age` that no row owns.

    Walks every key Waha writes (Binaries, staged upload tails, derived
    images); anything else in the bucket is left alone. Only reads the
    database, so the caller may run it in autocommit. Returns how many went.
    """
    cutoff = now - min_age
    removed = 0
    for prefix in (KEY_PREFIX, STAGING_PREFIX, DERIVATIVE_PREFIX):
        old: list[str] = []
        for key, modified in storage.list_objects(prefix):
            if modified < cutoff:
                old.append(key)
            if len(old) == STRAY_BATCH:
                removed += _remove_strays(session, storage, old, cutoff=cutoff)
                old = []
        removed += _remove_strays(session, storage, old, cutoff=cutoff)
    # A crash between starting a multipart upload and recording it in the
    # resumable upload's row leaves parts that no listing of objects shows.
    uploads = [
        (key, upload_id)
        for key, upload_id, started in storage.list_multipart_uploads(KEY_PREFIX)
        if started < cutoff
    ]
    for start in range(0, len(uploads), STRAY_BATCH):
        batch = uploads[start : start + STRAY_BATCH]
        owned = repository.owned_multipart_uploads(session, batch, binaries=KEY_PREFIX)
        for key, upload_id in batch:
            if upload_id not in owned:
                storage.abort_multipart(key, multipart_upload_id=upload_id)
                removed += 1
    if removed:
        log.warning("imaging_store.stray_objects_removed", objects=removed)
    return removed


def _remove_strays(
    session: Session, storage: BinaryStorage, keys: list[str], *, cutoff: datetime
) -> int:
    if not keys:
        return 0
    owned = repository.owned_object_keys(
        session, keys, binaries=KEY_PREFIX, staging=STAGING_PREFIX, derivatives=DERIVATIVE_PREFIX
    )
    removed = 0
    for key in keys:
        if key in owned:
            continue
        # A key chosen by a client (a Binary id in a bundle) or fixed (a derived
        # image) may be written again by a retry since it was listed: its row
        # is then on its way, and the object is new.
        modified = storage.modified_at(key)
        if modified is None or modified >= cutoff:
            continue
        storage.remove(key)
        removed += 1
    return removed


def on_media_deleted(
    session: Session,
    *,
    resource_type: str,
    resource_id: str,
    deleted_version: int,
    now: datetime,
    base_url: str,
) -> list[str]:
    """Delete the Binaries a just-deleted Media (or DocumentReference) held, unless still linked.

    Returns the ids of the Binaries deleted; their objects go at the retention purge.
    """
    if deleted_version < 2:
        return []
    write_settings = WriteSettings(base_url=base_url)
    try:
        fhir_service.run_interaction(
            session,
            EntryRequest(method="GET", resource_type=resource_type, resource_id=resource_id),
            context=SYSTEM_CONTEXT,
            settings=write_settings,
        )
    except WahaError as error:
        if error.status != 410:
            raise
    else:
        # Written again since the event (outbox handlers run later): its
        # current links are live, and the new version decides.
        log.info("imaging_store.media_deletion_superseded", resource_id=resource_id)
        return []
    # The deletion's own version is a tombstone; the one before says what
    # the resource pointed at.
    previous = fhir_service.run_interaction(
        session,
        EntryRequest(
            method="GET",
            resource_type=resource_type,
            resource_id=resource_id,
            version_id=str(deleted_version - 1),
        ),
        context=SYSTEM_CONTEXT,
        settings=write_settings,
    )
    # A deleted resource links nothing: without this, its stale links would
    # keep every Binary it cited alive forever (and out of the orphan sweep).
    repository.delete_binary_links_of(session, resource_type, resource_id)
    deleted: list[str] = []
    cited = media.cited_binaries(previous.resource or {}, base_url=base_url)
    for binary_id in dict.fromkeys(item.binary_id for item in cited):
        row = repository.lock_binary_object(session, binary_id)
        if row is None or row.deleted_at is not None:
            continue
        if repository.count_binary_links(session, binary_id) > 0:
            log.info("imaging_store.binary_kept", binary_id=binary_id, reason="linked")
            continue
        fhir_service.run_interaction(
            session,
            EntryRequest(method="DELETE", resource_type="Binary", resource_id=binary_id),
            context=SYSTEM_CONTEXT,
            settings=write_settings,
        )
        repository.delete_binary_object(session, binary_id, at=now)
        deleted.append(binary_id)
    if deleted:
        log.info(
            "imaging_store.media_binaries_deleted",
            resource_type=resource_type,
            resource_id=resource_id,
            binaries=len(deleted),
        )
    return deleted
