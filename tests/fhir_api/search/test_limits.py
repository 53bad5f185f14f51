"""What one search may ask for, and long value lists planned through the index."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from bench.search import generic_plan
from fhir_api.search import repository
from fhir_api.search.parser import MAX_PARAMETERS, MAX_VALUES, parse_search
from hub import db
from hub.settings import Settings
from tests.builders import NATIONAL_ID, patient
from tests.fhir_api.search.helpers import create, found

BASE = "http://127.0.0.1:8000/fhir"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _identifiers(count: int, *known: str) -> str:
    return ",".join([*known, *(f"{NATIONAL_ID}|absent-{n}" for n in range(count - len(known)))])


def test_a_long_list_of_identifiers_finds_its_patients(client: TestClient) -> None:
    first = create(client, patient("LIM-1"))
    second = create(client, patient("LIM-2"))
    values = _identifiers(MAX_VALUES, f"{NATIONAL_ID}|LIM-1", f"{NATIONAL_ID}|LIM-2")
    # Twice: the second search reuses the first one's statement with its slot.
    for _ in range(2):
        response = client.post("/fhir/Patient/_search", data={"identifier": values}, headers=FORM)
        assert response.status_code == 200, response.text
        assert {e["resource"]["id"] for e in response.json()["entry"]} == {first, second}
    refs = ",".join([f"Patient/{first}", *(f"Patient/absent-{n}" for n in range(40))])
    assert found(client, f"/fhir/Patient?link={refs}") == set()
    assert found(client, f"/fhir/Patient?identifier:not={values}&_id={first},{second}") == set()


def test_more_values_than_a_search_takes_is_a_too_costly_400(client: TestClient) -> None:
    values = _identifiers(MAX_VALUES + 1)
    response = client.post("/fhir/Patient/_search", data={"identifier": values}, headers=FORM)
    assert response.status_code == 400, response.text
    issue = response.json()["issue"][0]
    assert issue["code"] == "too-costly"
    assert f"{MAX_VALUES:,} values" in issue["diagnostics"]


def test_more_parameters_than_a_search_takes_is_a_too_costly_400(client: TestClient) -> None:
    query = "&".join("gender=female" for _ in range(MAX_PARAMETERS + 1))
    response = client.get(f"/fhir/Patient?{query}")
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["code"] == "too-costly"
    within = "&".join("gender=female" for _ in range(MAX_PARAMETERS))
    assert client.get(f"/fhir/Patient?{within}").status_code == 200


@pytest.mark.parametrize("opaque", [True, False])
def test_many_keys_are_looked_up_in_the_token_index_even_in_a_custom_plan(
    session: Session, monkeypatch: pytest.MonkeyPatch, opaque: bool
) -> None:
    """Seeing 200 keys, PostgreSQL expected most patients to match and tested each in turn."""
    if not opaque:
        # As before: the keys written into the plan (the check below sees the difference).
        monkeypatch.setattr(repository, "OPAQUE_KEYS", 10**6)
    session.execute(
        text(
            "INSERT INTO fhir_resource (resource_type, id, version_id, last_updated, tokens)"
            " SELECT 'Patient', 'bulk-' || n, 1, now(),"
            "  ARRAY['identifier=urn:bulk|' || n, 'identifier=' || n, 'gender=female']"
            " FROM generate_series(1, 20000) AS n"
        )
    )
    session.execute(text("ANALYZE fhir_resource"))
    values = ",".join(f"urn:bulk|{n}" for n in range(1, 200))
    parsed = parse_search(["Patient"], parse_qsl(f"identifier={values}"), base_url=BASE)
    template = repository.first_page_template(
        criteria=parsed.criteria,
        sort=parsed.sort,
        limit=parsed.count + 1,
        scope=repository.UNRESTRICTED,
        walk_dates=False,
        walk_sort_dates=False,
    )
    assert template is not None
    plan = generic_plan(session.connection(), *template, custom=True)
    assert ("ix_fhir_resource_tokens" in plan) == opaque, plan


def test_a_statement_past_the_timeout_is_a_503_too_costly(
    client: TestClient, session: Session
) -> None:
    """The API bounds every statement (settings.database_statement_timeout_ms)."""
    session.execute(
        text(
            "INSERT INTO fhir_resource (resource_type, id, version_id, last_updated, tokens)"
            " SELECT 'Patient', 'slow-' || n, 1, now(),"
            "  ARRAY['identifier=urn:slow|' || n, 'identifier=' || n, 'gender=female']"
            " FROM generate_series(1, 20000) AS n"
        )
    )
    # The requests join this test's transaction: its bound is theirs.
    session.execute(text("SET LOCAL statement_timeout = '50ms'"))
    # Every patient tested against a thousand keys, every one of them counted.
    values = _identifiers(MAX_VALUES)
    response = client.post(
        "/fhir/Patient/_search",
        data={"identifier:not": values, "_total": "accurate"},
        headers=FORM,
    )
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    issue = response.json()["issue"][0]
    assert issue["code"] == "too-costly"
    session.execute(text("SET LOCAL statement_timeout = 0"))
    assert client.get("/fhir/Patient?_id=slow-1").status_code == 200


def test_the_apis_engine_bounds_its_statements(settings: Settings) -> None:
    bounded = db.make_engine(settings, statement_timeout_ms=1234)
    unbounded = db.make_engine(settings)
    try:
        with bounded.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "1234ms"
        with unbounded.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
    finally:
        bounded.dispose()
        unbounded.dispose()
