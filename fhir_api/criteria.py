"""Search criteria of conditional interactions (If-None-Exist, conditional update,
delete and references), evaluated in SQL and against a bundle's own new resources.

The full search API builds on the same index encodings; this module covers what
conditional operations need: `_id`, token, reference, string and uri parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

from fhir_api import repository
from fhir_api.errors import UnsupportedSearch
from fhir_api.search_index import IndexValues, normalize_string, search_parameters_for

# Result-shaping parameters that do not narrow which resources match.
IGNORED_PARAMETERS = frozenset({"_format", "_pretty", "_summary", "_elements", "_count", "_sort"})

Kind = Literal["id", "token", "reference", "string", "string-exact", "uri"]


@dataclass(frozen=True, slots=True)
class Criterion:
    """One parameter of a query: any of `keys` may match (comma means OR)."""

    kind: Kind
    param: str
    keys: tuple[str, ...]


def normalized_query(query: str) -> str:
    """Return a canonical form of a query string, used as a lock key."""
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{name}={value}" for name, value in pairs)


def _split_values(raw: str) -> list[str]:
    # A comma separates alternatives unless escaped as \, (R4 search, "Escaping").
    parts: list[str] = []
    current = ""
    escaped = False
    for char in raw:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _local_reference(value: str, base_url: str) -> str:
    if value.startswith(base_url + "/"):
        return value[len(base_url) + 1 :]
    return value


def parse_criteria(resource_type: str, query: str, *, base_url: str) -> list[Criterion]:
    """Parse a conditional query for `resource_type`; raise on what cannot be evaluated."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        raise UnsupportedSearch("a conditional interaction needs at least one search parameter")
    parameters = search_parameters_for(resource_type)
    criteria: list[Criterion] = []
    for name, raw in pairs:
        code, _, modifier = name.partition(":")
        if code in IGNORED_PARAMETERS:
            continue
        values = _split_values(raw)
        if code == "_id":
            criteria.append(Criterion("id", code, tuple(values)))
            continue
        info = parameters.get(code)
        if info is None:
            raise UnsupportedSearch(f"unknown search parameter {code!r} for {resource_type}")
        if info.type == "token" and modifier in ("", "of-type"):
            param = code if not modifier else f"{code}:of-type"
            criteria.append(Criterion("token", code, tuple(f"{param}={v}" for v in values)))
        elif (
            info.type == "reference"
            and modifier in ("", "identifier")
            or (info.type == "reference" and modifier in info.targets)
        ):
            criteria.append(_reference_criterion(code, modifier, values, info.targets, base_url))
        elif info.type == "string" and modifier in ("", "exact"):
            if modifier == "exact":
                criteria.append(Criterion("string-exact", code, tuple(values)))
            else:
                keys = tuple(normalize_string(v) for v in values)
                criteria.append(Criterion("string", code, keys))
        elif info.type == "uri" and modifier == "":
            criteria.append(Criterion("uri", code, tuple(values)))
        else:
            raise UnsupportedSearch(
                f"parameter {name!r} ({info.type}) is not supported in conditional criteria"
            )
    if not criteria:
        raise UnsupportedSearch("a conditional interaction needs at least one search parameter")
    return criteria


def _reference_criterion(
    code: str, modifier: str, values: list[str], targets: Sequence[str], base_url: str
) -> Criterion:
    if modifier == "identifier":
        return Criterion("token", code, tuple(f"{code}:identifier={v}" for v in values))
    keys: list[str] = []
    for value in values:
        local = _local_reference(value, base_url)
        if modifier:
            keys.append(f"{code}={modifier}/{local}")
        elif "/" in local:
            keys.append(f"{code}={local}")
        else:
            # An id alone may name any of the parameter's target types.
            keys.extend(f"{code}={target}/{local}" for target in targets)
    return Criterion("reference", code, tuple(keys))


def to_conditions(resource_type: str, criteria: Sequence[Criterion]) -> list[Any]:
    """Turn criteria into SQL conditions over the current-resource table."""
    conditions: list[Any] = []
    for criterion in criteria:
        if criterion.kind == "id":
            conditions.append(repository.id_in(criterion.keys))
        elif criterion.kind == "token":
            conditions.append(repository.tokens_overlap(criterion.keys))
        elif criterion.kind == "reference":
            conditions.append(repository.refs_overlap(criterion.keys))
        elif criterion.kind == "string":
            conditions.append(
                repository.string_starts_with(resource_type, criterion.param, criterion.keys)
            )
        elif criterion.kind == "string-exact":
            conditions.append(
                repository.string_equals(resource_type, criterion.param, criterion.keys)
            )
        else:
            conditions.append(repository.uri_equals(resource_type, criterion.param, criterion.keys))
    return conditions


def matches(criteria: Sequence[Criterion], resource_id: str, index: IndexValues) -> bool:
    """Tell whether a not-yet-stored resource satisfies every criterion."""
    for criterion in criteria:
        keys = criterion.keys
        if criterion.kind == "id":
            ok = resource_id in keys
        elif criterion.kind == "token":
            ok = not set(keys).isdisjoint(index.tokens)
        elif criterion.kind == "reference":
            ok = not set(keys).isdisjoint(index.references)
        elif criterion.kind == "string":
            ok = any(
                param == criterion.param and normalized.startswith(key)
                for param, normalized, _ in index.strings
                for key in keys
            )
        elif criterion.kind == "string-exact":
            ok = any(p == criterion.param and exact in keys for p, _, exact in index.strings)
        else:
            ok = any(p == criterion.param and uri in keys for p, uri in index.uris)
        if not ok:
            return False
    return True
