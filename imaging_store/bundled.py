"""Binary resources that arrive inside a Bundle (or any generic write): bytes to object storage.

`POST /fhir/Binary` has its own route, but a Binary with base64 `data` in a
transaction or batch entry goes through the record store's generic write
path. A preparer registered for "Binary" runs there, inside the bundle's
transaction and with the entry's final id: it decodes, size-checks and
sniffs the bytes as an upload is, writes the `binary_object` row, puts the
object under `binaries/<id>`, and removes `data`, so that PostgreSQL keeps the
same data-less Binary as after an upload (DESIGN.md "Imaging contract").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from fhir_api.context import RequestContext
from hub.errors import Issue, WahaError
from hub.settings import Settings
from imaging_store import repository
from imaging_store import service as binary_service
from imaging_store.errors import BinaryImmutable, InvalidBinary, StorageUnavailable
from imaging_store.models import BinaryObjectRow
from imaging_store.sniffing import sniff_content_type
from imaging_store.storage import BinaryStorage, StorageConfig, object_key, storage_for

log = structlog.get_logger()

JSONObject = dict[str, Any]
DATA_PATH = "Binary.data"
# session.info key of the objects put during the session's open transaction.
_PENDING_KEY = "imaging_store.bundled_objects"
_LISTENING_KEY = "imaging_store.bundled_listening"


@dataclass(frozen=True, slots=True)
class BundledBinaryStore:
    """The write-engine preparer of Binary (see `store_for`).

    Frozen, so two apps built with the same settings register one preparer,
    not two (`register_preparer` compares by equality).
    """

    storage: StorageConfig
    max_binary_bytes: int

    def __call__(self, session: Session, resource: JSONObject, context: RequestContext) -> None:
        """Move the Binary's `data` to object storage and record it."""
        store_bundled_binary(
            session,
            resource,
            storage=storage_for(self.storage),
            limit=self.max_binary_bytes,
            owner=context.owner,
        )


def store_for(settings: Settings) -> BundledBinaryStore:
    """Return the preparer to register for "Binary"."""
    return BundledBinaryStore(
        storage=binary_service.storage_config(settings), max_binary_bytes=settings.max_binary_bytes
    )


@dataclass(frozen=True, slots=True)
class _PendingObject:
    """An object put during a transaction that may still roll back."""

    key: str
    storage: BinaryStorage
    transaction: SessionTransaction


def _at_data(error: WahaError) -> WahaError:
    # The whole problem is the content, so every issue points at Binary.data
    # (the write engine then places it under Bundle.entry[n].resource).
    error.issues = [
        Issue(issue.code, issue.diagnostics, issue.expression or DATA_PATH, issue.severity)
        for issue in error.issues
    ]
    return error


def _refuse_without_data(session: Session, binary_id: str) -> None:
    # A Binary of the record store is its bytes: one without data is only a
    # new version of a stored one (its metadata, e.g. what record_upload
    # writes itself after adding the row), never a Binary without content.
    # The session's own row first: record_upload added it just before.
    if repository.get_binary_object(session, binary_id, use_identity_map=True) is None:
        raise InvalidBinary(
            "Binary.data must carry the content as base64",
            issues=[Issue("required", "Binary.data is missing", DATA_PATH)],
        )


def store_bundled_binary(
    session: Session,
    resource: JSONObject,
    *,
    storage: BinaryStorage,
    limit: int,
    owner: str,
) -> None:
    """Store a written Binary's `data` in object storage and remove it from the resource."""
    binary_id = resource.get("id")
    if not isinstance(binary_id, str):
        raise InvalidBinary("a Binary needs its id before its content is stored")
    if "data" not in resource:
        _refuse_without_data(session, binary_id)
        return
    data = resource["data"]
    # R4 base64Binary allows whitespace between quads (MIME-wrapped lines);
    # the upload path's strict decoder does not, so it goes first.
    unwrapped = {**resource, "data": "".join(data.split()) if isinstance(data, str) else data}
    try:
        _, content = binary_service.binary_from_json(unwrapped, limit=limit)
    except WahaError as error:
        raise _at_data(error) from None
    try:
        try:
            content_type = sniff_content_type(content.head, valid_text=content.valid_text)
        except WahaError as error:
            raise _at_data(error) from None
        existing = repository.get_binary_object(session, binary_id)
        if existing is not None:
            # Stored bytes never change; the same bytes again (a unit's retried
            # PUT) are a no-op, so the engine sees unchanged content.
            if existing.deleted_at is not None or existing.sha256 != content.sha256:
                raise BinaryImmutable(
                    f"Binary/{binary_id} has stored content; a new upload makes a new Binary",
                    issues=[Issue("not-supported", "stored bytes never change", DATA_PATH)],
                )
        else:
            context_reference = (resource.get("securityContext") or {}).get("reference")
            row = repository.add_binary_object(
                session,
                BinaryObjectRow(
                    id=binary_id,
                    content_type=content_type,
                    size=content.size,
                    sha256=content.sha256,
                    sha1=content.sha1,
                    object_key=object_key(binary_id),
                    owner_client_id=owner,
                    security_context=(
                        context_reference if isinstance(context_reference, str) else None
                    ),
                ),
            )
            content.store(storage, row.object_key, content_type)
            _remove_on_rollback(session, storage, row.object_key)
            log.info(
                "imaging_store.bundled_binary_stored",
                binary_id=binary_id,
                content_type=content_type,
                size=content.size,
                owner=owner,
            )
    finally:
        content.close()
    # As for a JSON upload: the sniffed type replaces the declared one.
    del resource["data"]
    resource["contentType"] = existing.content_type if existing is not None else content_type


# Cleanup of objects whose transaction rolls back.
#
# The object is put inside the database transaction, before the entries after
# it are prepared and written; any later failure (another entry's preparer, an
# If-Match, the commit itself) rolls the row back and would leave the object
# behind. The orphan sweep only looks at rows, so it would never find such an
# object: the session itself removes it when the transaction (or the batch
# entry's savepoint) it was put in rolls back. Session events rather than a
# try/except in the preparer, because the failure happens after the preparer
# returned, in code the imaging store does not own. If the store is down at
# that moment the key is logged for an operator.


def _remove_on_rollback(session: Session, storage: BinaryStorage, key: str) -> None:
    """Remove the object `key` if the transaction it was put in does not commit."""
    if not session.info.get(_LISTENING_KEY):
        event.listen(session, "after_soft_rollback", _after_soft_rollback)
        event.listen(session, "after_commit", _after_commit)
        event.listen(session, "after_transaction_end", _after_transaction_end)
        session.info[_LISTENING_KEY] = True
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        # Cannot happen inside the write engine; without a transaction the
        # row is already committed (autocommit), so the object must stay.
        return
    pending: list[_PendingObject] = session.info.setdefault(_PENDING_KEY, [])
    pending.append(_PendingObject(key, storage, transaction))


def _within(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


def _remove(objects: list[_PendingObject]) -> None:
    for pending in objects:
        try:
            pending.storage.remove(pending.key)
        except StorageUnavailable:
            log.error("imaging_store.bundled_object_left", object_key=pending.key)
        else:
            log.info("imaging_store.bundled_object_removed", object_key=pending.key)


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    # Fires for a batch entry's savepoint too: only objects put inside the
    # rolled-back transaction go; an earlier entry's object stays.
    pending: list[_PendingObject] = session.info.get(_PENDING_KEY, [])
    gone = [item for item in pending if _within(item.transaction, previous_transaction)]
    if gone:
        session.info[_PENDING_KEY] = [item for item in pending if item not in gone]
        _remove(gone)


def _after_commit(session: Session) -> None:
    # Releasing a savepoint fires after_commit too; only the outermost commit
    # makes the rows durable and the objects final.
    if not session.in_nested_transaction():
        session.info.pop(_PENDING_KEY, None)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # The outermost transaction ended without commit and without a rollback
    # event (a session closed mid-transaction): its objects have no row.
    if transaction.parent is None:
        _remove(session.info.pop(_PENDING_KEY, []))
