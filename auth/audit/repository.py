"""Every SQL statement of the audit trail."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    and_,
    false,
    func,
    not_,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.orm import Session

from auth.audit.models import AuditEventRow

COLUMNS = (
    "id",
    "recorded",
    "action",
    "subtype",
    "outcome",
    "agent_who",
    "agent_client",
    "agent_roles",
    "source_address",
    "request_id",
    "patient_ids",
    "entity_refs",
    "resource",
)


@dataclass(frozen=True, slots=True)
class DateBound:
    """One date search value: its prefix and the half-open range [low, high) it covers."""

    prefix: str
    low: datetime
    high: datetime


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """One search parameter as given: its values are ORed; filters are ANDed."""

    field: str
    values: tuple[str, ...] = ()
    dates: tuple[DateBound, ...] = ()
    prefix_match: bool = False


# One statement for a whole batch: in autocommit it is one round trip, where a
# COPY in a transaction costs four (BEGIN, COPY start, COPY end, COMMIT).
_INSERT_EVENTS = text(
    f"INSERT INTO audit_event ({', '.join(COLUMNS)}) "  # noqa: S608 - constant column names
    f"SELECT {', '.join(COLUMNS)} "
    "FROM jsonb_populate_recordset(NULL::audit_event, CAST(:rows AS jsonb))"
)


def add_events(session: Session, rows: Sequence[Sequence[Any]]) -> None:
    """Insert audit rows (values in COLUMNS order) with one statement."""
    batch = orjson.dumps([dict(zip(COLUMNS, row, strict=True)) for row in rows])
    session.execute(_INSERT_EVENTS, {"rows": batch.decode()})


def get_event(session: Session, event_id: str) -> dict[str, Any] | None:
    """Return one stored AuditEvent resource, or None."""
    statement = select(AuditEventRow.resource).where(AuditEventRow.id == event_id)
    resource: dict[str, Any] | None = session.execute(statement).scalar_one_or_none()
    return resource


def list_events(
    session: Session,
    filters: Sequence[AuditFilter],
    *,
    before: tuple[datetime, str] | None,
    limit: int,
) -> list[tuple[datetime, str, dict[str, Any]]]:
    """Return matching events newest first, starting after the keyset `before`."""
    statement = select(AuditEventRow.recorded, AuditEventRow.id, AuditEventRow.resource).where(
        *_conditions(filters)
    )
    if before is not None:
        statement = statement.where(
            tuple_(AuditEventRow.recorded, AuditEventRow.id) < tuple_(*before)
        )
    statement = statement.order_by(AuditEventRow.recorded.desc(), AuditEventRow.id.desc()).limit(
        limit
    )
    return [(row[0], row[1], row[2]) for row in session.execute(statement)]


def count_events(session: Session, filters: Sequence[AuditFilter]) -> int:
    """Count the events matching every filter."""
    statement = select(func.count()).select_from(AuditEventRow).where(*_conditions(filters))
    return int(session.execute(statement).scalar_one())


def _conditions(filters: Sequence[AuditFilter]) -> list[ColumnElement[bool]]:
    return [_condition(item) for item in filters]


def _condition(item: AuditFilter) -> ColumnElement[bool]:
    values = list(item.values)
    match item.field:
        case "recorded":
            return or_(*(_date_condition(bound) for bound in item.dates))
        case "patient_ids":
            overlaps: ColumnElement[bool] = AuditEventRow.patient_ids.overlap(values)
            return overlaps
        case "entity_refs":
            overlaps = AuditEventRow.entity_refs.overlap(values)
            return overlaps
        case "source_address" if item.prefix_match:
            return or_(
                *(
                    func.lower(AuditEventRow.source_address).startswith(
                        value.lower(), autoescape=True
                    )
                    for value in values
                )
            )
        case "id" | "agent_who" | "action" | "subtype" | "outcome" | "source_address":
            column = getattr(AuditEventRow, item.field)
            return column.in_(values) if values else false()
    raise ValueError(f"no audit search field {item.field}")


def _date_condition(bound: DateBound) -> ColumnElement[bool]:
    recorded = AuditEventRow.recorded
    within = and_(recorded >= bound.low, recorded < bound.high)
    match bound.prefix:
        case "eq":
            return within
        case "ne":
            return not_(within)
        case "gt" | "sa":
            return recorded >= bound.high
        case "lt" | "eb":
            return recorded < bound.low
        case "ge":
            return recorded >= bound.low
        case "le":
            return recorded < bound.high
    raise ValueError(f"no date prefix {bound.prefix}")
