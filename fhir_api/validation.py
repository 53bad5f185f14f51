"""Strict R4 validation through the fhir.resources R4B models."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from fhir_api.errors import (
    InvalidId,
    InvalidResource,
    UnknownResourceType,
    UnparsableBody,
    UnsupportedResourceType,
)
from fhir_api.required_codes import code_issues
from hub.errors import Issue

JSONObject = dict[str, Any]

ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@cache
def r4_resource_types() -> frozenset[str]:
    """Return every R4 resource type, from the official patient CompartmentDefinition."""
    source = resources.files("fhir_api.definitions") / "compartmentdefinition-patient.json"
    definition = orjson.loads(source.read_bytes())
    return frozenset(entry["code"] for entry in definition["resource"])


def _has_model(resource_type: str) -> bool:
    try:
        get_fhir_model_class(resource_type)
    except (KeyError, AttributeError, ValueError):
        return False
    return True


@cache
def types_without_model() -> frozenset[str]:
    """Return the R4 types the R4B models dropped (MedicinalProduct*, Substance*, ...).

    Storing them unvalidated would break strictness, so Waha refuses them.
    """
    return frozenset(t for t in r4_resource_types() if not _has_model(t))


@cache
def supported_resource_types() -> frozenset[str]:
    """Return the R4 resource types Waha validates and stores."""
    return frozenset(r4_resource_types() - types_without_model())


def check_resource_type(resource_type: str) -> None:
    """Raise unless `resource_type` is one Waha stores."""
    if resource_type in types_without_model():
        raise UnsupportedResourceType(
            f"{resource_type} is an R4 type without a validating model; Waha does not store it"
        )
    if resource_type not in supported_resource_types():
        raise UnknownResourceType(f"unknown resource type {resource_type!r}")


def check_id(resource_id: str) -> None:
    """Raise unless `resource_id` follows the FHIR id rule."""
    if not ID_PATTERN.fullmatch(resource_id):
        raise InvalidResource(
            f"id {resource_id!r} breaks the FHIR id rule [A-Za-z0-9-.]{{1,64}}",
            issues=[Issue("value", "id must match [A-Za-z0-9-.]{1,64}", "id")],
        )


def check_url_id(resource_type: str, resource_id: str) -> None:
    """Raise 400 for an id in the URL that no resource can have (bad syntax, not a bad body)."""
    if not ID_PATTERN.fullmatch(resource_id):
        raise InvalidId(f"{resource_type}/{resource_id[:70]}: ids match [A-Za-z0-9-.]{{1,64}}")


def parse_json(body: bytes) -> Any:
    """Parse a request body as JSON, or raise UnparsableBody."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise UnparsableBody(f"body is not valid JSON: {error}") from error


def _fhirpath(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def validate_resource(resource: Any, *, expected_type: str | None = None) -> JSONObject:
    """Validate one resource strictly; return it unchanged when valid."""
    if not isinstance(resource, dict):
        raise UnparsableBody("a FHIR resource must be a JSON object")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise UnparsableBody("the resource has no resourceType")
    if expected_type is not None and resource_type != expected_type:
        raise InvalidResource(
            f"resourceType {resource_type} does not match the URL's {expected_type}",
            issues=[Issue("invalid", "resourceType disagrees with the URL", "resourceType")],
        )
    check_resource_type(resource_type)
    if "id" in resource and isinstance(resource["id"], str):
        check_id(resource["id"])
    try:
        prune_empty(resource)
    except RecursionError:
        raise InvalidResource(f"{resource_type} nests too deeply to be R4") from None
    model = get_fhir_model_class(resource_type)
    try:
        model.model_validate(resource)
    except ValidationError as error:
        issues = [
            Issue(
                "structure" if item["type"] == "extra_forbidden" else "value",
                _describe(item),
                f"{resource_type}.{_fhirpath(item['loc'])}" if item["loc"] else resource_type,
            )
            for item in error.errors(include_url=False)[:50]
        ]
        raise InvalidResource(
            f"{resource_type} is not valid R4: {issues[0].diagnostics}", issues=issues
        ) from None
    except (TypeError, ValueError) as error:
        raise InvalidResource(f"{resource_type} is not valid R4: {error}") from None
    except RecursionError:
        raise InvalidResource(f"{resource_type} nests too deeply to be R4") from None
    try:
        issues = code_issues(resource)
    except RecursionError:
        raise InvalidResource(f"{resource_type} nests too deeply to be R4") from None
    if issues:
        raise InvalidResource(
            f"{resource_type} is not valid R4: {issues[0].diagnostics}", issues=issues
        )
    return resource


def _describe(item: Any) -> str:
    if item["type"] == "extra_forbidden":
        return f"unknown element {_fhirpath(item['loc'])!r}"
    return f"{_fhirpath(item['loc'])}: {item['msg']}"


def prune_empty(node: dict[str, Any]) -> None:
    """Drop null members and empty objects and arrays, in place (R4 JSON has none).

    Lenient as common servers are (a client's `"birthDate": null` means no
    birth date), and nothing empty is ever stored. A primitive array and its
    extensions (`given` and `_given`) keep their alignment: a position goes
    only when it is empty in both.
    """
    for value in node.values():
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, dict):
                prune_empty(item)
    for key in [key for key in node if key.startswith("_") and key[1:] in node]:
        _prune_pair(node, key[1:], key)
    for key in list(node):
        value = node[key]
        paired = key.startswith("_") and key[1:] in node or f"_{key}" in node
        if isinstance(value, list) and not paired:
            value[:] = [item for item in value if item is not None and item != {}]
        if value is None or value == {} or value == []:
            del node[key]


def _prune_pair(node: dict[str, Any], key: str, extension_key: str) -> None:
    values, extensions = node[key], node[extension_key]
    if not (isinstance(values, list) and isinstance(extensions, list)):
        return
    if len(values) != len(extensions):
        return  # misaligned: the model names the fault
    kept = [
        (value, extension)
        for value, extension in zip(values, extensions, strict=True)
        if value is not None or extension not in (None, {})
    ]
    values[:] = [value for value, _ in kept]
    extensions[:] = [None if extension == {} else extension for _, extension in kept]
    if all(extension is None for extension in extensions):
        del node[extension_key]
