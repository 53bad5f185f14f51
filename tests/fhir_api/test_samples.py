"""Real third-party R4 data (Inferno, Synthea bulk export, HL7 examples) ingests as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from fhir_api import service
from fhir_api.context import SYSTEM_CONTEXT
from fhir_api.writes import WriteSettings
from tests.builders import FIXTURES, load_fixture

FHIR_JSON = {"Content-Type": "application/fhir+json"}
SAMPLES = FIXTURES / "fhir-samples"
# Dependency order for the bulk export: referenced types first.
BULK_ORDER = (
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "Patient",
    "Device",
    "Encounter",
    "Condition",
    "AllergyIntolerance",
    "Immunization",
    "MedicationRequest",
    "Procedure",
    "DocumentReference",
)


@pytest.mark.parametrize(
    "name",
    [
        "inferno/uscore_bundle_patient_85.json",
        "inferno/uscore_bundle_patient_907.json",
        "inferno/pdex_bundle_patient_999.json",
        "inferno/carin_bundle_patient_888.json",
        "hl7/questionnaire-profile-example-ussg-fht.json",
    ],
)
def test_inferno_and_hl7_transactions_ingest(client: TestClient, name: str) -> None:
    bundle = load_fixture(f"fhir-samples/{name}")
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200, response.text[:2000]
    entries = response.json()["entry"]
    assert len(entries) == len(bundle["entry"])
    assert all(e["response"]["status"].startswith(("200", "201")) for e in entries)


def test_inferno_bundle_with_an_invalid_element_is_refused_whole(
    client: TestClient, session: Session
) -> None:
    # This published bundle carries Period.stop (R4 has only start/end) in entry 266.
    bundle = load_fixture("fhir-samples/inferno/uscore_bundle_patient_355.json")
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 422
    expressions = [e for issue in response.json()["issue"] for e in issue["expression"]]
    assert "Bundle.entry[266].resource.effectivePeriod.stop" in expressions
    assert session.execute(text("SELECT count(*) FROM fhir_resource")).scalar_one() == 0


def test_hl7_example_with_dangling_references_needs_relaxed_integrity(
    client: TestClient, session: Session
) -> None:
    # The HL7 genetics example points at Patient/119 and ServiceRequest/123,
    # which it does not contain: refused by default, stored when relaxed.
    bundle = load_fixture("fhir-samples/hl7/diagnosticreport-hla-genetics-results-example.json")
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 422
    diagnostics = {issue["diagnostics"] for issue in response.json()["issue"]}
    assert "Patient/119 does not exist" in diagnostics
    status, answer = service.process_bundle(
        session,
        bundle,
        context=SYSTEM_CONTEXT,
        settings=WriteSettings(
            base_url="http://127.0.0.1:8000/fhir", enforce_referential_integrity=False
        ),
        limits=service.BundleLimits(max_entries=5000, idempotency_wait_seconds=5),
    )
    assert status == 200
    assert len(answer["entry"]) == 22


def test_inferno_patient_everything_returns_the_record(client: TestClient) -> None:
    bundle = load_fixture("fhir-samples/inferno/uscore_bundle_patient_85.json")
    assert client.post("/fhir", json=bundle, headers=FHIR_JSON).status_code == 200
    seen: list[str] = []
    url: str | None = "/fhir/Patient/85/$everything?_count=100"
    while url:
        page = client.get(url.replace("http://127.0.0.1:8000", "")).json()
        seen.extend(f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in page["entry"])
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert len(seen) == len(set(seen))
    assert "Patient/85" in seen
    observations = [s for s in seen if s.startswith("Observation/")]
    assert len(observations) == 66


def _bulk_resources(resource_type: str) -> list[dict[str, Any]]:
    path = Path(SAMPLES / "bulk10" / f"{resource_type}.000.ndjson")
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def test_synthea_bulk_export_ingests_with_referential_integrity(
    client: TestClient, session: Session
) -> None:
    total = 0
    for resource_type in BULK_ORDER:
        resources = _bulk_resources(resource_type)
        for start in range(0, len(resources), 1000):
            chunk = resources[start : start + 1000]
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": resource,
                        "request": {"method": "PUT", "url": f"{resource_type}/{resource['id']}"},
                    }
                    for resource in chunk
                ],
            }
            response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
            assert response.status_code == 200, (resource_type, response.text[:2000])
            total += len(chunk)
    stored = session.execute(
        text("SELECT count(*) FROM fhir_resource WHERE resource_type <> 'Provenance'")
    ).scalar_one()
    assert stored == total == 7160
