"""Every SQL statement of the imaging store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from imaging_store.derivatives.models import BinaryDerivativeRow
from imaging_store.models import BinaryLinkRow, BinaryObjectRow


def add_binary_object(session: Session, row: BinaryObjectRow) -> BinaryObjectRow:
    """Insert one metadata row and flush it, so a constraint error is raised here."""
    session.add(row)
    session.flush()
    return row


def get_binary_object(
    session: Session, binary_id: str, *, use_identity_map: bool = False
) -> BinaryObjectRow | None:
    """Return the metadata row of a Binary, deleted or not.

    With `use_identity_map` a row the session already holds (one it has just
    added) is returned without a round trip.
    """
    if use_identity_map:
        return session.get(BinaryObjectRow, binary_id)
    return session.execute(
        select(BinaryObjectRow).where(BinaryObjectRow.id == binary_id)
    ).scalar_one_or_none()


def delete_binary_object(session: Session, binary_id: str, *, at: datetime) -> None:
    """Mark a Binary deleted; its object stays until the retention purge."""
    session.execute(
        update(BinaryObjectRow)
        .where(BinaryObjectRow.id == binary_id, BinaryObjectRow.deleted_at.is_(None))
        .values(deleted_at=at)
    )


# Retention and orphan sweep (imaging_store/retention.py).


def lock_purgeable_binary_objects(
    session: Session, *, deleted_before: datetime, limit: int
) -> list[BinaryObjectRow]:
    """Lock up to `limit` rows of Binaries deleted before a time, oldest first."""
    # SKIP LOCKED: two purges (a retried task beside a scheduled one) share
    # the work instead of waiting on each other.
    return list(
        session.execute(
            select(BinaryObjectRow)
            .where(BinaryObjectRow.deleted_at < deleted_before)
            .order_by(BinaryObjectRow.deleted_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )


def lock_unlinked_binary_objects(
    session: Session, *, created_before: datetime, limit: int
) -> list[BinaryObjectRow]:
    """Lock up to `limit` live Binaries created before a time that nothing links or names."""
    linked = select(BinaryLinkRow.binary_id).where(BinaryLinkRow.binary_id == BinaryObjectRow.id)
    return list(
        session.execute(
            select(BinaryObjectRow)
            .where(
                BinaryObjectRow.deleted_at.is_(None),
                BinaryObjectRow.security_context.is_(None),
                BinaryObjectRow.created_at < created_before,
                ~linked.exists(),
            )
            .order_by(BinaryObjectRow.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )


_OWNED_KEYS = text(
    """
    SELECT k FROM unnest(CAST(:keys AS text[])) AS k
    WHERE EXISTS (SELECT 1 FROM binary_object b WHERE b.object_key = k)
       OR (starts_with(k, :binaries) AND EXISTS (
            SELECT 1 FROM tus_upload u WHERE u.binary_id = substr(k, length(:binaries) + 1)))
       OR (starts_with(k, :staging) AND EXISTS (
            SELECT 1 FROM tus_upload u
            WHERE u.id = split_part(substr(k, length(:staging) + 1), '/', 1)))
       OR (starts_with(k, :derivatives) AND EXISTS (
            SELECT 1 FROM binary_derivative d
            WHERE d.binary_id = split_part(substr(k, length(:derivatives) + 1), '/', 1)
              AND d.object_key = k))
    """
)


def owned_object_keys(
    session: Session, keys: Sequence[str], *, binaries: str, staging: str, derivatives: str
) -> set[str]:
    """Return which of `keys` a Binary row, an upload in progress or a derived image owns.

    The prefixes say how keys are made: `<binaries><binary id>` (a Binary, or
    the object a resumable upload assembles), `<staging><upload id>/…` and
    `<derivatives><binary id>/…`.
    """
    rows = session.execute(
        _OWNED_KEYS,
        {"keys": list(keys), "binaries": binaries, "staging": staging, "derivatives": derivatives},
    )
    return {str(key) for key in rows.scalars()}


def owned_multipart_uploads(
    session: Session, uploads: Sequence[tuple[str, str]], *, binaries: str
) -> set[str]:
    """Return which of these (key, S3 multipart upload id) a resumable upload holds.

    Held means recorded by the upload, or going into the key of an upload
    still in progress: one that is starting its multipart upload records
    the id only after S3 has given it.
    """
    rows = session.execute(
        text(
            "SELECT m.id FROM unnest(CAST(:keys AS text[]), CAST(:ids AS text[])) AS m(key, id)"
            " WHERE EXISTS (SELECT 1 FROM tus_upload u WHERE u.multipart_upload_id = m.id)"
            " OR (starts_with(m.key, :binaries) AND EXISTS (SELECT 1 FROM tus_upload u"
            " WHERE u.binary_id = substr(m.key, length(:binaries) + 1)))"
        ),
        {
            "keys": [key for key, _ in uploads],
            "ids": [upload_id for _, upload_id in uploads],
            "binaries": binaries,
        },
    )
    return {str(upload_id) for upload_id in rows.scalars()}


def count_binary_links(session: Session, binary_id: str) -> int:
    """Count the resources that link a Binary."""
    return int(
        session.execute(
            select(func.count())
            .select_from(BinaryLinkRow)
            .where(BinaryLinkRow.binary_id == binary_id)
        ).scalar_one()
    )


def delete_purged_binary_object(session: Session, binary_id: str) -> None:
    """Remove the metadata row of a Binary whose objects are being purged."""
    session.execute(delete(BinaryObjectRow).where(BinaryObjectRow.id == binary_id))


def delete_binary_derivative_rows(session: Session, binary_id: str) -> None:
    """Remove the derivative rows of a purged Binary."""
    session.execute(delete(BinaryDerivativeRow).where(BinaryDerivativeRow.binary_id == binary_id))


def list_binary_objects_by_sha256(
    session: Session, *, owner_client_id: str, sha256: bytes
) -> list[BinaryObjectRow]:
    """Return the live Binaries of one owner with these exact bytes (demo reloads)."""
    return list(
        session.execute(
            select(BinaryObjectRow)
            .where(
                BinaryObjectRow.owner_client_id == owner_client_id,
                BinaryObjectRow.sha256 == sha256,
                BinaryObjectRow.deleted_at.is_(None),
            )
            .order_by(BinaryObjectRow.created_at, BinaryObjectRow.id)
        )
        .scalars()
        .all()
    )


def lock_binary_object(session: Session, binary_id: str) -> BinaryObjectRow | None:
    """Return the metadata row of a Binary locked FOR UPDATE, deleted or not."""
    return session.execute(
        select(BinaryObjectRow)
        .where(BinaryObjectRow.id == binary_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def list_binary_links(session: Session, binary_id: str) -> list[BinaryLinkRow]:
    """Return every Media or DocumentReference link of a Binary, oldest first."""
    return list(
        session.execute(
            select(BinaryLinkRow)
            .where(BinaryLinkRow.binary_id == binary_id)
            .order_by(
                BinaryLinkRow.created_at, BinaryLinkRow.resource_type, BinaryLinkRow.resource_id
            )
            .execution_options(populate_existing=True)
        )
        .scalars()
        .all()
    )


def list_binary_links_of(
    session: Session, resource_type: str, resource_id: str
) -> list[BinaryLinkRow]:
    """Return the links of one citing Media or DocumentReference."""
    return list(
        session.execute(
            select(BinaryLinkRow)
            .where(
                BinaryLinkRow.resource_type == resource_type,
                BinaryLinkRow.resource_id == resource_id,
            )
            .order_by(BinaryLinkRow.binary_id)
        )
        .scalars()
        .all()
    )


def list_linked_patient_ids(session: Session, binary_id: str) -> list[str]:
    """Return the patients whose Media or DocumentReference cites a Binary."""
    found = session.execute(
        select(BinaryLinkRow.patient_id)
        .where(BinaryLinkRow.binary_id == binary_id, BinaryLinkRow.patient_id.is_not(None))
        .distinct()
        .order_by(BinaryLinkRow.patient_id)
    ).scalars()
    return [patient_id for patient_id in found if patient_id is not None]


def put_binary_link(
    session: Session,
    *,
    binary_id: str,
    resource_type: str,
    resource_id: str,
    patient_id: str | None,
) -> None:
    """Insert or update the link of one citing resource to one Binary."""
    statement = insert(BinaryLinkRow).values(
        binary_id=binary_id,
        resource_type=resource_type,
        resource_id=resource_id,
        patient_id=patient_id,
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[
                BinaryLinkRow.binary_id,
                BinaryLinkRow.resource_type,
                BinaryLinkRow.resource_id,
            ],
            set_={"patient_id": patient_id},
        )
    )


def delete_binary_links_of(
    session: Session, resource_type: str, resource_id: str, *, keeping: Sequence[str] = ()
) -> None:
    """Delete a citing resource's links, except those to the Binaries it still cites."""
    statement = delete(BinaryLinkRow).where(
        BinaryLinkRow.resource_type == resource_type, BinaryLinkRow.resource_id == resource_id
    )
    if keeping:
        statement = statement.where(BinaryLinkRow.binary_id.not_in(list(keeping)))
    session.execute(statement)
