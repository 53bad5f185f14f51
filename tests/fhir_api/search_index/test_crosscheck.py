"""The compiled extractors select exactly what fhirpathpy selects, on every sample resource."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import fhirpathpy
from fhirpathpy.models import models

from fhir_api.search_index.compiler import Branch, compile_expression
from fhir_api.search_index.definitions import definitions_for
from fhir_api.search_index.encoding import reference_type
from fhir_api.search_index.extract import (
    R4B_ABSENT_ELEMENTS,
    SKIPPED_PARAMETERS,
    UNSUPPORTED_RESOURCE_TYPES,
)

_RESOLVE = re.compile(r"\.where\(resolve\(\) is (\w+)\)")
_AS_OPERATOR = re.compile(r"^\((.*) as (\w+)\)$")
_AS_FUNCTION = re.compile(r"\.as\((\w+)\)")

Term = tuple[Callable[..., list[Any]], str | None]


def _fhirpathpy_terms(expression: str, resource_type: str) -> list[Term]:
    """Split an expression into the union terms fhirpathpy can evaluate for this type."""
    terms: list[Term] = []
    for raw in expression.split(" | "):
        term = raw.strip()
        if term.startswith(("Resource.", "DomainResource.")):
            # fhirpathpy does not match the abstract root type against the resource.
            term = resource_type + term[term.index(".") :]
        if not term.lstrip("(").startswith(f"{resource_type}."):
            continue
        # fhirpathpy has no resolve(): drop the clause and filter by type below.
        match = _RESOLVE.search(term)
        wanted: str | None = match.group(1) if match is not None else None
        term = _RESOLVE.sub("", term)
        # fhirpathpy's `as` insists on a singleton; ofType is the same filter on lists.
        term = _AS_OPERATOR.sub(r"\1.ofType(\2)", term)
        term = _AS_FUNCTION.sub(r".ofType(\1)", term)
        evaluate: Callable[..., list[Any]] = fhirpathpy.compile(term, models["r4"])
        terms.append((evaluate, wanted))
    return terms


def _reference_is(value: Any, wanted: str) -> bool:
    if not isinstance(value, dict):
        return False
    found = reference_type(value.get("reference", ""))
    return (found or str(value.get("type", "")).rsplit("/", 1)[-1]) == wanted


def _canonical(values: list[Any]) -> list[str]:
    # fhirpathpy drops elements that hold only extensions (data-absent-reason);
    # they carry nothing searchable, so both sides ignore them.
    kept = [v for v in values if not (isinstance(v, dict) and set(v) <= {"extension", "id"})]
    return sorted(json.dumps(value, sort_keys=True, default=str) for value in kept)


def test_extractors_match_fhirpathpy(sample_resources: list[dict[str, Any]]) -> None:
    plans: dict[tuple[str, str], tuple[list[Branch], list[Term]]] = {}
    compared = Counter[str]()
    mismatches: list[str] = []
    for resource in sample_resources:
        resource_type = resource["resourceType"]
        if resource_type in UNSUPPORTED_RESOURCE_TYPES:
            continue
        for code, definition in definitions_for(resource_type).items():
            skipped = definition.id in SKIPPED_PARAMETERS or (
                (resource_type, code) in R4B_ABSENT_ELEMENTS
            )
            if skipped or definition.expression is None or definition.type == "composite":
                continue
            key = (resource_type, code)
            if key not in plans:
                plans[key] = (
                    compile_expression(definition.expression, resource_type),
                    _fhirpathpy_terms(definition.expression, resource_type),
                )
            branches, terms = plans[key]
            mine = [value for branch in branches for value in branch.get(resource)]
            theirs: list[Any] = []
            for evaluate, wanted in terms:
                found = evaluate(resource)
                if wanted is not None:
                    found = [value for value in found if _reference_is(value, wanted)]
                theirs.extend(found)
            if _canonical(mine) != _canonical(theirs):
                mismatches.append(f"{resource_type}/{resource.get('id')} {code}")
            if mine:
                compared[resource_type] += 1
    assert mismatches == []
    # The samples exercise the types Waha ingests most.
    for resource_type in ("Observation", "Patient", "Encounter", "Condition", "Practitioner"):
        assert compared[resource_type] > 0
    assert len(plans) > 300
