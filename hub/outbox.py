"""The transactional outbox: events written with the change, delivered after commit.

Domains add events in their own session; a Celery task drains pending rows to
the handlers registered for each topic. A failing handler is retried with
backoff and ends as a visible dead letter that `waha outbox replay` re-queues.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from psycopg.types.json import Jsonb
from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    Select,
    Text,
    event,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, Session, SessionTransaction, mapped_column

from hub.db import Base, copy_rows, session_factory
from hub.errors import WahaError

log = structlog.get_logger()

PENDING = "pending"
DONE = "done"
DEAD = "dead"


class OutboxEventRow(Base):
    """One event waiting for (or done with) delivery to its handlers."""

    __tablename__ = "outbox_event"
    __table_args__ = (
        # On id: the drain takes the oldest pending events first, and the index
        # then hands them out in that order without touching delivered ones.
        Index(
            "ix_outbox_event_pending",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    request_id: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    available_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event as handlers see it."""

    id: int
    topic: str
    payload: dict[str, Any]
    request_id: str | None


Handler = Callable[[Session, OutboxEvent], None]
_handlers: dict[str, list[Handler]] = {}
_notifier: Callable[[], None] | None = None
_PENDING_FLAG = "waha_outbox_pending"


def register_handler(topic: str, handler: Handler) -> None:
    """Deliver events of `topic` to `handler` (idempotent handlers only)."""
    if handler not in _handlers.setdefault(topic, []):
        _handlers[topic].append(handler)


def unregister_handler(topic: str, handler: Handler) -> None:
    """Stop delivering events of `topic` to `handler` (a no-op if it was not registered)."""
    handlers = _handlers.get(topic, [])
    if handler in handlers:
        handlers.remove(handler)
    if not handlers:
        _handlers.pop(topic, None)


def set_notifier(notifier: Callable[[], None] | None) -> Callable[[], None] | None:
    """Set what is called after a commit that wrote events; return the previous one."""
    global _notifier  # noqa: PLW0603 - set once by the composition root
    previous, _notifier = _notifier, notifier
    return previous


def add_events(
    session: Session,
    topic: str,
    payloads: Iterable[dict[str, Any]],
    *,
    request_id: str | None,
) -> None:
    """Write events in the caller's transaction; they exist only if it commits."""
    rows = [(topic, Jsonb(payload), request_id) for payload in payloads]
    if rows:
        copy_rows(
            session,
            "outbox_event",
            ("topic", "payload", "request_id"),
            ("text", "jsonb", "text"),
            rows,
        )
        session.info[_PENDING_FLAG] = True


@event.listens_for(session_factory, "after_commit")
def _notify_after_commit(session: Session) -> None:
    # after_commit also fires when a savepoint is released; the events are not
    # visible to a worker until the outermost transaction commits.
    if session.in_nested_transaction():
        return
    if session.info.pop(_PENDING_FLAG, False) and _notifier is not None:
        try:
            _notifier()
        except Exception:  # noqa: BLE001 - the periodic drain delivers them anyway
            log.warning("outbox.notify_failed")


@event.listens_for(session_factory, "after_soft_rollback")
def _forget_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    # A rolled-back outermost transaction took its events with it; a later
    # commit of the same session must not announce them.
    if previous_transaction.parent is None:
        session.info.pop(_PENDING_FLAG, None)


def _backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(2**attempts, 600))


def _describe_failure(error: Exception) -> str:
    """Name a handler failure by exception type, slug and place, never by its message."""
    # Exception messages may quote the payload or database values (patient
    # data); the type and the raising line are enough to find the cause.
    description = f"{type(error).__module__}.{type(error).__qualname__}"
    if isinstance(error, WahaError):
        description += f" [{error.slug}]"
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        last = frames[-1]
        description += f" at {Path(last.filename).name}:{last.lineno} in {last.name}"
    return description[:2000]


def due_events(batch_size: int) -> Select[OutboxEventRow]:
    """Select up to `batch_size` pending events that are due, oldest first, locked."""
    # 'pending' is written into the SQL, not bound: psycopg prepares a statement
    # it runs often, and PostgreSQL's generic plan for `status = $1` cannot use
    # the partial index of pending events. Without it, the poll walks every
    # delivered event in id order (200 ms with a million of them).
    pending = literal(PENDING, literal_execute=True)
    return (
        select(OutboxEventRow)
        .where(OutboxEventRow.status == pending, OutboxEventRow.available_at <= text("now()"))
        .order_by(OutboxEventRow.id)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
        # The rows are locked now; a row this session loaded earlier (before
        # a replay, say) must not keep its stale attempts or status.
        .execution_options(populate_existing=True)
    )


def drain(session: Session, *, batch_size: int, max_attempts: int) -> int:
    """Deliver up to `batch_size` due events; return how many were handled."""
    rows = session.execute(due_events(batch_size)).scalars().all()
    for row in rows:
        handlers = list(_handlers.get(row.topic, []))
        if not handlers:
            # Nothing subscribes to this topic (yet): done, without paying a
            # savepoint round trip per event on a large backlog.
            row.status = DONE
            continue
        outbox_event = OutboxEvent(row.id, row.topic, row.payload, row.request_id)
        try:
            with session.begin_nested():
                for handler in handlers:
                    handler(session, outbox_event)
        except Exception as error:  # noqa: BLE001 - a handler's failure is recorded, not raised
            row.attempts += 1
            row.last_error = _describe_failure(error)
            if row.attempts >= max_attempts:
                row.status = DEAD
                log.error(
                    "outbox.dead_letter",
                    event_id=row.id,
                    topic=row.topic,
                    attempts=row.attempts,
                    error=type(error).__name__,
                )
            else:
                # The database clock, as in the due-check above, so that API and
                # worker hosts with skewed clocks agree on when a retry is due.
                row.available_at = func.now() + _backoff(row.attempts)
                log.warning(
                    "outbox.retry_later",
                    event_id=row.id,
                    topic=row.topic,
                    attempts=row.attempts,
                    error=type(error).__name__,
                )
        else:
            row.status = DONE
    session.flush()
    return len(rows)


def replay_dead(session: Session) -> int:
    """Put dead-lettered events back in the queue; return how many."""
    result = session.execute(
        text(
            "UPDATE outbox_event SET status = 'pending', attempts = 0, available_at = now() "
            "WHERE status = 'dead'"
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # CursorResult has rowcount


def purge_delivered(session: Session, *, older_than: timedelta, limit: int) -> int:
    """Delete up to `limit` delivered events older than `older_than`; return how many.

    Delivered events are kept a while for tracing, then removed so the table stays
    the size of the backlog; dead letters are never purged (they wait for replay).
    """
    result = session.execute(
        text(
            "DELETE FROM outbox_event WHERE id IN ("
            "SELECT id FROM outbox_event WHERE status = 'done' "
            "AND created_at < now() - make_interval(secs => :seconds) "
            "ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)"
        ),
        {"seconds": older_than.total_seconds(), "limit": limit},
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # CursorResult has rowcount
