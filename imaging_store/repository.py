"""Every SQL statement of the imaging store."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from imaging_store.models import BinaryObjectRow


def add_binary_object(session: Session, row: BinaryObjectRow) -> BinaryObjectRow:
    """Insert one metadata row and flush it, so a constraint error is raised here."""
    session.add(row)
    session.flush()
    return row


def get_binary_object(session: Session, binary_id: str) -> BinaryObjectRow | None:
    """Return the metadata row of a Binary, deleted or not."""
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
