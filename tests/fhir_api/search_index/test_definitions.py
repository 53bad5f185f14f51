"""The shipped R4 definitions and the parameter metadata read from them."""

from __future__ import annotations

from collections import Counter
from importlib import resources

import orjson

from fhir_api.search_index import (
    SearchParameterInfo,
    fhir_version,
    patient_compartment_params,
    search_parameters_for,
)
from fhir_api.search_index.definitions import all_definitions


def test_definitions_ship_as_package_data() -> None:
    names = {item.name for item in resources.files("fhir_api.definitions").iterdir()}
    assert {
        "search-parameters.json",
        "compartmentdefinition-patient.json",
        "version.info",
        "README.md",
    } <= names
    assert fhir_version() == "4.0.1-9346c8cc45"


def test_every_r4_search_parameter_is_read() -> None:
    definitions = all_definitions()
    assert len(definitions) == 1378
    types = Counter(definition.type for definition in definitions)
    assert types["composite"] == 46
    assert types["special"] == 1


def test_observation_parameters_include_resource_level_ones() -> None:
    parameters = search_parameters_for("Observation")
    assert {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"} <= set(parameters)
    subject = parameters["subject"]
    assert subject.type == "reference"
    assert "Patient" in subject.targets and "Group" in subject.targets
    assert "missing" in subject.modifiers or subject.modifiers == ()
    assert parameters["value-quantity"].comparators[:3] == ("eq", "ne", "gt")


def test_composite_components_are_parameter_codes_in_order() -> None:
    observation = search_parameters_for("Observation")
    assert observation["code-value-quantity"].components == ("code", "value-quantity")
    assert observation["combo-code-value-concept"].components == (
        "combo-code",
        "combo-value-concept",
    )
    relationship = search_parameters_for("DocumentReference")["relationship"]
    assert relationship.components == ("relatesto", "relation")


def test_plain_resources_have_no_narrative_parameter() -> None:
    assert "_text" not in search_parameters_for("Bundle")
    assert "_text" in search_parameters_for("Patient")
    assert "_id" in search_parameters_for("Binary")


def test_unknown_resource_type_has_no_parameters() -> None:
    assert search_parameters_for("NotAResource") == {}


def test_info_is_frozen_value() -> None:
    info = search_parameters_for("Patient")["gender"]
    assert info == SearchParameterInfo("gender", "token", (), (), info.modifiers, ())


def test_patient_compartment_matches_the_definition() -> None:
    compartment = patient_compartment_params()
    assert compartment["Observation"] == ("subject", "performer")
    assert compartment["Encounter"] == ("subject",)
    assert compartment["Patient"] == ("link",)
    assert "Practitioner" not in compartment
    raw = orjson.loads(
        resources.files("fhir_api.definitions")
        .joinpath("compartmentdefinition-patient.json")
        .read_bytes()
    )
    assert len(compartment) == sum(1 for entry in raw["resource"] if entry.get("param"))
