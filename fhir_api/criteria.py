"""Search criteria of conditional interactions (If-None-Exist, conditional update,
delete and references), evaluated in SQL and against a bundle's own new resources.

Parsing and SQL are the search API's (`fhir_api.search`); this module keeps the
flat form the write engine needs: token keys for its fast path, and the kinds
it can also evaluate in memory against resources of the same bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal
from urllib.parse import parse_qsl

from fhir_api.errors import UnsupportedSearch
from fhir_api.search import parser
from fhir_api.search.geo import great_circle_km
from fhir_api.search_index import IndexValues, position_params

# Result-shaping parameters that do not narrow which resources match.
IGNORED_PARAMETERS = frozenset({"_format", "_pretty", "_summary", "_elements", "_count", "_sort"})

# "search": only SQL can evaluate it (dates, numbers, chains...), not a bundle's new resources.
Kind = Literal["id", "token", "reference", "string", "string-exact", "uri", "search"]


@dataclass(frozen=True, slots=True)
class Criterion:
    """One parameter of a query: any of `keys` may match (comma means OR)."""

    kind: Kind
    param: str
    keys: tuple[str, ...]
    search: parser.Criterion


def normalized_query(query: str) -> str:
    """Return a canonical form of a query string, used as a lock key."""
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{name}={value}" for name, value in pairs)


def parse_criteria(resource_type: str, query: str, *, base_url: str) -> list[Criterion]:
    """Parse a conditional query for `resource_type`; raise on what cannot be evaluated."""
    pairs = [
        (name, value)
        for name, value in parse_qsl(query, keep_blank_values=True)
        if name.partition(":")[0] not in IGNORED_PARAMETERS
    ]
    shaping = [name for name, _ in pairs if name.partition(":")[0] in parser.RESULT_PARAMETERS]
    if shaping:
        raise UnsupportedSearch(f"{shaping[0]!r} has no meaning in conditional criteria")
    parsed = parser.parse_search([resource_type], pairs, base_url=base_url)
    if parsed.ignored:
        raise UnsupportedSearch(
            f"unknown search parameter {parsed.ignored[0]!r} for {resource_type}"
        )
    criteria = [_flat(found) for found in parsed.criteria[resource_type]]
    if not criteria:
        raise UnsupportedSearch("a conditional interaction needs at least one search parameter")
    return criteria


def _flat(found: parser.Criterion) -> Criterion:
    if isinstance(found, parser.IdCriterion) and not found.negate:
        return Criterion("id", "_id", found.ids, found)
    if isinstance(found, parser.TokenCriterion) and not found.negate:
        return Criterion("token", "", found.keys, found)
    if isinstance(found, parser.ReferenceCriterion):
        return Criterion("reference", "", found.keys, found)
    if isinstance(found, parser.StringCriterion) and found.mode != "contains":
        kind: Kind = "string" if found.mode == "start" else "string-exact"
        return Criterion(kind, found.param, found.values, found)
    if isinstance(found, parser.UriCriterion) and found.mode == "eq":
        return Criterion("uri", found.param, found.values, found)
    return Criterion("search", "", (), found)


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
        elif criterion.kind == "uri":
            ok = any(p == criterion.param and uri in keys for p, uri in index.uris)
        else:
            ok = _matches_typed(criterion.search, index)
        if not ok:
            return False
    return True


def _date_matches(low: datetime, high: datetime, item: parser.DateComparison) -> bool:
    # The same R4 prefix semantics as the SQL (fhir_api.search.repository).
    contained = low >= item.low and high <= item.high
    return {
        "eq": contained,
        "ne": not contained,
        "gt": high > item.high,
        "lt": low < item.low,
        "ge": high > item.high or contained,
        "le": low < item.low or contained,
        "sa": low > item.high,
        "eb": high < item.low,
    }.get(item.prefix, low <= item.high and high >= item.low)


def _number_matches(
    row: tuple[str, Decimal, Decimal, Decimal, str | None, str | None],
    item: parser.NumberComparison,
) -> bool:
    _, value, low, high, system, code = row
    if (item.code is not None and code != item.code) or (
        item.system is not None and system != item.system
    ):
        return False
    return {
        "eq": item.low <= value < item.high,
        "ap": item.low <= value < item.high,
        "ne": not item.low <= value < item.high,
        "gt": value > item.value,
        "lt": value < item.value,
        "ge": value >= item.value,
        "le": value <= item.value,
        "sa": low > item.value,
        "eb": high < item.value,
    }[item.prefix]


def _matches_typed(found: parser.Criterion, index: IndexValues) -> bool:
    """Evaluate dates, numbers and `near` in memory; chains and `_has` need stored data."""
    if isinstance(found, parser.DateCriterion) and found.param is not None:
        return any(
            param == found.param and _date_matches(low, high, item)
            for param, low, high in index.dates
            for item in found.comparisons
        )
    if isinstance(found, parser.NumberCriterion):
        return any(
            row[0] == found.param and _number_matches(row, item)
            for row in index.quantities
            for item in found.comparisons
        )
    if isinstance(found, parser.TokenCriterion):
        return set(found.keys).isdisjoint(index.tokens)  # `:not`
    if isinstance(found, parser.NearCriterion):
        return _near_matches(found, index)
    return False


def _near_matches(found: parser.NearCriterion, index: IndexValues) -> bool:
    latitude_param, longitude_param = position_params(found.param)
    latitudes = [float(row[1]) for row in index.quantities if row[0] == latitude_param]
    longitudes = [float(row[1]) for row in index.quantities if row[0] == longitude_param]
    return any(
        great_circle_km(point.latitude, point.longitude, latitude, longitude) <= point.distance_km
        for latitude, longitude in zip(latitudes, longitudes, strict=False)
        for point in found.points
    )
