"""Patient/$everything: the compartment, what it references, filters and paging."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from tests.builders import unit_bundle

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _ingest_visits(client: TestClient, national_id: str, visits: int) -> str:
    patient_id = ""
    for _ in range(visits):
        body = client.post(
            "/fhir", json=unit_bundle(national_id, observations=3), headers=FHIR_JSON
        )
        assert body.status_code == 200
        patient_id = body.json()["entry"][0]["fullUrl"].rsplit("/", 1)[1]
    return patient_id


def _all_pages(client: TestClient, url: str) -> list[str]:
    seen: list[str] = []
    next_url: str | None = url
    while next_url:
        page = client.get(next_url.replace("http://127.0.0.1:8000", ""))
        assert page.status_code == 200, page.text
        body = page.json()
        seen.extend(f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body["entry"])
        next_url = next((lk["url"] for lk in body["link"] if lk["relation"] == "next"), None)
    return seen


def test_everything_pages_through_the_whole_compartment(client: TestClient) -> None:
    patient_id = _ingest_visits(client, "EV1", visits=3)
    other = _ingest_visits(client, "EV2", visits=1)
    seen = _all_pages(client, f"/fhir/Patient/{patient_id}/$everything?_count=4")
    # The Patient, 3 visits of an Encounter and 3 Observations, and the
    # Provenance of the first bundle (the one that created the Patient).
    assert len(seen) == len(set(seen)) == 1 + 3 * (1 + 3) + 1
    assert sum(item.startswith("Provenance/") for item in seen) == 1
    assert f"Patient/{other}" not in seen


def test_everything_includes_referenced_non_compartment_resources(client: TestClient) -> None:
    client.put(
        "/fhir/Organization/unit-77",
        json={"resourceType": "Organization", "id": "unit-77", "name": "Unit 77"},
        headers=FHIR_JSON,
    )
    bundle = unit_bundle("EV3", observations=1)
    bundle["entry"][1]["resource"]["serviceProvider"] = {"reference": "Organization/unit-77"}
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    patient_id = response.json()["entry"][0]["fullUrl"].rsplit("/", 1)[1]
    seen = _all_pages(client, f"/fhir/Patient/{patient_id}/$everything")
    assert "Organization/unit-77" in seen


def test_everything_type_and_since_filters(client: TestClient) -> None:
    patient_id = _ingest_visits(client, "EV4", visits=2)
    only = _all_pages(client, f"/fhir/Patient/{patient_id}/$everything?_type=Encounter")
    assert len(only) == 2
    assert all(item.startswith("Encounter/") for item in only)
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    assert _all_pages(client, f"/fhir/Patient/{patient_id}/$everything?_since={future}") == []


def test_everything_unhappy_paths(client: TestClient) -> None:
    assert client.get("/fhir/Patient/nobody/$everything").status_code == 404
    patient_id = _ingest_visits(client, "EV5", visits=1)
    bad_type = client.get(f"/fhir/Patient/{patient_id}/$everything?_type=Spaceship")
    assert bad_type.status_code == 404
    bad_since = client.get(f"/fhir/Patient/{patient_id}/$everything?_since=yesterday")
    assert bad_since.status_code == 400
    naive = client.get(f"/fhir/Patient/{patient_id}/$everything?_since=2026-01-01T00:00:00")
    assert naive.status_code == 400
    bad_cursor = client.get(f"/fhir/Patient/{patient_id}/$everything?_cursor=xyz")
    assert bad_cursor.status_code == 400


def test_history_since_filters_versions(client: TestClient) -> None:
    _ingest_visits(client, "EV6", visits=1)
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    empty = client.get(f"/fhir/_history?_since={future}").json()
    assert empty["entry"] == []
    assert empty["total"] == 0
    everything = client.get("/fhir/_history?_count=100").json()
    assert everything["total"] == 5 + 1  # and the bundle's Provenance
