"""The transactional outbox: atomic writes, delivery, retries, dead letters and the notifier."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from hub import db, outbox
from hub.outbox import OutboxEvent, add_events, drain, replay_dead
from tests.builders import unit_bundle
from tests.hub.conftest import outbox_rows, registered

# Words that must never reach last_error or the logs: they stand in for patient data.
SECRET = "Khadija Amrani 1987-03-02"


def _topic() -> str:
    return f"test.{uuid.uuid4().hex[:12]}"


def _committed_count(engine: Engine, topic: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM outbox_event WHERE topic = :topic"), {"topic": topic}
            ).scalar_one()
        )


def _make_due(session: Session, topic: str) -> None:
    """Move the retry time of `topic`'s events into the past, as if the backoff had elapsed."""
    session.execute(
        text(
            "UPDATE outbox_event SET available_at = now() - interval '1 second' "
            "WHERE topic = :topic"
        ),
        {"topic": topic},
    )


def test_events_exist_only_if_the_transaction_commits(
    committed: Engine, notifications: list[str]
) -> None:
    topic = _topic()
    with pytest.raises(RuntimeError), db.session_scope() as session:
        add_events(session, topic, [{"case": "c-1"}, {"case": "c-2"}], request_id="r-1")
        raise RuntimeError("the change fails after the events were written")
    assert _committed_count(committed, topic) == 0
    assert notifications == []

    with db.session_scope() as session:
        add_events(session, topic, [{"case": "c-1"}, {"case": "c-2"}], request_id="r-1")
    assert _committed_count(committed, topic) == 2
    assert notifications == ["drain"]


def test_no_payloads_write_nothing(session: Session) -> None:
    topic = _topic()
    add_events(session, topic, [], request_id=None)
    assert outbox_rows(session.connection(), topic) == []


def test_drain_delivers_each_event_once_and_marks_it_done(session: Session) -> None:
    topic = _topic()
    received: list[OutboxEvent] = []
    with registered(topic, lambda _session, event: received.append(event)):
        add_events(session, topic, [{"n": 1}, {"n": 2}, {"n": 3}], request_id="req-7")
        assert drain(session, batch_size=10, max_attempts=3) == 3
        assert drain(session, batch_size=10, max_attempts=3) == 0
    assert [event.payload for event in received] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert {event.request_id for event in received} == {"req-7"}
    assert {event.topic for event in received} == {topic}
    rows = outbox_rows(session.connection(), topic)
    assert [row["status"] for row in rows] == ["done"] * 3
    assert [row["id"] for row in rows] == [event.id for event in received]


def test_drain_respects_the_batch_size_in_id_order(session: Session) -> None:
    topic = _topic()
    received: list[int] = []
    with registered(topic, lambda _session, event: received.append(event.payload["n"])):
        add_events(session, topic, [{"n": n} for n in range(5)], request_id=None)
        assert drain(session, batch_size=2, max_attempts=3) == 2
        assert received == [0, 1]
        assert drain(session, batch_size=10, max_attempts=3) == 3
    assert received == [0, 1, 2, 3, 4]


def test_handler_writes_commit_with_the_done_mark(session: Session) -> None:
    topic, follow_up = _topic(), _topic()

    def chain(handler_session: Session, event: OutboxEvent) -> None:
        add_events(handler_session, follow_up, [{"after": event.id}], request_id=event.request_id)

    with registered(topic, chain):
        add_events(session, topic, [{"n": 1}], request_id="r")
        drain(session, batch_size=10, max_attempts=3)
    assert [row["status"] for row in outbox_rows(session.connection(), follow_up)] == ["pending"]


def test_failing_handler_is_retried_later_then_dead_lettered(session: Session) -> None:
    topic = _topic()

    def failing(_session: Session, event: OutboxEvent) -> None:
        raise ValueError(f"cannot route {event.payload}")

    with registered(topic, failing):
        add_events(session, topic, [{"name": SECRET}], request_id="r")
        assert drain(session, batch_size=10, max_attempts=3) == 1
        [row] = outbox_rows(session.connection(), topic)
        assert row["status"] == "pending"
        assert row["attempts"] == 1
        assert row["deferred"] is True
        last_error = str(row["last_error"])
        assert "ValueError" in last_error
        assert "failing" in last_error
        assert SECRET not in last_error
        assert "cannot route" not in last_error

        # Not due yet: a drain right away leaves it alone.
        assert drain(session, batch_size=10, max_attempts=3) == 0

        _make_due(session, topic)
        drain(session, batch_size=10, max_attempts=3)
        [row] = outbox_rows(session.connection(), topic)
        assert (row["status"], row["attempts"]) == ("pending", 2)

        _make_due(session, topic)
        drain(session, batch_size=10, max_attempts=3)
        [row] = outbox_rows(session.connection(), topic)
        assert (row["status"], row["attempts"]) == ("dead", 3)
        assert SECRET not in str(row["last_error"])

        # A dead letter is never delivered again on its own.
        _make_due(session, topic)
        assert drain(session, batch_size=10, max_attempts=3) == 0


def test_replay_dead_requeues_and_the_event_is_then_delivered(session: Session) -> None:
    topic = _topic()

    def failing(_session: Session, _event: OutboxEvent) -> None:
        raise RuntimeError("downstream unavailable")

    with registered(topic, failing):
        add_events(session, topic, [{"n": 1}], request_id=None)
        drain(session, batch_size=10, max_attempts=1)
    assert outbox_rows(session.connection(), topic)[0]["status"] == "dead"

    assert replay_dead(session) == 1
    [row] = outbox_rows(session.connection(), topic)
    assert (row["status"], row["attempts"], row["deferred"]) == ("pending", 0, False)

    received: list[OutboxEvent] = []
    with registered(topic, lambda _session, event: received.append(event)):
        assert drain(session, batch_size=10, max_attempts=1) == 1
    assert [event.payload for event in received] == [{"n": 1}]
    assert outbox_rows(session.connection(), topic)[0]["status"] == "done"
    assert replay_dead(session) == 0


def test_a_failing_handler_rolls_back_only_its_own_writes(session: Session) -> None:
    topic, follow_up = _topic(), _topic()

    def write_then_fail(handler_session: Session, event: OutboxEvent) -> None:
        add_events(handler_session, follow_up, [{"after": event.id}], request_id=None)
        if event.payload["n"] == 2:
            raise RuntimeError("second event fails")

    with registered(topic, write_then_fail):
        add_events(session, topic, [{"n": 1}, {"n": 2}, {"n": 3}], request_id=None)
        assert drain(session, batch_size=10, max_attempts=3) == 3
    statuses = [row["status"] for row in outbox_rows(session.connection(), topic)]
    assert statuses == ["done", "pending", "done"]
    assert len(outbox_rows(session.connection(), follow_up)) == 2


def test_events_without_a_handler_are_marked_done(session: Session) -> None:
    topic = _topic()
    add_events(session, topic, [{"n": 1}], request_id=None)
    assert drain(session, batch_size=10, max_attempts=3) == 1
    assert outbox_rows(session.connection(), topic)[0]["status"] == "done"


def test_every_handler_of_a_topic_receives_the_event(session: Session) -> None:
    topic = _topic()
    first: list[int] = []
    second: list[int] = []

    def record_first(_session: Session, event: OutboxEvent) -> None:
        first.append(event.id)

    with registered(topic, record_first), registered(topic, lambda _s, e: second.append(e.id)):
        outbox.register_handler(topic, record_first)  # registering twice delivers once
        add_events(session, topic, [{"n": 1}], request_id=None)
        drain(session, batch_size=10, max_attempts=3)
    assert len(first) == 1
    assert first == second


def test_unregistered_handler_no_longer_receives(session: Session) -> None:
    topic = _topic()
    received: list[int] = []
    with registered(topic, lambda _session, event: received.append(event.id)):
        pass
    outbox.unregister_handler(topic, lambda _session, _event: None)  # unknown: a no-op
    add_events(session, topic, [{"n": 1}], request_id=None)
    drain(session, batch_size=10, max_attempts=3)
    assert received == []


def test_concurrent_drains_never_deliver_the_same_event_twice(
    committed: Engine, notifications: list[str]
) -> None:
    topic = _topic()
    with db.session_scope() as session:
        add_events(session, topic, [{"n": n} for n in range(50)], request_id=None)

    first_holds_locks = threading.Event()
    second_done = threading.Event()
    second_finished_while_first_held: list[bool] = []
    deliveries: list[tuple[str, int]] = []

    def handler(_session: Session, event: OutboxEvent) -> None:
        name = threading.current_thread().name
        deliveries.append((name, event.id))
        if name.startswith("first") and not first_holds_locks.is_set():
            # Keep the first batch locked until the second drain has finished:
            # without SKIP LOCKED the second would block here instead.
            first_holds_locks.set()
            second_finished_while_first_held.append(second_done.wait(timeout=30))

    def run_drain(batch_size: int) -> int:
        with db.session_scope() as session:
            return drain(session, batch_size=batch_size, max_attempts=3)

    with (
        registered(topic, handler),
        ThreadPoolExecutor(1, thread_name_prefix="first") as first_pool,
        ThreadPoolExecutor(1, thread_name_prefix="second") as second_pool,
    ):
        first = first_pool.submit(run_drain, 10)
        assert first_holds_locks.wait(timeout=30)
        second = second_pool.submit(run_drain, 100)
        second.result(timeout=60)
        second_done.set()
        first.result(timeout=60)

    assert second_finished_while_first_held == [True]
    delivered_ids = [event_id for _, event_id in deliveries]
    assert len(delivered_ids) == 50
    assert len(set(delivered_ids)) == 50
    assert sum(name.startswith("first") for name, _ in deliveries) == 10
    with committed.connect() as connection:
        assert {row["status"] for row in outbox_rows(connection, topic)} == {"done"}


# The notifier hangs on hub.db.session_factory's after_commit: these sessions
# come from that factory, bound by the `session` fixture to the test's
# connection, so their commits release savepoints inside the rolled-back test.


def test_notifier_fires_once_after_a_factory_session_commits_events(
    session: Session, notifications: list[str]
) -> None:
    with db.session_scope() as factory_session:
        add_events(factory_session, _topic(), [{"n": 1}], request_id=None)
        add_events(factory_session, _topic(), [{"n": 2}], request_id=None)
        assert notifications == []
    assert notifications == ["drain"]


def test_notifier_stays_quiet_for_commits_without_events(
    session: Session, notifications: list[str]
) -> None:
    with db.session_scope() as factory_session:
        factory_session.execute(text("SELECT 1"))
    assert notifications == []


def test_notifier_waits_for_the_outermost_commit(
    session: Session, notifications: list[str]
) -> None:
    with db.session_scope() as factory_session:
        with factory_session.begin_nested():
            add_events(factory_session, _topic(), [{"n": 1}], request_id=None)
        # The savepoint is released, but nothing is visible to a worker yet.
        assert notifications == []
    assert notifications == ["drain"]


def test_notifier_forgets_events_of_a_rolled_back_transaction(
    session: Session, notifications: list[str]
) -> None:
    with db.session_factory() as factory_session:
        factory_session.begin()
        add_events(factory_session, _topic(), [{"n": 1}], request_id=None)
        factory_session.rollback()
        with factory_session.begin():
            factory_session.execute(text("SELECT 1"))
    assert notifications == []


def test_a_failing_notifier_does_not_fail_the_commit(session: Session) -> None:
    topic = _topic()

    def broken() -> None:
        raise ConnectionError("broker down")

    previous = outbox.set_notifier(broken)
    try:
        with db.session_scope() as factory_session:
            add_events(factory_session, topic, [{"n": 1}], request_id=None)
    finally:
        outbox.set_notifier(previous)
    assert len(outbox_rows(session.connection(), topic)) == 1


def test_notifier_fires_after_an_api_transaction(
    client: TestClient, session: Session, notifications: list[str]
) -> None:
    response = client.post(
        "/fhir", json=unit_bundle("NOTIFY-1"), headers={"Content-Type": "application/fhir+json"}
    )
    assert response.status_code == 200, response.text
    assert notifications == ["drain"]


def test_purge_removes_only_old_delivered_events(session: Session) -> None:
    outbox.add_events(session, "test.purge", [{"n": n} for n in range(4)], request_id=None)
    session.flush()
    session.execute(
        text(
            "UPDATE outbox_event SET status = CASE WHEN payload->>'n' = '3' THEN 'dead' "
            "ELSE 'done' END, created_at = now() - interval '10 days' WHERE topic = 'test.purge'"
        )
    )
    session.execute(
        text(
            "UPDATE outbox_event SET created_at = now() WHERE topic = 'test.purge' "
            "AND payload->>'n' = '2'"
        )
    )
    purged = outbox.purge_delivered(session, older_than=timedelta(days=3), limit=100)
    assert purged == 2
    left = session.execute(
        text("SELECT payload->>'n', status FROM outbox_event WHERE topic = 'test.purge' ORDER BY 1")
    ).all()
    assert [tuple(row) for row in left] == [("2", "done"), ("3", "dead")]


def test_purge_task_is_scheduled_and_runs(session: Session) -> None:
    from hub.celery_app import PURGE_TASK, celery_app, purge_outbox

    assert celery_app.conf.beat_schedule["purge-outbox"]["task"] == PURGE_TASK
    assert purge_outbox.apply().get() == 0


def test_the_due_events_query_names_pending_in_its_sql(session: Session) -> None:
    """A generic plan for `status = $1` cannot use the partial index of pending events."""
    statement = outbox.due_events(10)
    compiled = statement.compile(
        dialect=session.get_bind().dialect, compile_kwargs={"render_postcompile": True}
    )
    assert "outbox_event.status = 'pending'" in str(compiled)
    assert "pending" not in compiled.params.values()
