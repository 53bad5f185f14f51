"""Fixtures for the outbox tests: registered handlers and a recording notifier."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Connection, text

from hub import outbox


@contextmanager
def registered(topic: str, handler: outbox.Handler) -> Iterator[None]:
    """Deliver `topic` to `handler` for the duration of the block only."""
    outbox.register_handler(topic, handler)
    try:
        yield
    finally:
        outbox.unregister_handler(topic, handler)


@contextmanager
def notifier(callback: Callable[[], None] | None) -> Iterator[None]:
    """Use `callback` as the outbox notifier for the block, then restore the previous one."""
    previous = outbox.set_notifier(callback)
    try:
        yield
    finally:
        outbox.set_notifier(previous)


@pytest.fixture
def notifications() -> Iterator[list[str]]:
    """Record drain requests instead of sending them to the broker."""
    calls: list[str] = []
    with notifier(lambda: calls.append("drain")):
        yield calls


def outbox_rows(connection: Connection, topic: str) -> list[dict[str, object]]:
    """Return the outbox rows of `topic` (status, attempts, due-ness, error) by id."""
    result = connection.execute(
        text(
            "SELECT id, status, attempts, last_error, available_at > now() AS deferred "
            "FROM outbox_event WHERE topic = :topic ORDER BY id"
        ),
        {"topic": topic},
    )
    return [dict(row) for row in result.mappings()]
