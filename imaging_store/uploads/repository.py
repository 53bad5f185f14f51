"""Every SQL statement of resumable uploads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from imaging_store.uploads.models import TusUploadRow


def add_upload(session: Session, row: TusUploadRow) -> TusUploadRow:
    """Insert one upload and flush it, so a constraint error is raised here."""
    session.add(row)
    session.flush()
    return row


def get_upload(session: Session, upload_id: str) -> TusUploadRow | None:
    """Return an upload, or None."""
    return session.get(TusUploadRow, upload_id)


def lock_upload(session: Session, upload_id: str) -> TusUploadRow | None:
    """Return an upload locked until the end of the transaction, or None."""
    return session.execute(
        select(TusUploadRow).where(TusUploadRow.id == upload_id).with_for_update()
    ).scalar_one_or_none()


def lock_expired_uploads(session: Session, *, now: datetime, limit: int) -> Sequence[TusUploadRow]:
    """Lock uploads past their expiry that no PATCH is writing; skip rows locked elsewhere."""
    return (
        session.execute(
            select(TusUploadRow)
            .where(
                TusUploadRow.expires_at < now,
                (TusUploadRow.lease_expires_at.is_(None)) | (TusUploadRow.lease_expires_at < now),
            )
            .order_by(TusUploadRow.expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )


def delete_upload(session: Session, upload_id: str) -> None:
    """Delete one upload's row."""
    session.execute(delete(TusUploadRow).where(TusUploadRow.id == upload_id))
