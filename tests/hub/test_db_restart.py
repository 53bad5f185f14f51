"""A database restart breaks pooled connections: reads and the audit recover on their own."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from hub import db
from hub.settings import Settings
from tests.builders import patient
from tests.conftest import ADMIN_URL


def _break_pooled_connections(settings: Settings) -> int:
    """Terminate every server process of the app role on the test database, as a restart does."""
    name = str(settings.database_url).rsplit("/", 1)[1]
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        ended = connection.execute(
            text(
                # Waits up to 5 s for each to end: a backend still alive after the call
                # would answer one more query and hide the break.
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
                "FROM pg_stat_activity "
                "WHERE datname = :name AND usename = 'waha_app' AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        ).scalar_one()
    admin.dispose()
    return int(ended)


@pytest.fixture(autouse=True)
def _fresh_pool_afterwards(db_engine: Engine) -> Iterator[None]:
    """Leave no connection these tests broke in the pool the next tests share."""
    yield
    db_engine.dispose()


def _count_patients(session: Session) -> int:
    return int(
        session.execute(
            text("SELECT count(*) FROM fhir_resource WHERE resource_type = 'Patient'")
        ).scalar_one()
    )


def test_a_read_on_a_broken_pooled_connection_runs_again(
    committed: Engine, settings: Settings
) -> None:
    assert db.run_read(_count_patients) == 0  # leaves a connection in the pool
    assert _break_pooled_connections(settings) >= 1
    assert db.run_read(_count_patients) == 0


def test_other_database_errors_are_not_repeated(committed: Engine) -> None:
    calls: list[int] = []

    def broken(session: Session) -> None:
        calls.append(1)
        session.execute(text("SELECT * FROM no_such_table"))

    with pytest.raises(ProgrammingError):
        db.run_read(broken)
    assert calls == [1]


def test_searches_and_their_audit_survive_a_restart(
    live_server: str,
    committed: Engine,
    settings: Settings,
    auth_headers: Callable[[str], dict[str, str]],
) -> None:
    headers = auth_headers("admin")
    with httpx.Client(base_url=live_server, headers=headers, timeout=30) as api:
        created = api.post("/fhir/Patient", json=patient("RESTART1"))
        assert created.status_code == 201, created.text
        assert api.get("/fhir/Patient?identifier=RESTART1").status_code == 200
        assert _break_pooled_connections(settings) >= 1
        again = api.get("/fhir/Patient?identifier=RESTART1")
        assert again.status_code == 200, again.text
        assert [e["resource"]["id"] for e in again.json()["entry"]] == [created.json()["id"]]
        assert api.get(f"/fhir/Patient/{created.json()['id']}").status_code == 200


def test_the_audit_trail_survives_a_restart(
    live_server: str, committed: Engine, settings: Settings
) -> None:
    # A refused token touches no record: the audit writer is the first to meet the break.
    with httpx.Client(base_url=live_server, timeout=30) as api:
        wrong = {"Authorization": "Bearer not-a-token"}
        assert api.get("/fhir/Patient", headers=wrong).status_code == 401
        assert _break_pooled_connections(settings) >= 1
        assert api.get("/fhir/Patient", headers=wrong).status_code == 401
    with committed.connect() as connection:
        events = connection.execute(text("SELECT count(*) FROM audit_event")).scalar_one()
    assert events == 2  # both refusals are in the trail


def test_a_write_on_a_broken_connection_fails_once_and_retries_cleanly(
    live_server: str,
    committed: Engine,
    settings: Settings,
    auth_headers: Callable[[str], dict[str, str]],
) -> None:
    with httpx.Client(base_url=live_server, headers=auth_headers("admin"), timeout=30) as api:
        assert api.get("/fhir/Patient?identifier=RESTART2").status_code == 200
        assert _break_pooled_connections(settings) >= 1
        first = api.post("/fhir/Patient", json=patient("RESTART2"))
        # Nothing was written: the client is told to retry, and the retry stores it once.
        assert first.status_code == 503, first.text
        assert first.headers["retry-after"] == "1"
        assert first.json()["issue"][0]["code"] == "transient"
        again = api.post("/fhir/Patient", json=patient("RESTART2"))
        assert again.status_code == 201, again.text
        found = api.get("/fhir/Patient?identifier=RESTART2&_total=accurate").json()
        assert found["total"] == 1
