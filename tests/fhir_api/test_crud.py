"""Create, read, vread, update, delete and history over HTTP."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from hub.settings import Settings
from tests.builders import NATIONAL_ID, observation, patient

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _create(client: TestClient, resource: dict[str, object]) -> dict[str, object]:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_metadata_is_an_r4_capability_statement(client: TestClient) -> None:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in body["rest"][0]["resource"]}
    assert {"Patient", "Observation", "Media"} <= types
    assert "MedicinalProduct" not in types
    patient_params = next(r for r in body["rest"][0]["resource"] if r["type"] == "Patient")
    assert "identifier" in {p["name"] for p in patient_params["searchParam"]}


def test_metadata_says_how_to_authenticate(client: TestClient, settings: Settings) -> None:
    rest = client.get("/fhir/metadata", headers={"Authorization": ""}).json()["rest"][0]
    security = rest["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris["token"] == f"{settings.oidc_issuer}/protocol/openid-connect/token"
    audit = next(r for r in rest["resource"] if r["type"] == "AuditEvent")
    assert [i["code"] for i in audit["interaction"]] == ["read", "search-type"]


def test_create_sets_server_fields_and_headers(client: TestClient) -> None:
    sent = patient(id="client-chosen")
    sent["meta"] = {"versionId": "99", "lastUpdated": "2001-01-01T00:00:00Z"}
    response = client.post("/fhir/Patient", json=sent, headers=FHIR_JSON)
    assert response.status_code == 201
    body = response.json()
    assert body["id"] != "client-chosen"
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["location"].endswith(f"/fhir/Patient/{body['id']}/_history/1")
    assert "last-modified" in response.headers
    read = client.get(f"/fhir/Patient/{body['id']}")
    assert read.status_code == 200
    assert read.json() == body


def test_application_json_is_accepted_and_other_types_are_415(client: TestClient) -> None:
    ok = client.post("/fhir/Patient", json=patient(), headers={"Content-Type": "application/json"})
    assert ok.status_code == 201
    refused = client.post(
        "/fhir/Patient", content=b"<Patient/>", headers={"Content-Type": "application/xml"}
    )
    assert refused.status_code == 415
    assert refused.json()["resourceType"] == "OperationOutcome"


def test_invalid_json_is_400_operation_outcome(client: TestClient) -> None:
    response = client.post("/fhir/Patient", content=b"{not json", headers=FHIR_JSON)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_unknown_element_is_422_naming_the_path(client: TestClient) -> None:
    response = client.post("/fhir/Patient", json=patient(favouriteColour="blue"), headers=FHIR_JSON)
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["expression"] == ["Patient.favouriteColour"]


def test_bad_value_is_422(client: TestClient) -> None:
    response = client.post("/fhir/Patient", json=patient(birthDate="02/04/1961"), headers=FHIR_JSON)
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == ["Patient.birthDate"]


def test_type_mismatch_with_url_is_rejected(client: TestClient) -> None:
    response = client.post("/fhir/Observation", json=patient(), headers=FHIR_JSON)
    assert response.status_code == 422


def test_unknown_and_modelless_types_are_refused(client: TestClient) -> None:
    assert client.get("/fhir/Spaceship/1").status_code == 404
    response = client.post(
        "/fhir/MedicinalProduct",
        json={"resourceType": "MedicinalProduct"},
        headers=FHIR_JSON,
    )
    assert response.status_code == 400
    assert response.json()["issue"][0]["code"] == "not-supported"


def test_read_missing_is_404_and_bad_id_is_rejected(client: TestClient) -> None:
    assert client.get("/fhir/Patient/does-not-exist").status_code == 404
    assert client.get("/fhir/Patient/" + "x" * 65).status_code == 400


def test_update_as_create_with_client_id(client: TestClient) -> None:
    response = client.put("/fhir/Patient/85", json=patient(id="85"), headers=FHIR_JSON)
    assert response.status_code == 201
    assert response.json()["meta"]["versionId"] == "1"
    again = client.put("/fhir/Patient/85", json=patient(id="85", gender="male"), headers=FHIR_JSON)
    assert again.status_code == 200
    assert again.json()["meta"]["versionId"] == "2"
    assert again.headers["etag"] == 'W/"2"'


def test_update_needs_matching_id(client: TestClient) -> None:
    assert client.put("/fhir/Patient/a1", json=patient(), headers=FHIR_JSON).status_code == 422
    mismatched = client.put("/fhir/Patient/a1", json=patient(id="b2"), headers=FHIR_JSON)
    assert mismatched.status_code == 422


def test_if_match_stale_is_412_and_current_succeeds(client: TestClient) -> None:
    created = _create(client, patient())
    url = f"/fhir/Patient/{created['id']}"
    body = {**created, "gender": "male"}
    stale = client.put(url, json=body, headers={**FHIR_JSON, "If-Match": 'W/"7"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    fresh = client.put(url, json=body, headers={**FHIR_JSON, "If-Match": 'W/"1"'})
    assert fresh.status_code == 200
    assert client.get(url).json()["gender"] == "male"


def test_vread_and_history_keep_every_version(client: TestClient) -> None:
    created = _create(client, patient())
    url = f"/fhir/Patient/{created['id']}"
    client.put(url, json={**created, "gender": "male"}, headers=FHIR_JSON)
    assert client.get(f"{url}/_history/1").json()["gender"] == "female"
    assert client.get(f"{url}/_history/2").json()["gender"] == "male"
    assert client.get(f"{url}/_history/3").status_code == 404
    assert client.get(f"{url}/_history/x").status_code == 404
    history = client.get(f"{url}/_history").json()
    assert history["type"] == "history"
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]


def test_delete_keeps_history_and_read_is_410(client: TestClient) -> None:
    created = _create(client, patient())
    url = f"/fhir/Patient/{created['id']}"
    assert client.delete(url).status_code == 204
    gone = client.get(url)
    assert gone.status_code == 410
    assert gone.json()["resourceType"] == "OperationOutcome"
    assert client.delete(url).status_code == 204
    history = client.get(f"{url}/_history").json()
    assert history["entry"][0]["request"]["method"] == "DELETE"
    assert "resource" not in history["entry"][0]
    assert client.get(f"{url}/_history/1").status_code == 200
    assert client.get(f"{url}/_history/2").status_code == 410
    recreated = client.put(url, json={**created, "meta": {}}, headers=FHIR_JSON)
    assert recreated.status_code == 201
    assert recreated.json()["meta"]["versionId"] == "3"


def test_delete_of_never_existing_is_404(client: TestClient) -> None:
    assert client.delete("/fhir/Patient/never-was").status_code == 404


def test_type_history_pages_without_gaps(client: TestClient) -> None:
    ids = {str(_create(client, patient(f"PG{n}"))["id"]) for n in range(5)}
    seen: list[str] = []
    url: str | None = "/fhir/Patient/_history?_count=2"
    while url:
        page = client.get(url.replace("http://127.0.0.1:8000", "")).json()
        seen.extend(e["resource"]["id"] for e in page["entry"])
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert set(seen) == ids
    assert len(seen) == len(ids)
    # A type's history is not counted page by page; it has a total when it fits.
    assert "total" not in client.get("/fhir/Patient/_history?_count=2").json()
    assert client.get("/fhir/Patient/_history?_count=50").json()["total"] == 5
    assert client.get("/fhir/Patient/_history?_cursor=garbage!!").status_code == 400


def test_prefer_return_minimal_and_operation_outcome(client: TestClient) -> None:
    minimal = client.post(
        "/fhir/Patient", json=patient(), headers={**FHIR_JSON, "Prefer": "return=minimal"}
    )
    assert minimal.status_code == 201
    assert minimal.content == b""
    assert minimal.headers["location"]
    outcome = client.post(
        "/fhir/Patient",
        json=patient("X2"),
        headers={**FHIR_JSON, "Prefer": "return=OperationOutcome"},
    )
    assert outcome.json()["resourceType"] == "OperationOutcome"


def test_conditional_create_returns_the_existing_resource(client: TestClient) -> None:
    first = _create(client, patient("CC1"))
    condition = {"If-None-Exist": f"identifier={NATIONAL_ID}|CC1"}
    again = client.post("/fhir/Patient", json=patient("CC1"), headers={**FHIR_JSON, **condition})
    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    other = client.post("/fhir/Patient", json=patient("CC2"), headers={**FHIR_JSON, **condition})
    assert other.status_code == 200


def test_conditional_create_with_two_matches_is_412(client: TestClient) -> None:
    _create(client, patient("DUP"))
    _create(client, patient("DUP"))
    response = client.post(
        "/fhir/Patient",
        json=patient("DUP"),
        headers={**FHIR_JSON, "If-None-Exist": f"identifier={NATIONAL_ID}|DUP"},
    )
    assert response.status_code == 412


def test_conditional_create_with_unknown_parameter_is_400(client: TestClient) -> None:
    response = client.post(
        "/fhir/Patient",
        json=patient(),
        headers={**FHIR_JSON, "If-None-Exist": "shoe-size=42"},
    )
    assert response.status_code == 400


def test_conditional_update_creates_then_updates(client: TestClient) -> None:
    url = f"/fhir/Patient?identifier={NATIONAL_ID}|CU1"
    created = client.put(url, json=patient("CU1"), headers=FHIR_JSON)
    assert created.status_code == 201
    updated = client.put(url, json=patient("CU1", gender="male"), headers=FHIR_JSON)
    assert updated.status_code == 200
    assert updated.json()["id"] == created.json()["id"]
    assert updated.json()["meta"]["versionId"] == "2"


def test_conditional_delete(client: TestClient) -> None:
    created = _create(client, patient("CD1"))
    assert client.delete(f"/fhir/Patient?identifier={NATIONAL_ID}|CD1").status_code == 204
    assert client.get(f"/fhir/Patient/{created['id']}").status_code == 410
    assert client.delete(f"/fhir/Patient?identifier={NATIONAL_ID}|none").status_code == 204


def test_dangling_reference_is_422_naming_the_path(client: TestClient) -> None:
    response = client.post(
        "/fhir/Observation", json=observation("Patient/nobody"), headers=FHIR_JSON
    )
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["expression"] == ["Observation.subject.reference"]


def test_reference_to_existing_resource_is_accepted(client: TestClient) -> None:
    created = _create(client, patient())
    response = client.post(
        "/fhir/Observation", json=observation(f"Patient/{created['id']}"), headers=FHIR_JSON
    )
    assert response.status_code == 201


def test_search_by_identifier_and_id(client: TestClient) -> None:
    created = _create(client, patient("SR1"))
    found = client.get(f"/fhir/Patient?identifier={NATIONAL_ID}|SR1").json()
    assert [e["resource"]["id"] for e in found["entry"]] == [created["id"]]
    by_code = client.get("/fhir/Patient?identifier=SR1").json()
    assert len(by_code["entry"]) == 1
    by_id = client.get(f"/fhir/Patient?_id={created['id']}").json()
    assert len(by_id["entry"]) == 1


def test_body_over_limit_is_413(client: TestClient) -> None:
    huge = b"x" * (33 * 1024 * 1024)
    response = client.post("/fhir/Patient", content=huge, headers=FHIR_JSON)
    assert response.status_code == 413
    assert response.json()["resourceType"] == "OperationOutcome"


def test_errors_outside_fhir_are_problem_json(client: TestClient) -> None:
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 404


def test_update_with_unchanged_content_writes_no_version(client: TestClient) -> None:
    created = _create(client, patient("NOOP"))
    url = f"/fhir/Patient/{created['id']}"
    same = {key: value for key, value in created.items() if key != "meta"}
    again = client.put(url, json=same, headers=FHIR_JSON)
    assert again.status_code == 200
    assert again.headers["etag"] == 'W/"1"'
    assert again.json()["meta"]["versionId"] == "1"
    history = client.get(f"{url}/_history").json()
    assert history["total"] == 1
    changed = client.put(url, json={**same, "gender": "male"}, headers=FHIR_JSON)
    assert changed.headers["etag"] == 'W/"2"'


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"Accept": "application/fhir+xml"}, {}),
        ({"Accept": "text/html"}, {}),
        ({}, {"_format": "xml"}),
        ({"Accept": "application/fhir+json"}, {"_format": "text/turtle"}),
    ],
)
def test_a_format_waha_does_not_write_is_a_406(
    client: TestClient, headers: dict[str, str], params: dict[str, str]
) -> None:
    for path in ("/fhir/Patient", "/fhir/metadata"):
        response = client.get(path, headers=headers, params=params)
        assert response.status_code == 406, (path, response.text)
        assert response.json()["issue"][0]["code"] == "not-supported"


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}, {}),
        ({"Accept": "application/fhir+json; fhirVersion=4.0"}, {}),
        ({"Accept": "application/json"}, {}),
        ({"Accept": "application/fhir+xml"}, {"_format": "json"}),
        ({}, {"_format": "application/fhir+json"}),
        ({"Accept": "application/*+json"}, {}),
    ],
)
def test_json_is_answered_whenever_the_client_takes_it(
    client: TestClient, headers: dict[str, str], params: dict[str, str]
) -> None:
    assert client.get("/fhir/Patient", headers=headers, params=params).status_code == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_the_capability_statement_is_only_read(client: TestClient, method: str) -> None:
    response = client.request(method, "/fhir/metadata")
    assert response.status_code == 405, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("path", ["/fhir/Patient/" + "x" * 65, "/fhir/Patient/a_b/_history"])
def test_a_malformed_id_in_the_url_is_a_400(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 400, response.text
    assert response.json()["issue"][0]["code"] == "value"


def test_an_unencoded_format_and_several_accept_headers_are_read_as_meant(
    client: TestClient,
) -> None:
    # `_format=application/fhir+json` typed as is: its plus arrives as a space.
    assert client.get("/fhir/Patient?_format=application/fhir+json").status_code == 200
    assert client.get("/fhir/metadata?_format=application/json+fhir").status_code == 200
    several = [("Accept", "application/xml"), ("Accept", "application/fhir+json")]
    assert client.get("/fhir/Patient", headers=several).status_code == 200
