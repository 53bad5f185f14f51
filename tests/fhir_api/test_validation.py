"""Which R4 types Waha stores, the id rule, and R4's required code bindings."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B import get_fhir_model_class

from fhir_api.errors import InvalidResource
from fhir_api.validation import (
    check_id,
    r4_resource_types,
    supported_resource_types,
    types_without_model,
    validate_resource,
)
from tests.builders import patient

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def test_every_supported_type_has_a_validating_model() -> None:
    assert len(r4_resource_types()) == 145
    for resource_type in supported_resource_types():
        assert get_fhir_model_class(resource_type).__name__ == resource_type


def test_types_without_model_are_refused_clearly(client: TestClient) -> None:
    assert len(types_without_model()) == 18
    assert {"MedicinalProduct", "SubstanceSpecification", "SubstancePolymer"} <= (
        types_without_model()
    )
    for resource_type in sorted(types_without_model()):
        response = client.post(
            f"/fhir/{resource_type}", json={"resourceType": resource_type}, headers=FHIR_JSON
        )
        assert response.status_code == 400, resource_type
        assert response.json()["issue"][0]["code"] == "not-supported"


@pytest.mark.parametrize("good", ["85", "a.b-C", "x" * 64, "7d0f6a8e-2b8c-4c51-9a63-1f0e9b2d4a01"])
def test_fhir_ids_are_accepted(good: str) -> None:
    check_id(good)


@pytest.mark.parametrize("bad", ["", "x" * 65, "a_b", "a b", "é", "a/b"])
def test_bad_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidResource):
        check_id(bad)


def test_if_none_match_star_refuses_to_overwrite(client: TestClient) -> None:
    client.put("/fhir/Patient/inm1", json=patient(id="inm1"), headers=FHIR_JSON)
    refused = client.put(
        "/fhir/Patient/inm1", json=patient(id="inm1"), headers={**FHIR_JSON, "If-None-Match": "*"}
    )
    assert refused.status_code == 412
    created = client.put(
        "/fhir/Patient/inm2", json=patient(id="inm2"), headers={**FHIR_JSON, "If-None-Match": "*"}
    )
    assert created.status_code == 201


def test_a_code_outside_its_required_value_set_is_refused_and_nothing_stored(
    client: TestClient,
) -> None:
    robot = {**patient(id="code1"), "gender": "robot"}
    response = client.put("/fhir/Patient/code1", json=robot, headers=FHIR_JSON)
    assert response.status_code == 422, response.text
    issue = response.json()["issue"][0]
    assert issue["code"] == "code-invalid"
    assert issue["expression"] == ["Patient.gender"]
    assert "administrative-gender" in issue["diagnostics"]
    assert "female, male, other, unknown" in issue["diagnostics"]
    assert client.get("/fhir/Patient/code1").status_code == 404


def test_bound_codes_are_checked_in_data_types_backbones_and_contained_resources() -> None:
    observation = {
        "resourceType": "Observation",
        "status": "done",
        "code": {"text": "pouls"},
        "valueQuantity": {"value": 60, "comparator": "about"},
        "referenceRange": [{"low": {"value": 1}}],
        "component": [{"code": {"text": "x"}, "valueQuantity": {"value": 1, "comparator": "<"}}],
        "contained": [{"resourceType": "Patient", "id": "p", "name": [{"use": "nick"}]}],
        "extension": [{"url": "http://example.org/x", "valueQuantity": {"comparator": "~"}}],
    }
    with pytest.raises(InvalidResource) as refused:
        validate_resource(observation)
    assert [(issue.code, issue.expression) for issue in refused.value.issues] == [
        ("code-invalid", "Observation.status"),
        ("code-invalid", "Observation.valueQuantity.comparator"),
        ("code-invalid", "Observation.contained[0].name[0].use"),
        ("code-invalid", "Observation.extension[0].valueQuantity.comparator"),
    ]


def test_codes_from_every_part_of_a_value_set_are_accepted() -> None:
    # Value sets assembled from several code systems, hierarchies and imports.
    validate_resource(
        {
            "resourceType": "Observation",
            "status": "entered-in-error",
            "code": {"text": "x"},
            "valueQuantity": {"value": 1, "comparator": ">="},
            "effectiveTiming": {"repeat": {"periodUnit": "wk", "when": ["ACM", "MORN"]}},
        }
    )
    validate_resource({"resourceType": "Patient", "telecom": [{"system": "sms", "use": "mobile"}]})


def test_bundle_entries_name_the_entry_of_a_bad_code(client: TestClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient(id="code2"), "request": {"method": "PUT", "url": "Patient/code2"}},
            {
                "resource": {**patient(id="code3"), "gender": "M"},
                "request": {"method": "PUT", "url": "Patient/code3"},
            },
        ],
    }
    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
    assert response.status_code == 422, response.text
    issue = response.json()["issue"][0]
    assert issue["code"] == "code-invalid"
    assert issue["expression"] == ["Bundle.entry[1].resource.gender"]
    assert client.get("/fhir/Patient/code2").status_code == 404


def test_nulls_and_empty_elements_are_dropped_before_storing(client: TestClient) -> None:
    sent = {
        **patient(id="empty1"),
        "birthDate": None,
        "meta": {},
        "telecom": [],
        "maritalStatus": {"coding": [{}]},
        "address": [{"line": ["1 rue Atlas", None], "city": "Taroudant"}],
    }
    response = client.put("/fhir/Patient/empty1", json=sent, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    stored = client.get("/fhir/Patient/empty1").json()
    assert "birthDate" not in stored and "telecom" not in stored
    assert "maritalStatus" not in stored
    assert stored["address"] == [{"line": ["1 rue Atlas"], "city": "Taroudant"}]
    # A null that aligns a primitive's extension with its value stays.
    aligned = {
        "resourceType": "Patient",
        "name": [
            {
                "given": ["Fatima", None],
                "_given": [None, {"extension": [{"url": "http://x", "valueString": "y"}]}],
            }
        ],
    }
    assert validate_resource(aligned)["name"][0]["given"] == ["Fatima", None]
    # A position empty in both arrays goes; extensions left with nothing go too.
    emptied = {
        "resourceType": "Patient",
        "name": [{"given": ["Fatima", None, "Zahra"], "_given": [None, {}, {"extension": []}]}],
    }
    assert validate_resource(emptied)["name"] == [{"given": ["Fatima", "Zahra"]}]


def test_a_resource_nested_beyond_reason_is_a_clear_error(client: TestClient) -> None:
    # Built as text: JSON encoders refuse this depth themselves.
    depth = 450  # within the JSON parser's limit, beyond the validators' recursion
    body = (
        '{"resourceType": "Patient", "extension": '
        + '[{"url": "http://example.org/x", "extension": ' * depth
        + '[{"url": "http://example.org/x", "valueString": "x"}]'
        + "}]" * depth
        + "}"
    )
    response = client.post("/fhir/Patient", content=body, headers=FHIR_JSON)
    assert response.status_code == 422, response.text
    assert "nests too deeply" in response.json()["issue"][0]["diagnostics"]
