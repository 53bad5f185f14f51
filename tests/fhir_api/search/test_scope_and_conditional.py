"""The scope hook narrows every query in SQL; conditional interactions share the parser."""

from __future__ import annotations

import uuid

import orjson
from fastapi.testclient import TestClient
from sqlalchemy import ColumnElement, FromClause, text
from sqlalchemy.orm import Session

from fhir_api.search import SearchScope, search
from tests.builders import NATIONAL_ID, observation, patient
from tests.fhir_api.search.helpers import FHIR_JSON, create, ids

BASE = "http://127.0.0.1:8000/fhir"


def _not_patient(hidden: str) -> SearchScope:
    def condition(resource: FromClause) -> ColumnElement[bool]:
        return ~((resource.c.resource_type == "Patient") & (resource.c.id == hidden))

    return SearchScope(condition)


def test_scope_hides_resources_from_matches_includes_chains_and_has(
    client: TestClient, session: Session
) -> None:
    hidden = create(client, patient("SC1", family="Hidden"))
    shown = create(client, patient("SC2", family="Shown"))
    hidden_obs = create(client, observation(f"Patient/{hidden}", code="8480-6"))
    scope = _not_patient(hidden)

    def run(resource_type: str, query: str) -> dict[str, object]:
        pairs = [tuple(p.split("=", 1)) for p in query.split("&")]
        bundle = search(
            session,
            resource_type=resource_type,
            pairs=[(name, value) for name, value in pairs],
            base_url=BASE,
            scope=scope,
        )
        # Stored resources are embedded as orjson fragments: read them as a client would.
        return dict(orjson.loads(orjson.dumps(bundle)))

    assert ids(run("Patient", "gender=female")) == {shown}
    included = run("Observation", f"_id={hidden_obs}&_include=Observation:subject")
    assert ids(included) == {hidden_obs}
    assert ids(included, "include") == set()
    assert ids(run("Observation", "subject.name=hidden")) == set()
    assert ids(run("Patient", "_has:Observation:subject:code=8480-6")) == set()
    unrestricted = search(
        session,
        resource_type="Patient",
        pairs=[("_has:Observation:subject:code", "8480-6")],
        base_url=BASE,
    )
    assert ids(orjson.loads(orjson.dumps(unrestricted))) == {hidden}


def test_conditional_create_with_a_date_criterion(client: TestClient) -> None:
    existing = create(client, patient("CC1", family="Alaoui", birthDate="1970-05-06"))
    headers = {**FHIR_JSON, "If-None-Exist": "family=alaoui&birthdate=1970-05"}
    again = client.post("/fhir/Patient", json=patient("CC1"), headers=headers)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == existing
    other = {**FHIR_JSON, "If-None-Exist": "family=alaoui&birthdate=1971"}
    assert client.post("/fhir/Patient", json=patient("CC9"), headers=other).status_code == 201


def test_conditional_criteria_refuse_unknown_and_shaping_parameters(client: TestClient) -> None:
    unknown = {**FHIR_JSON, "If-None-Exist": "shoe-size=42"}
    response = client.post("/fhir/Patient", json=patient("CC2"), headers=unknown)
    assert response.status_code == 400
    shaping = {**FHIR_JSON, "If-None-Exist": f"identifier={NATIONAL_ID}|CC2&_include=*"}
    assert client.post("/fhir/Patient", json=patient("CC2"), headers=shaping).status_code == 400


def test_conditional_update_by_token_text_in_one_bundle(client: TestClient) -> None:
    coded = observation("Patient/x")
    coded.pop("subject")
    coded["code"]["text"] = "Pouls"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": coded, "request": {"method": "POST", "url": "Observation"}},
            {
                "resource": {**coded, "status": "amended"},
                "request": {"method": "PUT", "url": "Observation?code:text=pouls"},
            },
        ],
    }
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    # Both entries name the same resource: the in-bundle match is found and refused as a duplicate.
    assert response.status_code == 422, response.text


def test_conditional_creates_on_a_date_match_inside_one_bundle(
    client: TestClient, session: Session
) -> None:
    criteria = "family=doublon&birthdate=1980-02"
    entries = [
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": patient("DB1", family="Doublon", birthDate="1980-02-14"),
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": criteria},
        }
        for _ in range(2)
    ]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    # The second entry matched the first one's new Patient in memory (dates included).
    patients = session.execute(
        text("SELECT count(*) FROM fhir_resource WHERE resource_type = 'Patient'")
    ).scalar_one()
    assert patients == 1
