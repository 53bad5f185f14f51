"""Every SQL statement of the derivatives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, null, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from imaging_store.derivatives.models import BinaryDerivativeRow


def get_derivative(session: Session, binary_id: str, kind: str) -> BinaryDerivativeRow | None:
    """Return one derivative row of a Binary, or None."""
    return session.execute(
        select(BinaryDerivativeRow).where(
            BinaryDerivativeRow.binary_id == binary_id, BinaryDerivativeRow.kind == kind
        )
    ).scalar_one_or_none()


def lock_derivative(session: Session, binary_id: str, kind: str) -> BinaryDerivativeRow | None:
    """Return one derivative row locked FOR UPDATE, or None."""
    return session.execute(
        select(BinaryDerivativeRow)
        .where(BinaryDerivativeRow.binary_id == binary_id, BinaryDerivativeRow.kind == kind)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()


def list_derivatives(session: Session, binary_id: str) -> list[BinaryDerivativeRow]:
    """Return every derivative row of a Binary."""
    return list(
        session.execute(
            select(BinaryDerivativeRow)
            .where(BinaryDerivativeRow.binary_id == binary_id)
            .order_by(BinaryDerivativeRow.kind)
            .execution_options(populate_existing=True)
        )
        .scalars()
        .all()
    )


def put_derivative(
    session: Session,
    binary_id: str,
    kind: str,
    *,
    status: str,
    object_key: str | None = None,
    width: int | None = None,
    height: int | None = None,
    size: int | None = None,
    quality_code: str | None = None,
    error: str | None = None,
    imaging_study: dict[str, Any] | None = None,
    imaging_study_id: str | None = None,
) -> None:
    """Insert or replace the state of one derivative (a rerun overwrites, never duplicates)."""
    values: dict[str, Any] = {
        "status": status,
        "object_key": object_key,
        "width": width,
        "height": height,
        "size": size,
        "quality_code": quality_code,
        "error": error,
        # SQL NULL, not the JSON value null.
        "imaging_study": imaging_study if imaging_study is not None else null(),
        "imaging_study_id": imaging_study_id,
    }
    _upsert(session, binary_id, [kind], values)


def put_derivatives(
    session: Session, binary_id: str, kinds: Sequence[str], *, status: str, error: str | None
) -> None:
    """Insert or replace several derivatives of a Binary in one state, in one statement."""
    values: dict[str, Any] = {
        "status": status,
        "object_key": None,
        "width": None,
        "height": None,
        "size": None,
        "quality_code": None,
        "error": error,
        "imaging_study": null(),
        "imaging_study_id": None,
    }
    _upsert(session, binary_id, kinds, values)


def _upsert(session: Session, binary_id: str, kinds: Sequence[str], values: dict[str, Any]) -> None:
    statement = insert(BinaryDerivativeRow).values(
        [{"binary_id": binary_id, "kind": kind, **values} for kind in kinds]
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[BinaryDerivativeRow.binary_id, BinaryDerivativeRow.kind],
            set_={**values, "updated_at": func.now()},
        )
    )
