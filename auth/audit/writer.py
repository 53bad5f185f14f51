"""Group commit for the audit trail: one transaction for the events of concurrent requests.

Every audited request waits until its event is committed (so no answer leaves
with its audit lost), but a commit waits for the disk. One writer thread per
process takes whatever events are queued, writes them with one COPY and one
commit, and wakes each request: under load many requests share a flush.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy.orm import Session, sessionmaker

from auth.audit import service
from auth.audit.errors import AuditUnavailable

log = structlog.get_logger()

# Bounded so that a flood of requests becomes several commits, not one huge COPY.
MAX_BATCH = 256


@dataclass(slots=True)
class _Pending:
    record: service.AuditRecord
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


def _settle_all(futures: list[asyncio.Future[None]], error: AuditUnavailable | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class AuditWriter:
    """Write audit events in batches from a daemon thread; callers await their commit."""

    def __init__(self, bind: Callable[[], sessionmaker[Session]]) -> None:
        # A callable, read per batch: tests rebind the session factory.
        self.bind = bind
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def write(self, record: service.AuditRecord) -> None:
        """Queue one event and return once it is committed (AuditUnavailable if it cannot be)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._ensure_thread()
        self._queue.put(_Pending(record, future, loop))
        await future

    def _ensure_thread(self) -> None:
        # Started on first use, in the serving process (after any fork).
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="waha-audit-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            error: AuditUnavailable | None = None
            try:
                service.record(self.bind(), [pending.record for pending in batch])
            except AuditUnavailable as failure:
                error = failure
            except Exception:  # noqa: BLE001 - the writer must outlive any one batch
                log.exception("auth.audit_writer_failed", events=len(batch))
                error = AuditUnavailable("the audit trail cannot be written; retry later")
            # One wake-up per event loop, not per request: each is a write to
            # the loop's self-pipe, and a batch mostly serves one loop.
            futures_by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for pending in batch:
                futures_by_loop.setdefault(pending.loop, []).append(pending.future)
            for loop, futures in futures_by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle_all, futures, error)
                except RuntimeError:
                    # The requests' event loop is gone (clients went away at shutdown).
                    continue
