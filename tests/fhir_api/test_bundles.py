"""Transaction and batch Bundles, replay safety and referential integrity."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from fhir_api import repository, service
from fhir_api.context import SYSTEM_CONTEXT
from fhir_api.errors import BundleInFlight
from fhir_api.writes import WriteSettings
from hub.settings import Settings
from tests.builders import NATIONAL_ID, load_fixture, observation, patient, unit_bundle

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _count(session: Session, table: str) -> int:
    return int(session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())  # noqa: S608


def test_unit_bundle_is_ingested_and_references_rewritten(
    client: TestClient, session: Session
) -> None:
    response = client.post("/fhir", json=unit_bundle("UB1"), headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created"] * 12
    patient_location = body["entry"][0]["response"]["location"]
    patient_id = patient_location.split("/")[1]
    observation_id = body["entry"][5]["response"]["location"].split("/")[1]
    stored = client.get(f"/fhir/Observation/{observation_id}").json()
    assert stored["subject"]["reference"] == f"Patient/{patient_id}"
    assert "urn:uuid" not in str(stored)
    # The 12 entries, and the Provenance of the bundle naming all of them.
    assert _count(session, "fhir_resource") == 13
    assert _count(session, "fhir_resource_version") == 13
    assert _count(session, "outbox_event") == 13
    provenance = session.execute(
        text("SELECT resource FROM fhir_resource WHERE resource_type = 'Provenance'")
    ).scalar_one()
    assert len(provenance["target"]) == 12
    assert all("/_history/1" in target["reference"] for target in provenance["target"])


def test_second_visit_reuses_the_patient(client: TestClient, session: Session) -> None:
    first = client.post("/fhir", json=unit_bundle("UB2"), headers=FHIR_JSON).json()
    second = client.post("/fhir", json=unit_bundle("UB2"), headers=FHIR_JSON).json()
    assert first["entry"][0]["response"]["status"] == "201 Created"
    assert second["entry"][0]["response"]["status"] == "200 OK"
    assert (
        first["entry"][0]["response"]["location"].split("/")[1]
        == second["entry"][0]["fullUrl"].rsplit("/", 1)[1]
    )
    patients = session.execute(
        text("SELECT count(*) FROM fhir_resource WHERE resource_type = 'Patient'")
    ).scalar_one()
    assert patients == 1


def test_replay_returns_first_answer_and_writes_nothing(
    client: TestClient, session: Session
) -> None:
    bundle = unit_bundle("RP1")
    first = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    versions = _count(session, "fhir_resource_version")
    replay = client.post("/fhir", json=copy.deepcopy(bundle), headers=FHIR_JSON)
    assert replay.status_code == first.status_code == 200
    assert replay.json() == first.json()
    assert _count(session, "fhir_resource_version") == versions


def test_replay_with_changed_body_is_409(client: TestClient, session: Session) -> None:
    bundle = unit_bundle("RP2")
    assert client.post("/fhir", json=bundle, headers=FHIR_JSON).status_code == 200
    versions = _count(session, "fhir_resource_version")
    changed = copy.deepcopy(bundle)
    changed["entry"][2]["resource"]["valueQuantity"]["value"] = 99
    response = client.post("/fhir", json=changed, headers=FHIR_JSON)
    assert response.status_code == 409
    assert response.json()["resourceType"] == "OperationOutcome"
    assert _count(session, "fhir_resource_version") == versions


def test_failed_bundle_can_be_retried_under_its_key(client: TestClient, session: Session) -> None:
    bundle = unit_bundle("RP3")
    bundle["entry"][3]["resource"]["status"] = 17
    assert client.post("/fhir", json=bundle, headers=FHIR_JSON).status_code == 422
    bundle["entry"][3]["resource"]["status"] = "final"
    assert client.post("/fhir", json=bundle, headers=FHIR_JSON).status_code == 200
    assert _count(session, "fhir_bundle_receipt") == 1


def test_250_entry_transaction_with_one_invalid_entry_stores_nothing(
    client: TestClient, session: Session
) -> None:
    bundle = unit_bundle("BIG", observations=248)
    assert len(bundle["entry"]) == 250
    bundle["entry"][187]["resource"]["valueQuantity"]["comparatr"] = "<"
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["expression"][0].startswith("Bundle.entry[187].resource.valueQuantity")
    for table in ("fhir_resource", "fhir_resource_version", "fhir_search_date", "outbox_event"):
        assert _count(session, table) == 0
    assert _count(session, "fhir_bundle_receipt") == 0


def test_dangling_reference_in_bundle_is_422(client: TestClient, session: Session) -> None:
    bundle = unit_bundle("DG1", observations=2)
    bundle["entry"][1]["resource"]["location"] = [{"location": {"reference": "Location/nowhere"}}]
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == [
        "Bundle.entry[1].resource.location[0].location.reference"
    ]
    assert _count(session, "fhir_resource") == 0


def test_unresolved_urn_is_422(client: TestClient) -> None:
    bundle = unit_bundle("DG2", observations=1)
    bundle["entry"][2]["resource"]["subject"]["reference"] = f"urn:uuid:{uuid.uuid4()}"
    assert client.post("/fhir", json=bundle, headers=FHIR_JSON).status_code == 422


def test_conditional_reference_is_resolved(client: TestClient) -> None:
    created = client.post("/fhir/Patient", json=patient("CR1"), headers=FHIR_JSON).json()
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation(f"Patient?identifier={NATIONAL_ID}|CR1"),
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    response = client.post(
        "/fhir", json=bundle, headers={**FHIR_JSON, "Prefer": "return=representation"}
    )
    assert response.status_code == 200
    stored = response.json()["entry"][0]["resource"]
    assert stored["subject"]["reference"] == f"Patient/{created['id']}"
    bundle["entry"][0]["resource"] = observation(f"Patient?identifier={NATIONAL_ID}|none")
    refused = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert refused.status_code == 412
    (issue,) = refused.json()["issue"]
    assert issue["code"] == "not-found"
    assert issue["diagnostics"] == "conditional reference Patient?… matched 0 resources"
    assert issue["expression"] == ["Bundle.entry[0].resource.subject.reference"]


def test_same_conditional_create_twice_in_one_bundle_makes_one(
    client: TestClient, session: Session
) -> None:
    bundle = unit_bundle("TW1", observations=1)
    twin = copy.deepcopy(bundle["entry"][0])
    twin["fullUrl"] = f"urn:uuid:{uuid.uuid4()}"
    bundle["entry"].append(twin)
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200
    patients = session.execute(
        text("SELECT count(*) FROM fhir_resource WHERE resource_type = 'Patient'")
    ).scalar_one()
    assert patients == 1


def test_writing_the_same_resource_twice_is_400_class(client: TestClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient(id="p1"), "request": {"method": "PUT", "url": "Patient/p1"}},
            {"resource": patient(id="p1"), "request": {"method": "PUT", "url": "Patient/p1"}},
        ],
    }
    assert client.post("/fhir", json=bundle, headers=FHIR_JSON).status_code in (400, 422)


def test_batch_entries_succeed_or_fail_alone(client: TestClient, session: Session) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient("B1"), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": patient("B2", shoeSize=42),
                "request": {"method": "POST", "url": "Patient"},
            },
            {"request": {"method": "GET", "url": "Patient/not-there"}},
            {"resource": patient(id="b4"), "request": {"method": "PUT", "url": "Patient/b4"}},
        ],
    }
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity", "404 Not Found", "201 Created"]
    outcome = body["entry"][1]["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    # Two entries stored, plus the bundle's Provenance.
    assert _count(session, "fhir_resource") == 3


def test_transaction_processing_order_and_get_entries(client: TestClient) -> None:
    client.put("/fhir/Patient/ord1", json=patient(id="ord1"), headers=FHIR_JSON)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/ord2"}},
            {"resource": patient(id="ord2"), "request": {"method": "PUT", "url": "Patient/ord2"}},
            {"request": {"method": "DELETE", "url": "Patient/ord1"}},
        ],
    }
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert entries[0]["resource"]["id"] == "ord2"
    assert entries[2]["response"]["status"] == "204 No Content"
    assert client.get("/fhir/Patient/ord1").status_code == 410


def test_bundle_shape_errors(client: TestClient) -> None:
    assert client.post("/fhir", json=patient(), headers=FHIR_JSON).status_code == 400
    collection = {"resourceType": "Bundle", "type": "collection", "entry": []}
    assert client.post("/fhir", json=collection, headers=FHIR_JSON).status_code == 400
    no_request = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": patient()}],
    }
    response = client.post("/fhir", json=no_request, headers=FHIR_JSON)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[0]"]


def test_bundle_over_entry_limit_is_413(client: TestClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient/x"}}] * 5001,
    }
    assert client.post("/fhir", json=bundle, headers=FHIR_JSON).status_code == 413


def test_hl7_transaction_example(client: TestClient) -> None:
    bundle = load_fixture("fhir-samples/hl7/bundle-transaction.json")
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    # The example deletes and reads resources this store never had, and carries a
    # Parameters entry for an operation; what it must not do is store half of it.
    assert response.status_code in (200, 400, 404, 412, 422), response.text


def test_request_id_is_echoed_and_generated(client: TestClient) -> None:
    given = client.get("/fhir/metadata", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    assert len(client.get("/fhir/metadata").headers["x-request-id"]) == 32


def test_duplicate_waits_only_as_long_as_allowed(db_engine: Engine, session: Session) -> None:
    bundle = unit_bundle("INFLIGHT", observations=1)
    identifier = f"{bundle['identifier']['system']}|{bundle['identifier']['value']}"
    key = repository.lock_key(f"bundle:{SYSTEM_CONTEXT.owner}:{identifier}")
    # Another connection holds the bundle's key, as an in-flight twin would.
    with db_engine.connect() as twin:
        twin.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        with pytest.raises(BundleInFlight):
            service.process_bundle(
                session,
                bundle,
                context=SYSTEM_CONTEXT,
                settings=WriteSettings(base_url="http://127.0.0.1:8000/fhir"),
                limits=service.BundleLimits(max_entries=100, idempotency_wait_seconds=0.2),
            )
        twin.rollback()


def test_an_entry_named_by_another_spelling_of_its_absolute_full_url_is_that_entry(
    client: TestClient, settings: Settings
) -> None:
    host = settings.fhir_base_url.split("://", 1)[1]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"{settings.fhir_base_url}/Patient/temp-1",
                "resource": {"resourceType": "Patient", "gender": "female"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "pouls"},
                    "subject": {"reference": f"HTTPS://{host}/Patient/temp-1"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    response = client.post("/fhir", json=bundle)
    assert response.status_code == 200, response.text
    patient_url, observation_url = (e["response"]["location"] for e in response.json()["entry"])
    observation = client.get(f"/fhir/{observation_url.rsplit('/_history', 1)[0]}").json()
    assert observation["subject"]["reference"] == patient_url.rsplit("/_history", 1)[0]


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"123", b"null"])
def test_a_body_that_is_no_json_object_is_a_400(client: TestClient, body: bytes) -> None:
    response = client.post("/fhir", content=body, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["code"] == "structure"


@pytest.mark.parametrize("version", ["99999999999", "\u00b2", "abc"])
def test_a_reference_to_a_version_no_row_can_have_is_a_422(
    client: TestClient, version: str
) -> None:
    client.put("/fhir/Patient/ver1", json={"resourceType": "Patient", "id": "ver1"})
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "pouls"},
        "subject": {"reference": f"Patient/ver1/_history/{version}"},
    }
    response = client.post("/fhir/Observation", json=observation)
    assert response.status_code == 422, response.text
    assert response.json()["issue"][0]["code"] == "not-found"


def test_a_batch_entry_waiting_too_long_for_a_lock_fails_alone(
    db_engine: Engine, session: Session
) -> None:
    settings = WriteSettings(base_url="http://127.0.0.1:8000/fhir")
    limits = service.BundleLimits(max_entries=100, idempotency_wait_seconds=0.2)
    marker = f"LOCKED-{uuid.uuid4().hex[:8]}"
    created = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:waha:test", "value": marker}],
                },
                "request": {"method": "POST", "url": "Patient"},
            }
        ],
    }
    _, answer = service.process_bundle(
        session, created, context=SYSTEM_CONTEXT, settings=settings, limits=limits
    )
    patient_id = answer["entry"][0]["response"]["location"].split("/")[1]
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                # Its criteria find the Patient whose write lock another request holds.
                "resource": {"resourceType": "Patient", "gender": "female"},
                "request": {"method": "PUT", "url": f"Patient?identifier=urn:waha:test|{marker}"},
            },
            {
                "resource": {"resourceType": "Patient", "id": "free-one"},
                "request": {"method": "PUT", "url": "Patient/free-one"},
            },
        ],
    }
    key = repository.lock_key(f"res:Patient/{patient_id}")
    with db_engine.connect() as other:
        other.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        status, response = service.process_bundle(
            session, batch, context=SYSTEM_CONTEXT, settings=settings, limits=limits
        )
        other.rollback()
    assert status == 200
    statuses = [entry["response"]["status"][:3] for entry in response["entry"]]
    assert statuses == ["409", "201"]
    # With an identifier its answer would be replayed forever: the whole batch
    # is refused instead, keeps no receipt, and its retry runs again.
    keyed = {**batch, "identifier": {"system": "urn:waha:test", "value": marker}}
    with db_engine.connect() as other:
        other.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        with pytest.raises(BundleInFlight):
            with session.begin_nested():
                service.process_bundle(
                    session, keyed, context=SYSTEM_CONTEXT, settings=settings, limits=limits
                )
        other.rollback()
    status, retried = service.process_bundle(
        session, copy.deepcopy(keyed), context=SYSTEM_CONTEXT, settings=settings, limits=limits
    )
    assert [entry["response"]["status"][:3] for entry in retried["entry"]] == ["200", "200"]
