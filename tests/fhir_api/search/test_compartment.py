"""Compartment search: `Patient/[id]/[type]`, a type search within one patient's compartment."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.builders import observation, patient
from tests.fhir_api.search.helpers import create, found, search


def test_a_compartment_search_finds_the_patients_resources_only(client: TestClient) -> None:
    fatima = create(client, patient("CP-1"))
    other = create(client, patient("CP-2", family="Benali"))
    pulse = create(client, observation(f"Patient/{fatima}", code="8867-4"))
    pressure = create(client, observation(f"Patient/{fatima}", code="8480-6"))
    create(client, observation(f"Patient/{other}", code="8867-4"))
    assert found(client, f"/fhir/Patient/{fatima}/Observation") == {pulse, pressure}
    assert found(client, f"/fhir/Patient/{fatima}/Observation?code=8867-4") == {pulse}
    assert found(client, f"/fhir/Patient/{other}/Observation?code=8480-6") == set()
    assert found(client, f"/fhir/Patient/{fatima}/Patient") == {fatima}
    assert found(client, "/fhir/Patient/nobody/Observation") == set()


def test_a_compartment_searchs_pages_stay_in_the_compartment(client: TestClient) -> None:
    fatima = create(client, patient("CP-3"))
    created = {create(client, observation(f"Patient/{fatima}", value=float(n))) for n in range(5)}
    create(client, observation(f"Patient/{create(client, patient('CP-4'))}"))
    url = f"/fhir/Patient/{fatima}/Observation?_count=2"
    seen: list[str] = []
    while url:
        bundle = search(client, url)
        seen.extend(e["resource"]["id"] for e in bundle.get("entry", []))
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert f"/Patient/{fatima}/Observation" in links["self"]
        url = links.get("next", "")
    assert sorted(seen) == sorted(created)


def test_types_outside_the_compartment_and_other_compartments_are_400(
    client: TestClient,
) -> None:
    fatima = create(client, patient("CP-5"))
    for path in (
        f"/fhir/Patient/{fatima}/Organization",
        f"/fhir/Encounter/{fatima}/Observation",
        f"/fhir/Patient/{fatima}/NotAType",
        f"/fhir/Patient/{fatima}/AuditEvent",
    ):
        response = client.get(path)
        assert response.status_code in (400, 404), (path, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    # The history of a resource keeps its own route.
    assert client.get(f"/fhir/Patient/{fatima}/_history").json()["type"] == "history"


def test_the_capability_statement_names_the_patient_compartment(client: TestClient) -> None:
    rest = client.get("/fhir/metadata").json()["rest"][0]
    assert rest["compartment"] == ["http://hl7.org/fhir/CompartmentDefinition/patient"]


def test_a_malformed_patient_id_in_a_compartment_url_is_a_400(client: TestClient) -> None:
    response = client.get("/fhir/Patient/" + "x" * 65 + "/Observation")
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["code"] == "value"
