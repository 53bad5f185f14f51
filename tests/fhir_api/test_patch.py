"""The patch interaction: JSON Patch (RFC 6902) applied to the current version as its update."""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from fhirpy import SyncFHIRClient
from sqlalchemy import Engine

from tests.builders import NATIONAL_ID, patient
from tests.fhir_api.search.helpers import FHIR_JSON, create, found

JSON_PATCH = {"Content-Type": "application/json-patch+json"}
AuthHeaders = Callable[[str], dict[str, str]]


def _patch(client: TestClient, path: str, operations: Any, **headers: str) -> httpx.Response:
    response: httpx.Response = client.patch(
        path, json=operations, headers={**JSON_PATCH, **headers}
    )
    return response


def _version(client: TestClient, path: str) -> str:
    return str(client.get(path).json()["meta"]["versionId"])


def test_a_patch_writes_a_new_version_that_search_and_history_see(client: TestClient) -> None:
    patient_id = create(client, patient("PA-1", gender="female"))
    path = f"/fhir/Patient/{patient_id}"
    response = _patch(
        client,
        path,
        [
            {"op": "test", "path": "/gender", "value": "female"},
            {"op": "replace", "path": "/gender", "value": "male"},
            {"op": "add", "path": "/telecom", "value": [{"system": "phone", "value": "0600"}]},
        ],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["gender"] == "male" and body["telecom"][0]["value"] == "0600"
    assert body["meta"]["versionId"] == "2"
    assert response.headers["etag"] == 'W/"2"'
    assert client.get(path).json()["gender"] == "male"
    assert patient_id in found(client, "/fhir/Patient?gender=male&identifier=PA-1")
    assert patient_id not in found(client, "/fhir/Patient?gender=female&identifier=PA-1")
    history = client.get(f"{path}/_history").json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]


def test_if_match_names_the_version_the_patch_was_written_for(client: TestClient) -> None:
    path = f"/fhir/Patient/{create(client, patient('PA-2'))}"
    replace = [{"op": "replace", "path": "/gender", "value": "other"}]
    stale = _patch(client, path, replace, **{"If-Match": 'W/"7"'})
    assert stale.status_code == 412, stale.text
    assert stale.json()["resourceType"] == "OperationOutcome"
    assert _version(client, path) == "1"
    assert _patch(client, path, replace, **{"If-Match": 'W/"1"'}).status_code == 200
    assert _version(client, path) == "2"


@pytest.mark.parametrize(
    ("operations", "says"),
    [
        ([{"op": "test", "path": "/gender", "value": "male"}], "test failed"),
        ([{"op": "remove", "path": "/telecom"}], "cannot be applied"),
        ([{"op": "replace", "path": "/name/5/family", "value": "X"}], "cannot be applied"),
        ([{"op": "replace", "path": "/id", "value": "other"}], "id may not change"),
        ([{"op": "replace", "path": "/resourceType", "value": "Group"}], "may not change"),
        ([{"op": "replace", "path": "/birthDate", "value": "yesterday"}], "birthDate"),
        ([{"op": "add", "path": "/colour", "value": "blue"}], ""),
    ],
)
def test_a_patch_that_cannot_apply_or_gives_an_invalid_resource_is_422_and_writes_nothing(
    client: TestClient, operations: list[dict[str, Any]], says: str
) -> None:
    path = f"/fhir/Patient/{create(client, patient('PA-3', gender='female'))}"
    response = _patch(client, path, operations)
    assert response.status_code == 422, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert says in str(outcome)
    assert _version(client, path) == "1"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'["replace"]',
        b'[{"op": "move", "from": "gender", "path": "/x"}]',
        b'[{"op": "copy", "from": 7, "path": "/x"}]',
        b'[{"op": "bogus", "path": "/gender"}]',
        b'[{"op": "replace", "path": "gender", "value": "male"}]',
        b'[{"op": "replace", "path": "/gender"}]',
        b'[{"op": "move", "path": "/gender"}]',
    ],
)
def test_a_malformed_json_patch_is_400(client: TestClient, body: bytes) -> None:
    path = f"/fhir/Patient/{create(client, patient('PA-4'))}"
    response = client.patch(path, content=body, headers=JSON_PATCH)
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert _version(client, path) == "1"


def test_other_patch_formats_are_415(client: TestClient) -> None:
    path = f"/fhir/Patient/{create(client, patient('PA-5'))}"
    fhirpath_patch = {"resourceType": "Parameters", "parameter": []}
    response = client.patch(
        path, json=fhirpath_patch, headers={"Content-Type": "application/fhir+json"}
    )
    assert response.status_code == 415, response.text
    assert "application/json-patch+json" in str(response.json())
    accepted = "application/json-patch+json, application/merge-patch+json"
    assert response.headers["accept-patch"] == accepted
    xml = client.patch(
        path, content=b"<diff/>", headers={"Content-Type": "application/xml-patch+xml"}
    )
    assert xml.status_code == 415, xml.text
    assert xml.headers["accept-patch"] == accepted


def test_a_merge_patch_merges_objects_replaces_arrays_and_removes_nulls(
    client: TestClient,
) -> None:
    resource = patient("PA-M1", gender="female")
    resource["telecom"] = [{"system": "phone", "value": "0600"}]
    path = f"/fhir/Patient/{create(client, resource)}"
    merge = {
        "gender": "male",
        "telecom": [{"system": "email", "value": "a@waha.health"}],
        "birthDate": None,
    }
    response = client.patch(
        path, json=merge, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["gender"] == "male" and "birthDate" not in body
    assert body["telecom"] == [{"system": "email", "value": "a@waha.health"}]
    assert body["name"] == resource["name"]
    # Plain JSON: an object is a merge patch, an array a JSON Patch.
    plain = {"Content-Type": "application/json"}
    assert client.patch(path, json={"gender": "other"}, headers=plain).json()["gender"] == "other"
    replace = [{"op": "replace", "path": "/gender", "value": "female"}]
    assert client.patch(path, json=replace, headers=plain).json()["gender"] == "female"
    assert _version(client, path) == "4"


@pytest.mark.parametrize(
    ("merge", "status"),
    [
        ({"id": "another"}, 422),
        ({"resourceType": None}, 422),
        ({"gender": 7}, 422),
        (["not", "an", "object"], 400),
        ("text", 400),
    ],
)
def test_a_merge_patch_that_is_not_an_object_or_breaks_the_resource_is_refused(
    client: TestClient, merge: Any, status: int
) -> None:
    path = f"/fhir/Patient/{create(client, patient('PA-M2'))}"
    response = client.patch(
        path, json=merge, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert response.status_code == status, response.text
    assert _version(client, path) == "1"


def test_a_merge_patch_may_not_grow_past_the_limit_nor_nest_too_deeply(
    client: TestClient,
) -> None:
    path = f"/fhir/Patient/{create(client, patient('PA-M3'))}"
    merge_type = {"Content-Type": "application/merge-patch+json"}
    big = {"extension": [{"url": "https://waha.health/x", "valueString": "x" * 1_000_000}] * 40}
    assert client.patch(path, json=big, headers=merge_type).status_code == 413
    nested = '{"extension":' * 1000 + "1" + "}" * 1000
    assert client.patch(path, content=nested, headers=merge_type).status_code == 400
    assert _version(client, path) == "1"


def test_an_empty_patch_changes_nothing(client: TestClient) -> None:
    path = f"/fhir/Patient/{create(client, patient('PA-5E'))}"
    response = _patch(client, path, [])
    assert response.status_code == 200, response.text
    assert response.json()["meta"]["versionId"] == "1"


def test_a_patch_that_would_grow_past_the_size_limit_is_413(client: TestClient) -> None:
    """`copy` doubles what it copies: 40 of them would build a resource of terabytes."""
    resource = patient("PA-5G")
    resource["extension"] = [{"url": "https://waha.health/x", "valueString": "x" * 1000}]
    path = f"/fhir/Patient/{create(client, resource)}"
    doubling = [{"op": "copy", "from": "/extension", "path": "/extension/0/extension"}]
    doubling += [
        {"op": "copy", "from": "/extension/0", "path": "/extension/0/extension/-"}
        for _ in range(40)
    ]
    response = _patch(client, path, doubling)
    assert response.status_code == 413, response.text
    assert _version(client, path) == "1"
    many = [{"op": "test", "path": "/id", "value": "x"}] * 1_001
    assert _patch(client, path, many).status_code == 400


def test_binary_is_not_patchable(client: TestClient) -> None:
    replace = [{"op": "replace", "path": "/contentType", "value": "text/html"}]
    response = _patch(client, "/fhir/Binary/any", replace)
    assert response.status_code == 405, response.text
    statement = client.get("/fhir/metadata").json()
    assert statement["patchFormat"] == [
        "application/json-patch+json",
        "application/merge-patch+json",
    ]
    (binary,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Binary"]
    assert {"code": "patch"} not in binary["interaction"]


def test_absent_and_deleted_resources(client: TestClient) -> None:
    replace = [{"op": "replace", "path": "/gender", "value": "male"}]
    assert _patch(client, "/fhir/Patient/nobody-here", replace).status_code == 404
    path = f"/fhir/Patient/{create(client, patient('PA-6'))}"
    assert client.delete(path).status_code in (200, 204)
    assert _patch(client, path, replace).status_code == 410


def test_a_conditional_patch_patches_the_one_match(client: TestClient) -> None:
    only = create(client, patient("PA-7"))
    replace = [{"op": "replace", "path": "/gender", "value": "male"}]
    response = _patch(client, f"/fhir/Patient?identifier={NATIONAL_ID}|PA-7", replace)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == only
    assert _patch(client, "/fhir/Patient?identifier=nobody", replace).status_code == 404
    create(client, patient("PA-8", family="Twin"))
    create(client, patient("PA-9", family="Twin"))
    assert _patch(client, "/fhir/Patient?family:exact=Twin", replace).status_code == 412
    assert _patch(client, "/fhir/Patient", replace).status_code == 400


def test_a_patch_is_audited_as_a_patch(client: TestClient) -> None:
    path = f"/fhir/Patient/{create(client, patient('PA-10'))}"
    request_id = uuid.uuid4().hex
    response = _patch(
        client,
        path,
        [{"op": "replace", "path": "/gender", "value": "male"}],
        **{"X-Request-Id": request_id},
    )
    assert response.status_code == 200
    events = client.get("/fhir/AuditEvent?subtype=patch&_count=200").json().get("entry", [])
    mine = [e["resource"] for e in events if request_id in str(e["resource"])]
    assert len(mine) == 1
    assert mine[0]["action"] == "U"


def test_the_capability_statement_lists_patch(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    (resource,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Patient"]
    assert {"code": "patch"} in resource["interaction"]


def test_concurrent_patches_are_all_applied(
    live_server: str, committed: Engine, auth_headers: AuthHeaders
) -> None:
    """A patch that loses a race to another write is applied again to the newer version."""
    admin = auth_headers("admin")
    with httpx.Client(base_url=live_server, headers=admin, timeout=30) as http:
        created = http.post(
            "/fhir/Patient",
            json=patient(f"PA-RACE-{uuid.uuid4().hex[:8]}"),
            headers={"Content-Type": "application/fhir+json"},
        )
        assert created.status_code == 201, created.text
        path = f"/fhir/Patient/{created.json()['id']}"
    statuses: list[int] = []

    def add_phones(number: int) -> None:
        with httpx.Client(base_url=live_server, headers=admin, timeout=30) as http:
            for round_number in range(3):
                phone = {"system": "phone", "value": f"06-{number}-{round_number}"}
                operations = [{"op": "add", "path": "/telecom/-", "value": phone}]
                response = http.patch(path, content=orjson.dumps(operations), headers=JSON_PATCH)
                statuses.append(response.status_code)

    with httpx.Client(base_url=live_server, headers=admin, timeout=30) as http:
        seeded = http.patch(
            path,
            content=b'[{"op": "add", "path": "/telecom", "value": [{"value": "seed"}]}]',
            headers=JSON_PATCH,
        )
        assert seeded.status_code == 200, seeded.text
    threads = [threading.Thread(target=add_phones, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with httpx.Client(base_url=live_server, headers=admin, timeout=30) as http:
        final = http.get(path).json()
    phones = {telecom["value"] for telecom in final["telecom"]}
    # Every patch is in the final version: none overwrote another.
    assert statuses == [200] * 12
    assert phones == {"seed"} | {f"06-{n}-{r}" for n in range(4) for r in range(3)}
    assert final["meta"]["versionId"] == "14"


def _binary_patch(operations: list[dict[str, Any]]) -> dict[str, Any]:
    data = base64.b64encode(orjson.dumps(operations)).decode()
    return {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": data}


def _entry(url: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resource": _binary_patch(operations), "request": {"method": "PATCH", "url": url}}


def test_a_transaction_patches_with_binary_json_patches(client: TestClient) -> None:
    first = create(client, patient("PA-T1"))
    create(client, patient("PA-T2"))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(f"Patient/{first}", [{"op": "replace", "path": "/gender", "value": "male"}]),
            _entry(
                f"Patient?identifier={NATIONAL_ID}|PA-T2",
                [{"op": "replace", "path": "/gender", "value": "other"}],
            ),
        ],
    }
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses == ["200 OK", "200 OK"]
    assert client.get(f"/fhir/Patient/{first}").json()["gender"] == "male"
    assert found(client, "/fhir/Patient?identifier=PA-T2&gender=other")


def test_a_transaction_whose_patch_fails_writes_nothing(client: TestClient) -> None:
    first = create(client, patient("PA-T3"))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient("PA-T4"), "request": {"method": "POST", "url": "Patient"}},
            _entry(f"Patient/{first}", [{"op": "test", "path": "/gender", "value": "male"}]),
        ],
    }
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 422, response.text
    assert "Bundle.entry[1]" in str(response.json())
    assert found(client, "/fhir/Patient?identifier=PA-T4") == set()
    assert _version(client, f"/fhir/Patient/{first}") == "1"


@pytest.mark.parametrize(
    ("resource", "says"),
    [
        ({"resourceType": "Parameters", "parameter": []}, "FHIRPath Patch"),
        (
            {"resourceType": "Binary", "contentType": "application/json", "data": "W10="},
            "contentType",
        ),
        ({"resourceType": "Binary", "contentType": "application/json-patch+json"}, "base64"),
        (
            {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": "%%"},
            "base64",
        ),
        (_binary_patch([{"op": "replace", "path": "/gender"}]), "value"),
    ],
)
def test_a_bad_patch_entry_is_400_naming_the_entry(
    client: TestClient, resource: dict[str, Any], says: str
) -> None:
    first = create(client, patient("PA-T5"))
    entry = {"resource": resource, "request": {"method": "PATCH", "url": f"Patient/{first}"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 400, response.text
    assert says in str(response.json()) and "Bundle.entry[0]" in str(response.json())


def test_a_patch_entry_takes_wrapped_base64_and_a_charset_but_not_a_version(
    client: TestClient,
) -> None:
    first = create(client, patient("PA-T6"))
    resource = _binary_patch([{"op": "replace", "path": "/gender", "value": "male"}])
    data = resource["data"]
    resource["data"] = "\n".join(data[n : n + 16] for n in range(0, len(data), 16))
    resource["contentType"] = "application/json-patch+json; charset=utf-8"
    entry = {"resource": resource, "request": {"method": "PATCH", "url": f"Patient/{first}"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    entry["request"]["url"] = f"Patient/{first}/_history/1"
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 400, response.text
    assert "If-Match" in str(response.json())


def test_a_batch_answers_each_patch_on_its_own(client: TestClient) -> None:
    first = create(client, patient("PA-B1"))
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            _entry(f"Patient/{first}", [{"op": "replace", "path": "/gender", "value": "male"}]),
            _entry(f"Patient/{first}", [{"op": "test", "path": "/gender", "value": "female"}]),
            _entry("Patient/nobody-here", [{"op": "remove", "path": "/gender"}]),
        ],
    }
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert [status.split()[0] for status in statuses] == ["200", "422", "404"]
    assert _version(client, f"/fhir/Patient/{first}") == "2"


def test_fhirpy_patches_with_its_own_merge_patches(
    live_server: str, committed: Engine, auth_headers: AuthHeaders
) -> None:
    """fhirpy (a standard client DESIGN.md names) patches with a partial resource as JSON."""
    client = SyncFHIRClient(
        f"{live_server}/fhir", authorization=auth_headers("admin")["Authorization"]
    )
    national_id = f"PA-FHIRPY-{uuid.uuid4().hex[:8]}"
    created = client.resource("Patient", **patient(national_id, gender="female"))
    created.save()
    patched = client.patch("Patient", created.id, gender="male")
    assert patched["gender"] == "male"
    created["birthDate"] = "1970-01-01"
    created.save(fields=["birthDate"])
    conditional = client.resources("Patient").search(identifier=national_id).patch(gender="other")
    assert conditional.id == created.id
    final = client.reference("Patient", created.id).to_resource()
    assert (final["gender"], final["birthDate"], final["meta"]["versionId"]) == (
        "other",
        "1970-01-01",
        "4",
    )
