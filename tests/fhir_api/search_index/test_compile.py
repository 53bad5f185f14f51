"""Every R4 search expression compiles, or is skipped for a stated reason."""

from __future__ import annotations

import pytest

from fhir_api.search_index.compiler import CompileError, UnknownElement, compile_expression
from fhir_api.search_index.definitions import all_definitions, resource_types
from fhir_api.search_index.extract import (
    R4B_ABSENT_ELEMENTS,
    SKIPPED_PARAMETERS,
    UNSUPPORTED_RESOURCE_TYPES,
    compile_all,
    compile_parameter,
    extractor_for,
)
from fhir_api.search_index.fhirpath import FhirPathSyntaxError, parse
from fhir_api.search_index.model_types import UnknownResourceType, resource_model


def _applicable_types(bases: tuple[str, ...]) -> list[str]:
    if set(bases) & {"Resource", "DomainResource"}:
        return ["Patient", "Bundle"]
    return [base for base in bases if base not in UNSUPPORTED_RESOURCE_TYPES]


def test_every_expression_compiles_or_is_listed() -> None:
    compiled = 0
    for definition in all_definitions():
        if definition.id in SKIPPED_PARAMETERS:
            continue
        assert definition.expression is not None, definition.id
        for resource_type in _applicable_types(definition.bases):
            if (resource_type, definition.code) in R4B_ABSENT_ELEMENTS:
                with pytest.raises(UnknownElement):
                    compile_parameter(definition, resource_type)
                continue
            steps = compile_parameter(definition, resource_type)
            assert steps, (definition.id, resource_type)
            compiled += 1
    assert compiled > 1500


def test_skip_list_holds_only_what_cannot_be_extracted() -> None:
    by_id = {definition.id: definition for definition in all_definitions()}
    for parameter_id, reason in SKIPPED_PARAMETERS.items():
        definition = by_id[parameter_id]
        assert reason
        column = parameter_id in ("Resource-id", "Resource-lastUpdated")
        assert column or definition.expression is None or definition.type == "special"
    assert {
        definition.id for definition in all_definitions() if definition.expression is None
    } <= set(SKIPPED_PARAMETERS)


def test_unsupported_resource_types_have_no_r4b_model() -> None:
    for resource_type in UNSUPPORTED_RESOURCE_TYPES:
        with pytest.raises(UnknownResourceType):
            extractor_for(resource_type)
    for resource_type in resource_types() - UNSUPPORTED_RESOURCE_TYPES:
        resource_model(resource_type)


def test_every_supported_type_compiles() -> None:
    extractors = compile_all()
    assert len(extractors["Observation"].steps) > 40
    assert extractors["Observation"].compartment_params == {"subject", "performer"}


def test_choice_element_expands_to_typed_keys() -> None:
    branches = compile_expression("Observation.value", "Observation")
    by_type = {branch.type_name: branch.keys for branch in branches}
    assert by_type["Quantity"] == ("valueQuantity",)
    assert by_type["CodeableConcept"] == ("valueCodeableConcept",)
    assert by_type["string"] == ("valueString",)


def test_as_keeps_only_the_named_type() -> None:
    for expression in ("(Observation.value as Quantity)", "Observation.value.as(Quantity)"):
        (branch,) = compile_expression(expression, "Observation")
        assert branch.keys == ("valueQuantity",)
    (age,) = compile_expression("Condition.onset.as(Age)", "Condition")
    assert age.keys == ("onsetAge",)
    (date,) = compile_expression("(Goal.target.due as date)", "Goal")
    assert date.keys == ("target", "dueDate")


def test_other_roots_compile_to_nothing() -> None:
    assert compile_expression("Patient.name | Practitioner.name", "Practitioner")[0].keys == (
        "name",
    )
    assert len(compile_expression("Patient.name | Practitioner.name", "Practitioner")) == 1


def test_where_and_extension_filters() -> None:
    (phone,) = compile_expression("Patient.telecom.where(system='phone')", "Patient")
    patient = {
        "telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "a@b"}],
        "extension": [{"url": "u", "valueCode": "x"}, {"url": "v", "valueCode": "y"}],
    }
    assert phone.get(patient) == [{"system": "phone", "value": "1"}]
    branches = compile_expression("Patient.extension('u').value", "Patient")
    assert [value for branch in branches for value in branch.get(patient)] == ["x"]


@pytest.mark.parametrize(
    "expression",
    [
        "Observation.code.first()",
        "Observation.subject.resolve()",
        "Observation.code.coding.where(code.substring(1) = 'x')",
        "Observation.value as",
        "Observation.code +",
        "Observation.code[x]",
        "%context.code",
    ],
)
def test_unsupported_expressions_fail_loudly(expression: str) -> None:
    with pytest.raises((CompileError, FhirPathSyntaxError)):
        compile_expression(expression, "Observation")


def test_where_on_a_choice_element_and_related_artifacts() -> None:
    (successor,) = compile_expression(
        "PlanDefinition.relatedArtifact.where(type='successor').resource", "PlanDefinition"
    )
    plan = {
        "relatedArtifact": [
            {"type": "successor", "resource": "http://x/PlanDefinition/b|2"},
            {"type": "predecessor", "resource": "http://x/PlanDefinition/a"},
        ]
    }
    assert successor.get(plan) == ["http://x/PlanDefinition/b|2"]
    branches = compile_expression("Observation.component.where(value = 'x')", "Observation")
    component = {"component": [{"valueString": "x"}, {"valueString": "y"}, {"valueBoolean": True}]}
    assert branches[0].get(component) == [{"valueString": "x"}]


def test_unknown_element_fails_loudly() -> None:
    with pytest.raises(UnknownElement):
        compile_expression("Observation.nonsense", "Observation")
    with pytest.raises(UnknownElement):
        compile_expression("(Observation.value as Money)", "Observation")


def test_parser_reads_the_r4_shapes() -> None:
    for expression in (
        "Bundle.entry[0].resource",
        "Patient.deceased.exists() and Patient.deceased != false",
        "Task.for.where(resolve() is Patient)",
        "%resource.referenceSeq.chromosome",
        "value.as(Quantity) | value.as(Range)",
    ):
        parse(expression)
    with pytest.raises(FhirPathSyntaxError):
        parse("Patient.name ~ 'x'")
