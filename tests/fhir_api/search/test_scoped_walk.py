"""A restricted caller's date walks test each row's patient before reading its resource."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from auth import policy
from fhir_api.models import CareRelationshipRow
from fhir_api.search import SearchScope, repository, search
from fhir_api.search.parser import parse_search
from fhir_api.search_index import at_most_one_patient
from tests.builders import patient
from tests.fhir_api.search.helpers import JSON, caller_scope, create

BASE = "http://127.0.0.1:8000/fhir"
UNIT = "walk-scope-unit"
WINDOW = [("date", "ge2032-07-01"), ("date", "lt2032-08-01")]


def _observation(day: int, *, subject: str | None = None, performer: str | None = None) -> JSON:
    resource: JSON = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
        "effectiveDateTime": f"2032-07-{day:02d}T10:00:00Z",
    }
    if subject is not None:
        resource["subject"] = {"reference": f"Patient/{subject}"}
    if performer is not None:
        resource["performer"] = [{"reference": f"Patient/{performer}"}]
    return resource


@pytest.fixture
def observations(client: TestClient, session: Session) -> dict[str, Any]:
    """July 2032 observations the unit may and may not see, and what it sees, latest first."""
    first, second = sorted(create(client, patient(f"WS{n}")) for n in range(2))
    own = create(client, patient("WS-OWN"))
    # The unit cares for `own` and `second`, not `first`: an observation of
    # `first` performed by `second` is indexed under `first`, its lower id.
    session.add_all(
        [
            CareRelationshipRow(grantee=f"unit:{UNIT}", patient_id=own),
            CareRelationshipRow(grantee=f"unit:{UNIT}", patient_id=second),
        ]
    )
    session.flush()
    made = {
        "own": create(client, _observation(2, subject=own)),
        "second": create(client, _observation(4, subject=second)),
        "both": create(client, _observation(6, subject=first, performer=second)),
        "nobody": create(client, _observation(8)),
    }
    hidden = [create(client, _observation(day, subject=first)) for day in range(10, 30)]
    return {
        "made": made,
        "hidden": hidden,
        "visible": [made[name] for name in ("nobody", "both", "second", "own")],
    }


# How a walk tests its rows' patients: a probe each for the first
# PROBED_ROWS (all of these few rows, by default), then against a hash of the
# caller's patients, or still by probe past HASHED_PATIENTS of them.
PATIENT_TESTS = {
    "probed": {},
    "hashed": {"PROBED_ROWS": 1},
    "past the hash bound": {"PROBED_ROWS": 1, "HASHED_PATIENTS": 1},
}


@pytest.fixture(params=list(PATIENT_TESTS))
def patient_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test under each way of testing patients; the bounds are in the SQL."""
    for name, value in PATIENT_TESTS[request.param].items():
        monkeypatch.setattr(policy, name, value)
    monkeypatch.setattr(repository, "_TEMPLATES", {})
    return str(request.param)


def _found(
    session: Session,
    pairs: list[tuple[str, str]],
    count: int,
    scope: SearchScope | None = None,
) -> list[str]:
    """Return the ids of a search's first page of `count`, searched as the unit."""
    bundle = orjson.loads(
        orjson.dumps(
            search(
                session,
                resource_type="Observation",
                pairs=[*pairs, ("_count", str(count))],
                base_url=BASE,
                scope=scope or caller_scope(UNIT),
            )
        )
    )
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


@pytest.mark.parametrize("count", [2, 3, 50])
@pytest.mark.usefixtures("patient_test")
def test_a_windowed_walk_finds_what_the_unit_may_see(
    session: Session, observations: dict[str, Any], count: int
) -> None:
    pairs = [*WINDOW, ("_sort", "-date")]
    parsed = parse_search(["Observation"], pairs, base_url=BASE)
    assert repository.walks_dates(session, parsed.criteria, parsed.sort)
    assert _found(session, pairs, count) == observations["visible"][:count]
    ascending = _found(session, [*WINDOW, ("_sort", "date")], count)
    assert ascending == list(reversed(observations["visible"]))[:count]


@pytest.mark.usefixtures("patient_test")
def test_an_unbounded_walk_finds_what_the_unit_may_see(
    session: Session, observations: dict[str, Any]
) -> None:
    parsed = parse_search(["Observation"], [("_sort", "-date")], base_url=BASE)
    assert repository.walks_sort_dates(session, parsed.criteria, parsed.sort)
    found = _found(session, [("_sort", "-date")], 1000)
    ours = set(observations["visible"]) | set(observations["hidden"])
    assert [i for i in found if i in ours] == observations["visible"]
    # The same search by another unit reuses the statement with that unit's patients.
    assert any(isinstance(k, tuple) and k[0] == "sort walk" for k in repository._TEMPLATES)
    elsewhere = _found(session, [("_sort", "-date")], 1000, caller_scope("walk-scope-other"))
    assert [i for i in elsewhere if i in ours] == [observations["made"]["nobody"]]


def _bundle(session: Session, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    found: dict[str, Any] = orjson.loads(
        orjson.dumps(
            search(
                session,
                resource_type="Observation",
                pairs=pairs,
                base_url=BASE,
                scope=caller_scope(UNIT),
            )
        )
    )
    return found


def _link(bundle: dict[str, Any], relation: str) -> list[tuple[str, str]] | None:
    for link in bundle.get("link", []):
        if link["relation"] == relation:
            return parse_qsl(urlsplit(link["url"]).query)
    return None


@pytest.mark.parametrize("order", ["-date", "date"])
@pytest.mark.usefixtures("patient_test")
def test_pages_after_a_cursor_and_back_find_what_the_unit_may_see(
    session: Session, observations: dict[str, Any], order: str
) -> None:
    """Each page's rows are numbered from its cursor: probes, then the hash, on every page."""
    expected = observations["visible"]
    if order == "date":
        expected = list(reversed(expected))
    pages = [_bundle(session, [*WINDOW, ("_sort", order), ("_count", "1")])]
    while (following := _link(pages[-1], "next")) is not None:
        pages.append(_bundle(session, following))
    assert [e["resource"]["id"] for page in pages for e in page.get("entry", [])] == expected
    back = pages[-1]
    walked_back: list[str] = []
    while (preceding := _link(back, "previous")) is not None:
        back = _bundle(session, preceding)
        walked_back = [e["resource"]["id"] for e in back.get("entry", [])] + walked_back
    assert walked_back == expected[:-1]


def _walk_plan(session: Session) -> dict[str, Any]:
    """Return EXPLAIN ANALYZE of the unit's windowed walk, run with its own parameters."""
    parsed = parse_search(["Observation"], [*WINDOW, ("_sort", "-date")], base_url=BASE)
    statement = repository.first_page_statement(
        criteria=parsed.criteria,
        sort=parsed.sort,
        limit=10,
        scope=caller_scope(UNIT),
        walk_dates=True,
        walk_sort_dates=False,
    )
    compiled = statement.compile(session.get_bind(), compile_kwargs={"render_postcompile": True})
    # Written into the SQL, so that even a generic plan knows the hashed set's bound.
    assert f"LIMIT {policy.HASHED_PATIENTS}" in str(compiled)
    explain = f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}"
    explained = session.connection().exec_driver_sql(explain, dict(compiled.params))
    top: dict[str, Any] = explained.scalar_one()[0]["Plan"]
    return top


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _nodes(child))]


@pytest.mark.usefixtures("patient_test")
def test_the_walk_reads_no_resource_of_another_units_single_patient(
    session: Session, observations: dict[str, Any]
) -> None:
    checked = [
        n
        for n in _nodes(_walk_plan(session))
        if n.get("Relation Name") == "fhir_resource" and n.get("Alias") == "r"
    ]
    assert checked
    read = sum(n["Actual Loops"] for n in checked if n["Actual Loops"])
    # The four it may see are read; the twenty of `first` alone are not.
    assert read <= len(observations["visible"])


def test_a_walk_within_its_probed_rows_neither_counts_nor_hashes_the_patients(
    session: Session, observations: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probed one by one, the window's 24 rows cost less than the caller's hash would."""
    del observations
    monkeypatch.setattr(repository, "_TEMPLATES", {})

    def whole_set_reads(plan: dict[str, Any]) -> list[int]:
        """Return the loops of the subplans that read all the caller's patients.

        The count (LIMIT 1 OFFSET bound) and the hashed set (LIMIT bound); the
        probes read one care row each.
        """
        return [
            n["Actual Loops"]
            for n in _nodes(plan)
            if n.get("Parent Relationship") in ("InitPlan", "SubPlan")
            and n["Node Type"] == "Limit"
            and any(m.get("Relation Name") == "care_relationship" for m in _nodes(n))
        ]

    assert whole_set_reads(_walk_plan(session)) == [0, 0]
    # Past the probed rows, the count runs once and the hash is built once.
    monkeypatch.setattr(policy, "PROBED_ROWS", 1)
    monkeypatch.setattr(repository, "_TEMPLATES", {})
    assert whole_set_reads(_walk_plan(session)) == [1, 1]


def test_an_administrator_whose_token_narrows_the_types_walks_every_patient(
    session: Session, observations: dict[str, Any]
) -> None:
    scope = caller_scope(UNIT, "admin", frozenset({"user/Observation.rs"}))
    assert scope.condition is not None
    found = _found(session, [*WINDOW, ("_sort", "-date")], 50, scope)
    assert sorted(found) == sorted(observations["visible"] + observations["hidden"])


def test_which_types_have_at_most_one_patient() -> None:
    assert at_most_one_patient("Encounter")  # subject
    assert at_most_one_patient("Organization")  # none
    assert not at_most_one_patient("Observation")  # subject, performer
    assert not at_most_one_patient("Appointment")  # actor, repeating
    assert not at_most_one_patient("Patient")  # itself and those it links to


def test_a_patient_linked_to_the_units_patient_is_found_by_the_walk(
    client: TestClient, session: Session
) -> None:
    """A Patient is indexed under its own id, which the unit may not know: the link decides."""
    own = create(client, patient("WS-LINKED-OWN", birthDate="2031-05-01"))
    linked = create(
        client,
        patient(
            "WS-LINKED",
            birthDate="2031-05-02",
            link=[{"other": {"reference": f"Patient/{own}"}, "type": "seealso"}],
        ),
    )
    stranger = create(client, patient("WS-STRANGER", birthDate="2031-05-03"))
    session.add(CareRelationshipRow(grantee=f"unit:{UNIT}", patient_id=own))
    session.flush()
    bundle = orjson.loads(
        orjson.dumps(
            search(
                session,
                resource_type="Patient",
                pairs=[("_sort", "-birthdate"), ("_count", "1000")],
                base_url=BASE,
                scope=caller_scope(UNIT),
            )
        )
    )
    found = [e["resource"]["id"] for e in bundle.get("entry", [])]
    assert [i for i in found if i in {own, linked, stranger}] == [linked, own]
