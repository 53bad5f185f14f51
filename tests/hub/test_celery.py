"""The outbox relay over a real Celery worker and the real Redis broker."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Queue
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from hub import db
from hub.celery_app import DRAIN_TASK, drain_outbox, make_celery
from hub.outbox import OutboxEvent, add_events
from hub.settings import Settings
from tests.hub.conftest import notifier, outbox_rows, registered

REPO = Path(__file__).resolve().parents[2]


def _wait_for(condition: Callable[[], bool], *, seconds: float, what: str) -> None:
    """Poll `condition` until it holds; fail with `what` at the deadline."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def _statuses(engine: Engine, topic: str) -> list[object]:
    with engine.connect() as connection:
        return [row["status"] for row in outbox_rows(connection, topic)]


@pytest.fixture
def broker_app(settings: Settings) -> Iterator[Celery]:
    """A Celery app on the real broker with a queue of its own.

    A dev or benchmark worker may be consuming the default queue of the same
    Redis; a private queue keeps this test's drain requests for this test's worker.
    """
    app = make_celery(settings)
    name = f"waha-test-{uuid.uuid4().hex}"
    app.conf.task_default_queue = name
    yield app
    with app.connection() as connection:
        Queue(name).bind(connection.default_channel).delete()


def test_drain_task_is_configured_for_safe_redelivery() -> None:
    options: Any = drain_outbox
    assert options.name == DRAIN_TASK
    assert options.acks_late is True
    assert options.max_retries == 5
    assert options.retry_backoff is True
    assert "OperationalError" in {error.__name__ for error in options.autoretry_for}


def test_drain_task_called_twice_delivers_once(session: Session) -> None:
    topic = f"test.{uuid.uuid4().hex[:12]}"
    received: list[int] = []
    with registered(topic, lambda _session, event: received.append(event.id)):
        add_events(session, topic, [{"n": 1}, {"n": 2}], request_id=None)
        assert drain_outbox() >= 2
        drain_outbox()
    assert len(received) == 2
    assert [row["status"] for row in outbox_rows(session.connection(), topic)] == ["done"] * 2


@pytest.mark.slow
def test_worker_delivers_events_after_commit(committed: Engine, broker_app: Celery) -> None:
    topic = f"test.{uuid.uuid4().hex[:12]}"
    received: queue.Queue[OutboxEvent] = queue.Queue()

    def request_drain() -> None:
        broker_app.send_task(DRAIN_TASK)

    with (
        registered(topic, lambda _session, event: received.put(event)),
        notifier(request_drain),
        start_worker(broker_app, pool="solo", perform_ping_check=False, loglevel="WARNING"),
    ):
        # Only the commit notifies: no task is sent by hand here.
        with db.session_scope() as session:
            add_events(session, topic, [{"case": "c-1"}], request_id="req-e2e")
        event = received.get(timeout=60)
        _wait_for(lambda: _statuses(committed, topic) == ["done"], seconds=30, what="done mark")
    assert (event.payload, event.request_id) == ({"case": "c-1"}, "req-e2e")
    assert received.empty()


@pytest.mark.slow
def test_worker_process_of_the_cli_app_drains_committed_events(
    committed: Engine, broker_app: Celery, settings: Settings
) -> None:
    topic = f"test.{uuid.uuid4().hex[:12]}"
    with notifier(None), db.session_scope() as session:
        add_events(session, topic, [{"n": n} for n in range(3)], request_id=None)
    env = {
        **os.environ,
        "WAHA_ENV": "test",
        "WAHA_DATABASE_URL": str(settings.database_url),
        "WAHA_REDIS_URL": str(settings.redis_url),
    }
    worker = subprocess.Popen(  # noqa: S603 - fixed argv of the venv's own celery
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "hub.celery_app:celery_app",
            "worker",
            "--queues",
            str(broker_app.conf.task_default_queue),
            "--concurrency",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
        ],
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    try:
        broker_app.send_task(DRAIN_TASK)
        _wait_for(
            lambda: _statuses(committed, topic) == ["done"] * 3,
            seconds=60,
            what="the worker process to drain the outbox",
        )
        assert worker.poll() is None
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def test_dead_letters_are_replayed_by_the_cli(committed: Engine, settings: Settings) -> None:
    topic = f"test.{uuid.uuid4().hex[:12]}"
    with notifier(None), db.session_scope() as session:
        add_events(session, topic, [{"n": 1}], request_id=None)
        session.execute(
            text("UPDATE outbox_event SET status = 'dead', attempts = 8 WHERE topic = :topic"),
            {"topic": topic},
        )
    result = subprocess.run(  # noqa: S603 - fixed argv of the venv's own waha
        [str(Path(sys.executable).parent / "waha"), "outbox", "replay"],
        cwd=REPO,
        env={**os.environ, "WAHA_ENV": "test", "WAHA_DATABASE_URL": str(settings.database_url)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "1 dead-lettered events re-queued" in result.stdout
    assert _statuses(committed, topic) == ["pending"]
