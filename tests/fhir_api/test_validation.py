"""Which R4 types Waha stores, and the id rule."""

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
