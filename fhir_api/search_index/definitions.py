"""The R4 SearchParameters and patient CompartmentDefinition, read once from package data."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

import orjson

_PACKAGE = "fhir_api.definitions"
_RESOURCE_LEVEL = ("Resource",)
_DOMAIN_RESOURCE_LEVEL = ("Resource", "DomainResource")
# The R4 resources that are not DomainResources (no narrative, no `_text`).
_PLAIN_RESOURCES = frozenset({"Binary", "Bundle", "Parameters"})


@dataclass(frozen=True, slots=True)
class SearchParameterInfo:
    """What a search parameter is, as the official definition states it."""

    code: str
    type: str
    targets: tuple[str, ...]
    components: tuple[str, ...]
    modifiers: tuple[str, ...]
    comparators: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ComponentDefinition:
    """One component of a composite parameter: the parameter it reuses and its expression."""

    code: str
    type: str
    expression: str


@dataclass(frozen=True, slots=True)
class SearchParameterDefinition:
    """The parts of an R4 SearchParameter the index compiler needs."""

    id: str
    url: str
    code: str
    type: str
    bases: tuple[str, ...]
    expression: str | None
    components: tuple[ComponentDefinition, ...]
    info: SearchParameterInfo


def _read(name: str) -> Any:
    return orjson.loads(resources.files(_PACKAGE).joinpath(name).read_bytes())


@functools.cache
def fhir_version() -> str:
    """Return the FHIR build the shipped definitions come from (e.g. 4.0.1-9346c8cc45)."""
    text = resources.files(_PACKAGE).joinpath("version.info").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("FhirVersion="):
            return line.partition("=")[2].strip()
    raise LookupError("version.info has no FhirVersion")


@functools.cache
def all_definitions() -> tuple[SearchParameterDefinition, ...]:
    """Return every R4 SearchParameter, in the order of the official bundle."""
    raw = [entry["resource"] for entry in _read("search-parameters.json")["entry"]]
    by_url = {resource["url"]: resource for resource in raw}
    definitions: list[SearchParameterDefinition] = []
    for resource in raw:
        components = tuple(
            ComponentDefinition(
                code=by_url[component["definition"]]["code"],
                type=by_url[component["definition"]]["type"],
                expression=component["expression"],
            )
            for component in resource.get("component", ())
        )
        info = SearchParameterInfo(
            code=resource["code"],
            type=resource["type"],
            targets=tuple(resource.get("target", ())),
            components=tuple(component.code for component in components),
            modifiers=tuple(resource.get("modifier", ())),
            comparators=tuple(resource.get("comparator", ())),
        )
        definitions.append(
            SearchParameterDefinition(
                id=resource["id"],
                url=resource["url"],
                code=resource["code"],
                type=resource["type"],
                bases=tuple(resource["base"]),
                expression=resource.get("expression"),
                components=components,
                info=info,
            )
        )
    return tuple(definitions)


@functools.cache
def resource_types() -> frozenset[str]:
    """Return the R4 resource types that have search parameters of their own."""
    bases = {base for definition in all_definitions() for base in definition.bases}
    return frozenset(bases - {"Resource", "DomainResource"})


def inherited_levels(resource_type: str) -> tuple[str, ...]:
    """Return the abstract types whose parameters a resource type inherits."""
    return _RESOURCE_LEVEL if resource_type in _PLAIN_RESOURCES else _DOMAIN_RESOURCE_LEVEL


@functools.cache
def definitions_for(resource_type: str) -> Mapping[str, SearchParameterDefinition]:
    """Return the definitions that apply to a resource type, by code."""
    known = resource_type in resource_types() or resource_type in _PLAIN_RESOURCES
    if not known:
        return MappingProxyType({})
    levels = (*inherited_levels(resource_type), resource_type)
    found = {
        definition.code: definition
        for definition in all_definitions()
        if any(level in definition.bases for level in levels)
    }
    return MappingProxyType(found)


@functools.cache
def search_parameters_for(resource_type: str) -> Mapping[str, SearchParameterInfo]:
    """Return the search parameters of a resource type by code, inherited ones included."""
    infos = {code: item.info for code, item in definitions_for(resource_type).items()}
    return MappingProxyType(infos)


# Types the R4 patient compartment leaves out although they name their patient:
# a Device assigned to one (an implant, a glucose meter), a Contract or a
# GuidanceResponse about one. In Waha's access rules that patient owns them.
OWNED_BY_PATIENT = {
    "Device": ("patient",),
    "Contract": ("patient",),
    "GuidanceResponse": ("patient",),
}


@functools.cache
def patient_owner_params() -> Mapping[str, tuple[str, ...]]:
    """Return, per resource type, the params naming the patients a resource belongs to.

    The patient compartment's, and OWNED_BY_PATIENT's; access and care
    relationships follow these, while `Patient/[id]/[type]` keeps to R4's.
    """
    params = dict(patient_compartment_params())
    for resource_type, owners in OWNED_BY_PATIENT.items():
        params[resource_type] = tuple(dict.fromkeys((*params.get(resource_type, ()), *owners)))
    return MappingProxyType(params)


@functools.cache
def patient_compartment_params() -> Mapping[str, tuple[str, ...]]:
    """Return, per resource type, the params that put it in a patient's compartment."""
    definition = _read("compartmentdefinition-patient.json")
    params = {
        entry["code"]: tuple(entry["param"])
        for entry in definition["resource"]
        if entry.get("param")
    }
    return MappingProxyType(params)
