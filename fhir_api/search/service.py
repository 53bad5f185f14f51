"""Run FHIR searches: parse, match with keyset paging, include, and assemble the Bundle."""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode

import orjson
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy.orm import Session

from fhir_api.search import repository
from fhir_api.search.errors import InvalidSearch, UnknownSearchParameter
from fhir_api.search.parser import (
    AnyOfCriterion,
    Criterion,
    IdCriterion,
    Include,
    ReferenceCriterion,
    SearchQuery,
    parse_search,
)
from fhir_api.search.repository import UNRESTRICTED, SearchScope
from fhir_api.search_index import (
    patient_compartment_params,
    resource_types,
    search_parameters_for,
)
from fhir_api.validation import JSONObject, check_resource_type, check_url_id

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
# Includes are not paged: this bounds what one page can pull in per parameter.
MAX_INCLUDED = 1_000
ALWAYS_KEPT = ("resourceType", "id", "meta")


@dataclass(frozen=True, slots=True)
class _Row:
    resource_type: str
    id: str
    json: str
    refs: list[str]


def search(
    session: Session,
    *,
    resource_type: str,
    pairs: Sequence[tuple[str, str]],
    base_url: str,
    strict: bool = False,
    scope: SearchScope = UNRESTRICTED,
) -> JSONObject:
    """Answer a type search (`GET [base]/[type]?...`) as a searchset Bundle."""
    return _search(
        session,
        resource_types=[resource_type],
        pairs=pairs,
        base_url=base_url,
        link_base=f"{base_url}/{resource_type}",
        strict=strict,
        scope=scope,
    )


def _search(
    session: Session,
    *,
    resource_types: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    base_url: str,
    link_base: str,
    strict: bool,
    scope: SearchScope,
) -> JSONObject:
    for resource_type in resource_types:
        check_resource_type(resource_type)
    query = _parsed(resource_types, pairs, base_url=base_url, strict=strict)
    return _run(session, query, base_url=base_url, link_base=link_base, scope=scope)


def _parsed(
    resource_types: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    *,
    base_url: str,
    strict: bool,
) -> SearchQuery:
    """Parse a search; under `Prefer: handling=strict` an unknown parameter is a 400."""
    query = parse_search(resource_types, pairs, base_url=base_url)
    if query.ignored and strict:
        raise UnknownSearchParameter(
            f"unknown or unsupported search parameters: {', '.join(query.ignored)}"
        )
    return query


def compartment_search(
    session: Session,
    *,
    compartment: str,
    compartment_id: str,
    resource_type: str,
    pairs: Sequence[tuple[str, str]],
    base_url: str,
    strict: bool = False,
    scope: SearchScope = UNRESTRICTED,
) -> JSONObject:
    """Answer `GET [base]/Patient/[id]/[type]?...`: a type search in a patient's compartment."""
    check_resource_type(resource_type)
    check_url_id(compartment, compartment_id)
    if compartment != "Patient":
        raise InvalidSearch("compartment searches are supported in the Patient compartment")
    if resource_type == "AuditEvent":
        # The audit trail is not in the record store: /fhir/AuditEvent?patient= searches it.
        raise InvalidSearch("search the audit trail with AuditEvent?patient=")
    params = patient_compartment_params().get(resource_type, ())
    if not params and resource_type != "Patient":
        raise InvalidSearch(f"{resource_type} is not in the Patient compartment")
    query = _parsed([resource_type], pairs, base_url=base_url, strict=strict)
    # R4 (compartmentdefinition.html): what any of the type's compartment
    # parameters says is this patient; a Patient is in its own compartment too.
    patient = f"Patient/{compartment_id}"
    # Stored references to this server's absolute URL are local (writes.py).
    keys = tuple(f"{param}={patient}" for param in params)
    member: Criterion = ReferenceCriterion(keys)
    if resource_type == "Patient":
        member = AnyOfCriterion((IdCriterion((compartment_id,)), member))
    query.criteria[resource_type].append(member)
    link_base = f"{base_url}/{patient}/{resource_type}"
    return _run(session, query, base_url=base_url, link_base=link_base, scope=scope)


def pairs_types(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Return the types a system search names in `_type` (comma-separated, repeatable)."""
    return [t for name, raw in pairs if name == "_type" for t in raw.split(",") if t]


def system_search(
    session: Session,
    *,
    pairs: Sequence[tuple[str, str]],
    base_url: str,
    strict: bool = False,
    scope: SearchScope = UNRESTRICTED,
) -> JSONObject:
    """Answer `GET [base]?_type=A,B&...`: the parameters must apply to every listed type."""
    types = list(dict.fromkeys(pairs_types(pairs)))
    if not types:
        raise InvalidSearch("a system search needs _type (e.g. _type=Patient,Observation)")
    return _search(
        session,
        resource_types=types,
        pairs=pairs,
        base_url=base_url,
        link_base=base_url,
        strict=strict,
        scope=scope,
    )


# --- paging ---------------------------------------------------------------------------


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def _decode_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidSearch("the paging cursor is not one Waha issued")
    try:
        if kind == "instant":
            return datetime.fromisoformat(value)
        if kind == "decimal":
            return Decimal(value)
    except (ValueError, InvalidOperation) as error:
        raise InvalidSearch("the paging cursor is not one Waha issued") from error
    return value


def _encode_cursor(direction: str, values: list[Any], resource_type: str, resource_id: str) -> str:
    raw = [direction, [_encode_value(v) for v in values], resource_type, resource_id]
    return base64.urlsafe_b64encode(orjson.dumps(raw)).decode().rstrip("=")


def _decode_cursor(token: str, kinds: Sequence[str]) -> tuple[bool, list[Any]]:
    try:
        raw = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, orjson.JSONDecodeError) as error:
        raise InvalidSearch("the paging cursor is not one Waha issued") from error
    valid = (
        isinstance(raw, list)
        and len(raw) == 4
        and raw[0] in ("n", "p")
        and isinstance(raw[1], list)
        and len(raw[1]) == len(kinds)
        and isinstance(raw[2], str)
        and isinstance(raw[3], str)
    )
    if not valid:
        raise InvalidSearch("the paging cursor does not belong to this search")
    values = [_decode_value(value, kind) for value, kind in zip(raw[1], kinds, strict=True)]
    return raw[0] == "p", [*values, raw[2], raw[3]]


def _link(link_base: str, encoded_pairs: str, cursor: str | None = None) -> str:
    """Return a paging link: the search's own parameters (encoded once), then its cursor."""
    parts = [encoded_pairs] if encoded_pairs else []
    if cursor is not None:
        parts.append(urlencode([("_cursor", cursor)]))
    return f"{link_base}?{'&'.join(parts)}" if parts else link_base


def _run(
    session: Session, query: SearchQuery, *, base_url: str, link_base: str, scope: SearchScope
) -> JSONObject:
    backwards, after = (False, None)
    if query.cursor:
        kinds = repository.cursor_kinds(query.criteria, query.sort)
        backwards, after = _decode_cursor(query.cursor, kinds)
    count_only = query.summary == "count" or query.count == 0
    rows: list[tuple[list[Any], str, str, str, list[str]]] = []
    more = False
    if not count_only:
        rows = repository.list_page(
            session,
            criteria=query.criteria,
            sort=query.sort,
            after=after,
            backwards=backwards,
            limit=query.count + 1,
            scope=scope,
        )
        more = len(rows) > query.count
        rows = rows[: query.count]
        if backwards:
            rows.reverse()
    # The links say the search as performed: a `_count` past the maximum as capped.
    pairs = [(name, str(query.count) if name == "_count" else value) for name, value in query.pairs]
    encoded_pairs = urlencode(pairs, safe=":,/")
    links = [{"relation": "self", "url": _link(link_base, encoded_pairs, query.cursor)}]
    links.append({"relation": "first", "url": _link(link_base, encoded_pairs)})
    if rows:
        first, last = rows[0], rows[-1]
        has_next = (more and not backwards) or (backwards and after is not None)
        has_previous = (more and backwards) or (not backwards and after is not None)
        if has_previous:
            cursor = _encode_cursor("p", first[0], first[1], first[2])
            links.append({"relation": "previous", "url": _link(link_base, encoded_pairs, cursor)})
        if has_next:
            cursor = _encode_cursor("n", last[0], last[1], last[2])
            links.append({"relation": "next", "url": _link(link_base, encoded_pairs, cursor)})
    bundle: JSONObject = {"resourceType": "Bundle", "type": "searchset"}
    total = _total(session, query, scope, rows=len(rows), more=more, count_only=count_only)
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    matches = [_Row(r[1], r[2], r[3], r[4]) for r in rows]
    entries = [_entry(base_url, row, "match", query) for row in matches]
    seen = {(row.resource_type, row.id) for row in matches}
    for row in _includes(session, query, matches, seen, base_url=base_url, scope=scope):
        entries.append(_entry(base_url, row, "include", query))
    if query.ignored:
        entries.append(_ignored_outcome(query.ignored))
    bundle["entry"] = entries
    return bundle


def _total(
    session: Session,
    query: SearchQuery,
    scope: SearchScope,
    *,
    rows: int,
    more: bool,
    count_only: bool,
) -> int | None:
    if query.total == "none" and not count_only:
        return None
    if query.total == "estimate" and not count_only:
        return repository.estimate_matches(session, criteria=query.criteria, scope=scope)
    if query.total == "accurate" or count_only:
        return repository.count_matches(session, criteria=query.criteria, scope=scope)
    if query.cursor is None and not more:
        # The whole result is on this first page: its size is the total, for free.
        return rows
    return None


def _ignored_outcome(names: Sequence[str]) -> JSONObject:
    return {
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "warning",
                    "code": "not-supported",
                    "diagnostics": f"search parameter {name!r} is unknown here and was ignored",
                }
                for name in names
            ],
        },
        "search": {"mode": "outcome"},
    }


# --- includes ---------------------------------------------------------------------------


def _target_key(value: str, base_url: str) -> tuple[str, str] | None:
    if value.startswith(base_url + "/"):
        value = value[len(base_url) + 1 :]
    kind, slash, resource_id = value.partition("/")
    if not slash or "/" in resource_id or not kind[:1].isupper():
        return None
    return kind, resource_id


def _forward_keys(
    rows: Sequence[_Row], includes: Sequence[Include], base_url: str
) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for include in includes:
        for row in rows:
            if include.source_type not in ("*", row.resource_type):
                continue
            for ref in row.refs:
                param, _, value = ref.partition("=")
                if include.param is not None and param != include.param:
                    continue
                key = _target_key(value, base_url)
                if key is None or (include.target_type and key[0] != include.target_type):
                    continue
                keys.append(key)
    return list(dict.fromkeys(keys))


@functools.cache
def _referencing_params(source_type: str, param: str | None, target_type: str) -> tuple[str, ...]:
    """Return the reference params of `source_type` (`*`: every type) that may point at a type."""
    if param is not None:
        return (param,)
    sources = sorted(resource_types()) if source_type == "*" else [source_type]
    codes = {
        code
        for source in sources
        for code, info in search_parameters_for(source).items()
        if info.type == "reference" and (not info.targets or target_type in info.targets)
    }
    return tuple(sorted(codes))


def _reverse_rows(
    session: Session, rows: Sequence[_Row], include: Include, scope: SearchScope, base_url: str
) -> list[_Row]:
    ref_keys = [
        f"{param}={prefix}{row.resource_type}/{row.id}"
        for row in rows
        if include.target_type in (None, row.resource_type)
        for param in _referencing_params(include.source_type, include.param, row.resource_type)
        # Ingest keeps references written as this server's absolute URL as given.
        for prefix in ("", f"{base_url}/")
    ]
    found = repository.list_referencing(
        session,
        source_type=None if include.source_type == "*" else include.source_type,
        ref_keys=ref_keys,
        scope=scope,
        limit=MAX_INCLUDED,
    )
    return [_Row(*item) for item in found]


def _includes(
    session: Session,
    query: SearchQuery,
    matches: Sequence[_Row],
    seen: set[tuple[str, str]],
    *,
    base_url: str,
    scope: SearchScope,
) -> list[_Row]:
    if not matches or not (query.includes or query.revincludes):
        return []
    added: list[_Row] = []

    def keep(rows: Sequence[_Row]) -> list[_Row]:
        fresh = [row for row in rows if (row.resource_type, row.id) not in seen]
        seen.update((row.resource_type, row.id) for row in fresh)
        added.extend(fresh)
        return fresh

    def forward(rows: Sequence[_Row], includes: Sequence[Include]) -> list[_Row]:
        keys = [k for k in _forward_keys(rows, includes, base_url) if k not in seen]
        return keep(
            [_Row(*item) for item in repository.list_by_keys(session, keys[:MAX_INCLUDED], scope)]
        )

    def reverse(rows: Sequence[_Row], includes: Sequence[Include]) -> list[_Row]:
        found: list[_Row] = []
        for include in includes:
            found.extend(keep(_reverse_rows(session, rows, include, scope, base_url)))
        return found

    first_level = forward(matches, query.includes) + reverse(matches, query.revincludes)
    # `:iterate` runs once more over what the first round brought in (one level).
    iterating = [i for i in query.includes if i.iterate]
    reverse_iterating = [i for i in query.revincludes if i.iterate]
    if first_level and iterating:
        forward(first_level, iterating)
    if first_level and reverse_iterating:
        reverse(first_level, reverse_iterating)
    return added


# --- entries, _summary and _elements -----------------------------------------------------


@functools.cache
def summary_elements(resource_type: str) -> frozenset[str]:
    """Return the JSON keys R4 marks as summary elements of a resource type."""
    model = get_fhir_model_class(resource_type)
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("summary_element_property"):
            keys.add(info.alias or name)
    return frozenset(keys)


def _subsetted(resource: JSONObject, keep: Any) -> JSONObject:
    kept = {key: value for key, value in resource.items() if key in ALWAYS_KEPT or keep(key)}
    meta = dict(kept.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    kept["meta"] = meta
    return kept


def _shaped(row: _Row, query: SearchQuery) -> Any:
    if query.summary in (None, "false") and not query.elements:
        # Stored JSON goes out as is: no decode and re-encode per resource.
        return orjson.Fragment(row.json)
    resource: JSONObject = orjson.loads(row.json)
    if query.summary == "true":
        summary = summary_elements(row.resource_type)
        return _subsetted(resource, lambda key: key in summary)
    if query.summary == "text":
        return _subsetted(resource, lambda key: key == "text")
    if query.summary == "data":
        return _subsetted(resource, lambda key: key != "text")
    wanted = query.elements

    def listed(key: str) -> bool:
        # `value` selects the choice element `valueQuantity` too.
        return any(
            key == name or (key.startswith(name) and key[len(name) : len(name) + 1].isupper())
            for name in wanted
        )

    return _subsetted(resource, listed)


def _entry(base_url: str, row: _Row, mode: str, query: SearchQuery) -> JSONObject:
    return {
        "fullUrl": f"{base_url}/{row.resource_type}/{row.id}",
        "resource": _shaped(row, query),
        "search": {"mode": mode},
    }
