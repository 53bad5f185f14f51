"""Conformance sweep: every stored Inferno resource is found by searches built from its own values.

The Inferno US Core, PDex and CARIN bundles are ingested once; then, for every
stored resource and every R4 search parameter of its type (composite and
special ones aside), searches that the R4 search rules say MUST (or must not)
return it are derived from the resource's own JSON: the parameter's FHIRPath,
compiled to getters, gives the raw elements, and the query values are built
here from those elements, not from the index encodings (only `date_range`
places a value in UTC, for sort order and whole-day searches). Identical
searches are run once and checked for every resource they concern; every
failure is collected, so one run reports the whole picture. Most searches run
in the service layer (fast); the first of each kind, and every failure, go
through `GET /fhir/...`, which is what a failure reports.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from fhir_api.search import service
from fhir_api.search_index.compiler import Branch, CompileError, compile_expression
from fhir_api.search_index.definitions import SearchParameterDefinition, definitions_for
from fhir_api.search_index.encoding import date_range
from fhir_api.search_index.extract import (
    R4B_ABSENT_ELEMENTS,
    SKIPPED_PARAMETERS,
    single_valued,
)
from hub import db
from hub.settings import Settings
from tests.builders import load_fixture

JSON = dict[str, Any]
Pairs = tuple[tuple[str, str], ...]
# A sort key: the (low, high) a resource's one value covers.
SortKey = tuple[Any, Any]
FHIR_JSON = {"Content-Type": "application/fhir+json"}
# Strict handling: a parameter the server ignored would match everything and hide a miss.
STRICT = {"Prefer": "handling=strict"}
BUNDLES = (
    "inferno/uscore_bundle_patient_85.json",
    "inferno/uscore_bundle_patient_907.json",
    "inferno/pdex_bundle_patient_999.json",
    "inferno/carin_bundle_patient_888.json",
)
SEARCHED_TYPES = ("string", "token", "reference", "date", "number", "quantity", "uri")
# A code no resource carries, for `:not` (which must then return every resource).
ABSENT_CODE = "zz-conformance-sweep-absent"
ISO_4217 = "urn:iso:std:iso:4217"
FAR_PAST, FAR_FUTURE = "1800-01-01", "2200-01-01"
PAGE_SIZE = 10
# More pages than any search of the sample data can have: paging that never ends is a bug.
MAX_PAGES = 200
_RELATIVE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
# Kinds whose searches differ between resources only in the value, not in how the
# server parses or matches them: a few distinct searches per (type, parameter)
# are enough. The `Type/id` form of every reference is still searched.
SAMPLED_KINDS = {
    "token:not-own": 3,
    "reference:id": 3,
    "reference:absolute": 3,
    "reference:type": 3,
    "chain": 2,
    "_has": 2,
    "date+sort": 6,
}
# Sorted searches page on cursors holding their sort values (NULL for a resource
# without one): this many of each type and kind are also walked page by page.
PAGED_KINDS = {"sort": 8, "date+sort": 8}
# Kinds that also run as system searches.
SYSTEM_KINDS = frozenset({"token", "string", "reference", "date", "quantity", "missing"})
# Parameter types whose plain searches are reused as the inner part of chains and `_has`.
LINKED_TYPES = ("token", "string", "date")


@dataclass
class Expectation:
    """One distinct search and the resources it must and must not return."""

    resource_type: str
    param: str
    kind: str
    pairs: Pairs
    present: set[str] = field(default_factory=set)
    absent: set[str] = field(default_factory=set)
    # For `_sort`: each resource's one value, and whether the order is descending.
    order: dict[str, SortKey] = field(default_factory=dict)
    descending: bool = False


@dataclass(frozen=True)
class Failure:
    """One search that answered wrongly: an error status, a missed or unwanted resource, order."""

    resource_type: str
    param: str
    kind: str
    query: str
    status: int
    missed: tuple[str, ...] = ()
    unwanted: tuple[str, ...] = ()
    problem: str = ""
    body: str = ""

    def __str__(self) -> str:
        """Return the failure as one readable line."""
        detail = f"status {self.status}"
        if self.missed:
            detail += f", missed {len(self.missed)}: {', '.join(self.missed[:3])}"
        if self.unwanted:
            detail += f", unwanted {len(self.unwanted)}: {', '.join(self.unwanted[:3])}"
        if self.problem:
            detail += f", {self.problem}"
        if self.status != 200:
            detail += f", body {self.body[:200]!r}"
        path = "/fhir" if self.query.startswith("_type=") else f"/fhir/{self.resource_type}"
        return f"GET {path}?{self.query} [{self.kind} {self.param}]: {detail}"


@dataclass
class Sweep:
    """What the sweep ran and what went wrong."""

    checks: int
    searches: int
    over_http: int
    kinds: dict[str, int]
    failures: list[Failure]


# --- query values -------------------------------------------------------------------------


def escape(value: str) -> str:
    """Escape a search value's separators (R4 search, "Escaping Search Parameters")."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("$", "\\$").replace("|", "\\|")


def escape_reference(value: str) -> str:
    """Escape a reference or uri value, keeping `|` (a canonical's version separator)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def number_text(value: Any) -> str | None:
    """Return a JSON number as search text without an exponent, or None if not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):
        return str(value)
    return format(Decimal(repr(value)), "f")


def prefix_of(value: str) -> str:
    """Return a leading part of a string, upper-cased (string search is a case-blind prefix)."""
    length = len(value) if len(value) <= 3 else min(max(3, len(value) // 2), 30)
    return value[:length].upper()


def middle_of(value: str) -> str:
    """Return an inner part of a string, upper-cased (for `:contains`)."""
    if len(value) <= 4:
        return value.upper()
    start = len(value) // 4
    return value[start : start + min(12, len(value) - 2 * start)].upper()


# --- what each parameter type derives from one resource -----------------------------------


@dataclass
class Derived:
    """What one resource gives for one parameter: searches it must match, and its values."""

    base_url: str
    queries: list[tuple[str, Pairs]] = field(default_factory=list)
    # Searches it must not match.
    refusals: list[tuple[str, Pairs]] = field(default_factory=list)
    # Bounds of each date value (multi-value AND, sort order) and each number.
    date_values: list[tuple[datetime, datetime, str, str]] = field(default_factory=list)
    numbers: list[Decimal] = field(default_factory=list)
    date_items: int = 0
    # (target type, target id) of each relative reference.
    targets: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, *pairs: tuple[str, str]) -> None:
        """Record one search the resource must match."""
        self.queries.append((kind, tuple(pairs)))

    def refuse(self, kind: str, *pairs: tuple[str, str]) -> None:
        """Record one search the resource must not match."""
        self.refusals.append((kind, tuple(pairs)))


def _code(code: str, value: str, out: Derived) -> None:
    out.add("token", (code, escape(value)))
    # `:not` keeps only resources without any matching item.
    out.refuse("token:not-own", (f"{code}:not", escape(value)))


def _token_coding(code: str, coding: Any, out: Derived) -> None:
    if not isinstance(coding, dict):
        return
    value, system = coding.get("code"), coding.get("system")
    if isinstance(value, str) and "|" not in value:
        _code(code, value, out)
        if isinstance(system, str):
            out.add("token", (code, f"{escape(system)}|{escape(value)}"))
            out.add("token", (code, f"{escape(system)}|"))
        else:
            out.add("token", (code, f"|{escape(value)}"))
    _token_text(code, coding.get("display"), out)


def _token_text(code: str, value: Any, out: Derived) -> None:
    if isinstance(value, str) and value.strip():
        out.add("token:text", (f"{code}:text", escape(prefix_of(value))))


def _identifier(code: str, item: JSON, out: Derived) -> None:
    value, system = item.get("value"), item.get("system")
    if not isinstance(value, str) or "|" in value:
        return
    _code(code, value, out)
    prefix = escape(system) if isinstance(system, str) else ""
    out.add("token", (code, f"{prefix}|{escape(value)}"))
    identifier_type = item.get("type")
    if isinstance(identifier_type, dict):
        for coding in identifier_type.get("coding", ()):
            type_code = coding.get("code") if isinstance(coding, dict) else None
            if isinstance(type_code, str):
                type_system = escape(coding.get("system") or "")
                of_type = f"{type_system}|{escape(type_code)}|{escape(value)}"
                out.add("token:of-type", (f"{code}:of-type", of_type))
        _token_text(code, identifier_type.get("text"), out)


def _token(code: str, branch: Branch, values: list[Any], out: Derived) -> None:
    kind = branch.type_name
    for item in values:
        if kind == "Coding":
            _token_coding(code, item, out)
        elif kind == "CodeableConcept" and isinstance(item, dict):
            for coding in item.get("coding", ()):
                _token_coding(code, coding, out)
            _token_text(code, item.get("text"), out)
        elif kind == "Identifier" and isinstance(item, dict):
            _identifier(code, item, out)
        elif kind == "ContactPoint" and isinstance(item, dict):
            # R4 leaves ContactPoint.system out of token matching: only the value is certain.
            if isinstance(item.get("value"), str):
                _code(code, item["value"], out)
        elif isinstance(item, bool):
            _code(code, "true" if item else "false", out)
        elif isinstance(item, str) and item and "|" not in item:
            _code(code, item, out)


def _string_value(code: str, value: Any, out: Derived) -> None:
    if not isinstance(value, str) or not value.strip():
        return
    if code == "phonetic":
        # Phonetic matching is the server's own; only the whole part is sure to match.
        out.add("string", (code, escape(value.upper())))
        return
    out.add("string", (code, escape(prefix_of(value))))
    out.add("string:exact", (f"{code}:exact", escape(value)))
    out.add("string:contains", (f"{code}:contains", escape(middle_of(value))))


STRING_PARTS = {
    "HumanName": ("family", "given", "prefix", "suffix", "text"),
    "Address": ("line", "city", "district", "state", "postalCode", "country", "text"),
}


def _string(code: str, branch: Branch, values: list[Any], out: Derived) -> None:
    parts = STRING_PARTS.get(branch.type_name)
    for item in values:
        if parts is None:
            _string_value(code, item, out)
            continue
        if not isinstance(item, dict):
            continue
        for part in parts:
            found = item.get(part)
            for value in found if isinstance(found, list) else [found]:
                _string_value(code, value, out)


def _reference(code: str, _branch: Branch, values: list[Any], out: Derived) -> None:
    for item in values:
        if isinstance(item, str):
            # canonical/uri: the url as given, and without its `|version`.
            out.add("reference", (code, escape_reference(item)))
            if "|" in item:
                out.add("reference", (code, escape_reference(item.partition("|")[0])))
            continue
        if not isinstance(item, dict):
            continue
        identifier = item.get("identifier")
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
            value = escape(identifier["value"])
            system = identifier.get("system")
            out.add("reference:identifier", (f"{code}:identifier", value))
            if isinstance(system, str):
                out.add("reference:identifier", (f"{code}:identifier", f"{escape(system)}|{value}"))
        target = item.get("reference")
        if not isinstance(target, str) or target.startswith("#"):
            continue
        match = _RELATIVE.match(target)
        if match is None:
            out.add("reference", (code, escape_reference(target)))
            continue
        target_type, target_id = match.groups()
        out.add("reference", (code, f"{target_type}/{target_id}"))
        out.add("reference:id", (code, target_id))
        out.add("reference:absolute", (code, f"{out.base_url}/{target_type}/{target_id}"))
        out.add("reference:type", (f"{code}:{target_type}", target_id))
        out.add("chain", (f"{code}:{target_type}._id", target_id))
        out.targets.append((target_type, target_id))


def _years_away(value: str, years: int) -> str:
    # A year two away from a value's own (local) year stays clear of any zone shift.
    return str(int(value[:4]) + years)


def _utc_day(code: str, bounds: tuple[datetime, datetime], out: Derived) -> None:
    # Waha reads a search date without a zone as UTC (R4 leaves the zone to the
    # server): a value within one UTC day (and year) is contained in that day's range.
    low, high = bounds
    if low.date() == high.date():
        out.add("date", (code, low.date().isoformat()))
    if low.year == high.year:
        out.add("date", (code, str(low.year)))


def _period(code: str, period: JSON, out: Derived) -> None:
    start, end = period.get("start"), period.get("end")
    if isinstance(start, str) and isinstance(end, str):
        out.add("date", (code, f"ge{start}"), (code, f"le{end}"))
        if start == end:
            out.add("date", (code, start))
        start_bounds, end_bounds = date_range(start), date_range(end)
        if start_bounds and end_bounds:
            out.date_values.append((start_bounds[0], end_bounds[1], start, end))
            _utc_day(code, (start_bounds[0], end_bounds[1]), out)
        out.add("date", (code, f"sa{FAR_PAST}"))
        out.add("date", (code, f"eb{FAR_FUTURE}"))
    # An open side is unbounded. R4 `le` is "the range below the search value
    # intersects the target, or the search value contains it", and readings differ
    # on whether "below" includes the value's own range: `le<start>` of an open
    # period is not certain to match, so the other bound is a clearly later year.
    elif isinstance(start, str):
        out.add("date", (code, f"ge{start}"), (code, f"le{_years_away(start, 2)}"))
        out.add("date", (code, f"gt{_years_away(start, -2)}"))
        out.add("date", (code, f"sa{FAR_PAST}"))
    elif isinstance(end, str):
        out.add("date", (code, f"ge{_years_away(end, -2)}"), (code, f"le{end}"))
        out.add("date", (code, f"lt{_years_away(end, 2)}"))
        out.add("date", (code, f"eb{FAR_FUTURE}"))
    else:
        return
    for prefix, value in (("gt", FAR_PAST), ("lt", FAR_FUTURE), ("ne", FAR_PAST)):
        out.add("date", (code, f"{prefix}{value}"))


def _date(code: str, branch: Branch, values: list[Any], out: Derived) -> None:
    kind = branch.type_name
    for item in values:
        out.date_items += 1
        if kind in ("date", "dateTime", "instant") and isinstance(item, str):
            bounds = date_range(item)
            if bounds is None:
                continue
            out.add("date", (code, item))
            _utc_day(code, bounds, out)
            out.add("date", (code, f"ge{item}"), (code, f"le{item}"))
            out.add("date", (code, f"ap{item}"))
            for prefix, far in (("gt", FAR_PAST), ("lt", FAR_FUTURE), ("ne", FAR_PAST)):
                out.add("date", (code, f"{prefix}{far}"))
            out.add("date", (code, f"sa{FAR_PAST}"))
            out.add("date", (code, f"eb{FAR_FUTURE}"))
            out.date_values.append((*bounds, item, item))
        elif kind == "Period" and isinstance(item, dict):
            _period(code, item, out)
        elif kind == "Timing" and isinstance(item, dict):
            # Any one event lies within the Timing's outer limits.
            for event in item.get("event", ()):
                if isinstance(event, str):
                    out.add("date", (code, f"ge{event}"), (code, f"le{event}"))


def _compared(kind: str, code: str, number: str, out: Derived) -> None:
    value = Decimal(number)
    out.numbers.append(value)
    out.add(kind, (code, number))
    out.add(kind, (code, f"ge{number}"), (code, f"le{number}"))
    out.add(kind, (code, f"ap{number}"))
    out.add(kind, (code, f"gt{value - 1}"), (code, f"lt{value + 1}"))
    out.add(kind, (code, f"ne{value + 1}"))


def _quantity(code: str, branch: Branch, values: list[Any], out: Derived) -> None:
    kind = branch.type_name
    for item in values:
        if kind == "Range" or not isinstance(item, dict):
            continue
        number = number_text(item.get("value"))
        if number is None:
            continue
        _compared("quantity", code, number, out)
        if kind == "Money":
            currency = item.get("currency")
            if isinstance(currency, str):
                out.add("quantity", (code, f"{number}|{ISO_4217}|{currency}"))
            continue
        system, unit_code, unit = item.get("system"), item.get("code"), item.get("unit")
        if isinstance(unit_code, str):
            out.add("quantity", (code, f"{number}||{escape(unit_code)}"))
            if isinstance(system, str):
                out.add("quantity", (code, f"{number}|{escape(system)}|{escape(unit_code)}"))
        if isinstance(unit, str) and unit != unit_code:
            # R4: `5.4||mg` matches where "either the code (code) or the stated human
            # unit (unit)" is mg.
            out.add("quantity:unit", (code, f"{number}||{escape(unit)}"))


def _number(code: str, branch: Branch, values: list[Any], out: Derived) -> None:
    if branch.type_name == "Range":
        return
    for item in values:
        number = number_text(item)
        if number is not None:
            _compared("number", code, number, out)


def _uri(code: str, _branch: Branch, values: list[Any], out: Derived) -> None:
    for item in values:
        if isinstance(item, str) and item:
            value = escape_reference(item)
            out.add("uri", (code, value))
            out.add("uri:below", (f"{code}:below", value))
            out.add("uri:above", (f"{code}:above", value))


Deriver = Callable[[str, Branch, list[Any], Derived], None]
DERIVERS: dict[str, Deriver] = {
    "token": _token,
    "string": _string,
    "reference": _reference,
    "date": _date,
    "quantity": _quantity,
    "number": _number,
    "uri": _uri,
}


@functools.cache
def swept_parameters(
    resource_type: str,
) -> dict[str, tuple[SearchParameterDefinition, list[Branch]]]:
    """Return the parameters of a type the sweep covers, with their compiled branches."""
    found: dict[str, tuple[SearchParameterDefinition, list[Branch]]] = {}
    for code, definition in definitions_for(resource_type).items():
        if (
            definition.type not in SEARCHED_TYPES
            or definition.expression is None
            or definition.id in SKIPPED_PARAMETERS
            or (resource_type, code) in R4B_ABSENT_ELEMENTS
        ):
            continue
        try:
            branches = compile_expression(definition.expression, resource_type)
        except CompileError:
            continue
        found[code] = (definition, branches)
    return found


# --- planning: which searches must return what ---------------------------------------------


@dataclass(frozen=True)
class Link:
    """A relative reference from one stored resource to another, by one parameter."""

    source_type: str
    source_id: str
    param: str
    target_type: str
    target_id: str


class Planner:
    """Collects the distinct searches and what each must return."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.searches: dict[tuple[str, Pairs], Expectation] = {}
        self.per_shape: dict[tuple[str, str, str], int] = {}
        self.checks = 0
        self.ids_by_type: dict[str, list[str]] = {}
        # Per type and parameter, each resource's one sortable value (dates, numbers).
        self.sort_keys: dict[tuple[str, str], dict[str, tuple[SortKey, SortKey]]] = {}
        self.valued: dict[str, set[str]] = {}
        self.links: list[Link] = []
        # One plain search per parameter type a resource matches, to chain and `_has` on.
        self.samples: dict[tuple[str, str], list[tuple[str, str]]] = {}

    def expect(
        self,
        resource_type: str,
        param: str,
        kind: str,
        pairs: Pairs,
        resource_id: str,
        *,
        hit: bool,
    ) -> Expectation | None:
        """Record that a search of a type must (hit) or must not return a resource."""
        key = (resource_type, pairs)
        expectation = self.searches.get(key)
        if expectation is None:
            shape = (resource_type, param, kind)
            cap = SAMPLED_KINDS.get(kind)
            if cap is not None and self.per_shape.get(shape, 0) >= cap:
                return None
            self.per_shape[shape] = self.per_shape.get(shape, 0) + 1
            expectation = Expectation(resource_type, param, kind, pairs)
            self.searches[key] = expectation
        target = expectation.present if hit else expectation.absent
        if resource_id not in target:
            target.add(resource_id)
            self.checks += 1
        return expectation

    def plan_resource(self, resource: JSON) -> None:
        """Record every search one stored resource must (and must not) answer."""
        resource_type, resource_id = resource["resourceType"], resource["id"]
        self.ids_by_type.setdefault(resource_type, []).append(resource_id)
        for code, (definition, branches) in swept_parameters(resource_type).items():
            out = Derived(self.base_url)
            raw = False
            for branch in branches:
                values = branch.get(resource)
                raw = raw or bool(values)
                if values:
                    DERIVERS[definition.type](code, branch, values, out)
            self._plan_parameter(resource_type, resource_id, code, definition.type, out, raw)
        updated = resource.get("meta", {}).get("lastUpdated")
        if isinstance(updated, str):
            for pairs in (
                (("_lastUpdated", updated),),
                (("_lastUpdated", f"ge{updated}"), ("_lastUpdated", f"le{updated}")),
            ):
                self.expect(resource_type, "_lastUpdated", "date", pairs, resource_id, hit=True)
        self.expect(resource_type, "_id", "token", (("_id", resource_id),), resource_id, hit=True)

    def _plan_parameter(
        self,
        resource_type: str,
        resource_id: str,
        code: str,
        param_type: str,
        out: Derived,
        raw: bool,
    ) -> None:
        if out.queries:
            self.valued.setdefault(resource_type, set()).add(code)
        walked = param_type == "date" and single_valued(resource_type, code)
        for kind, pairs in out.queries:
            self.expect(resource_type, code, kind, pairs, resource_id, hit=True)
            plain = kind == param_type and len(pairs) == 1 and pairs[0][0] == code
            if plain and param_type in LINKED_TYPES:
                samples = self.samples.setdefault((resource_type, resource_id), [])
                if all(param_type != known for known, _ in samples):
                    samples.append((param_type, f"{pairs[0][0]}={pairs[0][1]}"))
            if walked and len(pairs) == 2:
                # Sorted by the date it filters on, a search walks that date's rows.
                for order in (code, f"-{code}"):
                    self.expect(
                        resource_type,
                        code,
                        "date+sort",
                        (*pairs, ("_sort", order)),
                        resource_id,
                        hit=True,
                    )
        for kind, pairs in out.refusals:
            self.expect(resource_type, code, kind, pairs, resource_id, hit=False)
        for target_type, target_id in out.targets:
            self.links.append(Link(resource_type, resource_id, code, target_type, target_id))
        self._plan_multiple_dates(resource_type, resource_id, code, out)
        self._plan_missing(resource_type, resource_id, code, bool(out.queries), raw)
        if param_type == "token":
            pairs = ((f"{code}:not", ABSENT_CODE),)
            self.expect(resource_type, code, "token:not", pairs, resource_id, hit=True)
        if len(out.numbers) == 1:
            # With one value only, `ne<it>` must leave the resource out.
            pairs = ((code, f"ne{out.numbers[0]}"),)
            self.expect(resource_type, code, param_type, pairs, resource_id, hit=False)
        one_value: tuple[SortKey, SortKey] | None = None
        if len(out.date_values) == 1 == out.date_items and not out.numbers:
            low, high = out.date_values[0][:2]
            # Ascending sorts on the start of a value's range, descending on its end.
            one_value = ((low, low), (high, high))
        elif len(out.numbers) == 1 and not out.date_values:
            one_value = ((out.numbers[0], out.numbers[0]),) * 2
        if one_value is not None:
            self.sort_keys.setdefault((resource_type, code), {})[resource_id] = one_value

    def _plan_multiple_dates(
        self, resource_type: str, resource_id: str, code: str, out: Derived
    ) -> None:
        # Two ANDed values of one parameter are separate tests (R4 search, "AND"): a
        # resource with an early and a late date matches `ge<late>&le<early>`.
        values = sorted(out.date_values)
        if len(values) < 2:
            return
        early, late = values[0], values[-1]
        if early[1] >= late[0]:
            return
        pairs = ((code, f"ge{late[2]}"), (code, f"le{early[3]}"))
        self.expect(resource_type, code, "date:and", pairs, resource_id, hit=True)

    def _plan_missing(
        self, resource_type: str, resource_id: str, code: str, derived: bool, raw: bool
    ) -> None:
        has_value = ((f"{code}:missing", "false"),)
        no_value = ((f"{code}:missing", "true"),)
        if derived:
            self.expect(resource_type, code, "missing", has_value, resource_id, hit=True)
            self.expect(resource_type, code, "missing", no_value, resource_id, hit=False)
        elif not raw:
            # Without the element at all the resource has no value; an element that is
            # there but carries nothing searchable (a display-only Reference) is left out.
            self.expect(resource_type, code, "missing", no_value, resource_id, hit=True)
            self.expect(resource_type, code, "missing", has_value, resource_id, hit=False)

    def plan_sorts(self) -> None:
        """Sorting by a parameter keeps every resource, in the order of their values."""
        for resource_type, codes in self.valued.items():
            for code in sorted(codes):
                keys = self.sort_keys.get((resource_type, code), {})
                # Only dates and numbers have an order R4 pins down; others are sorted
                # one way, to check that sorting keeps every resource.
                for descending in (False, True) if keys else (False,):
                    order = f"-{code}" if descending else code
                    expectation: Expectation | None = None
                    for resource_id in self.ids_by_type[resource_type]:
                        pairs = (("_sort", order),)
                        expectation = self.expect(
                            resource_type, code, "sort", pairs, resource_id, hit=True
                        )
                    if expectation is not None:
                        expectation.descending = descending
                        expectation.order = {
                            resource_id: pair[1 if descending else 0]
                            for resource_id, pair in keys.items()
                        }

    def plan_system_searches(self) -> None:
        """The first search of each type, parameter and kind also runs as a system search.

        `_type=Other,Type` puts the type second, so its criteria take the second
        slots of the statement; the answer must not change for the type's resources.
        """
        done: set[tuple[str, str, str]] = set()
        for expectation in list(self.searches.values()):
            shape = (expectation.resource_type, expectation.param, expectation.kind)
            if expectation.kind not in SYSTEM_KINDS or shape in done:
                continue
            other = self._sharing_type(expectation)
            if other is None:
                continue
            done.add(shape)
            pairs = (("_type", f"{other},{expectation.resource_type}"), *expectation.pairs)
            system = Expectation(
                expectation.resource_type,
                expectation.param,
                "system",
                pairs,
                set(expectation.present),
                set(expectation.absent),
            )
            self.searches[(expectation.resource_type, pairs)] = system
            self.checks += len(system.present) + len(system.absent)

    def _sharing_type(self, expectation: Expectation) -> str | None:
        # Another stored type that defines every parameter of the search, with its type.
        own = definitions_for(expectation.resource_type)
        codes = {name.partition(":")[0] for name, _ in expectation.pairs}
        for other in sorted(self.ids_by_type):
            theirs = definitions_for(other)
            if other != expectation.resource_type and all(
                code in theirs and theirs[code].type == own[code].type for code in codes
            ):
                return other
        return None

    def plan_links(self) -> None:
        """Chains and `_has` over each reference, by `_id` and by the other side's own values."""
        for link in self.links:
            source = link.source_type, link.source_id
            target = link.target_type, link.target_id
            has = f"_has:{link.source_type}:{link.param}"
            self.expect(
                link.target_type,
                f"{link.source_type}.{link.param}",
                "_has",
                ((f"{has}:_id", link.source_id),),
                link.target_id,
                hit=True,
            )
            for _, sample in self.samples.get(source, ()):
                name, _, value = sample.partition("=")
                self.expect(
                    link.target_type,
                    f"{link.source_type}.{link.param}:{name}",
                    "_has",
                    ((f"{has}:{name}", value),),
                    link.target_id,
                    hit=True,
                )
            for _, sample in self.samples.get(target, ()):
                name, _, value = sample.partition("=")
                self.expect(
                    link.source_type,
                    f"{link.param}.{name}",
                    "chain",
                    ((f"{link.param}:{link.target_type}.{name}", value),),
                    link.source_id,
                    hit=True,
                )


# --- running the searches -----------------------------------------------------------------


def with_own_ids(bundle: JSON) -> JSON:
    """Turn a bundle's POST entries into PUTs of their own ids, so every run stores the same ids."""
    for entry in bundle["entry"]:
        resource, request = entry["resource"], entry["request"]
        if request["method"] == "POST" and resource.get("id"):
            url = f"{resource['resourceType']}/{resource['id']}"
            entry["request"] = {"method": "PUT", "url": url}
    return bundle


def query_text(pairs: Sequence[tuple[str, str]]) -> str:
    """Return the pairs as they read in a URL (unencoded, for the report)."""
    return "&".join(f"{name}={value}" for name, value in pairs)


def _ids(bundle: JSON) -> list[str]:
    # Entries carry the stored JSON as an orjson fragment: the fullUrl names the resource.
    return [
        str(e["fullUrl"]).rsplit("/", 1)[1]
        for e in bundle.get("entry", ())
        if e["search"]["mode"] == "match"
    ]


def _next_pairs(bundle: JSON) -> list[tuple[str, str]] | None:
    url = next((x["url"] for x in bundle["link"] if x["relation"] == "next"), None)
    return None if url is None else parse_qsl(urlsplit(url).query, keep_blank_values=True)


def is_system(pairs: Sequence[tuple[str, str]]) -> bool:
    """Tell whether a search is a system search (`GET /fhir?_type=...`)."""
    return any(name == "_type" for name, _ in pairs)


def search_path(resource_type: str, pairs: Sequence[tuple[str, str]]) -> str:
    """Return the path a search is sent to: the type's, or the base's for a system search."""
    return "/fhir" if is_system(pairs) else f"/fhir/{resource_type}"


def service_bundle(
    session: Session, resource_type: str, pairs: Sequence[tuple[str, str]], base_url: str
) -> JSON | None:
    """Answer one search (one page) in the service layer; None when it raised."""
    try:
        with session.begin_nested():
            if is_system(pairs):
                return service.system_search(session, pairs=pairs, base_url=base_url, strict=True)
            return service.search(
                session, resource_type=resource_type, pairs=pairs, base_url=base_url, strict=True
            )
    except Exception:  # noqa: BLE001 - the HTTP rerun reports what the error was
        return None


def service_total(
    session: Session, resource_type: str, pairs: Sequence[tuple[str, str]], base_url: str
) -> int | None:
    """Return the `total` of a search answered in the service layer."""
    bundle = service_bundle(session, resource_type, pairs, base_url)
    total = None if bundle is None else bundle.get("total")
    return total if isinstance(total, int) else None


def service_pages(
    session: Session, resource_type: str, pairs: Sequence[tuple[str, str]], base_url: str
) -> list[str] | None:
    """Run a search in the service layer, every page; None when it raised (HTTP tells how)."""
    found: list[str] = []
    page: list[tuple[str, str]] | None = list(pairs)
    for _ in range(MAX_PAGES):
        if page is None:
            return found
        bundle = service_bundle(session, resource_type, page, base_url)
        if bundle is None:
            return None
        found.extend(_ids(bundle))
        page = _next_pairs(bundle)
    return None


def http_pages(
    client: TestClient, resource_type: str, pairs: Sequence[tuple[str, str]]
) -> tuple[int, str, list[str]]:
    """Run `GET /fhir/<type>?...`, every page: (status, body of an error, ids in order)."""
    found: list[str] = []
    path = search_path(resource_type, pairs)
    response = client.get(path, params=list(pairs), headers=STRICT)
    for _ in range(MAX_PAGES):
        if response.status_code != 200:
            break
        bundle = response.json()
        found.extend(_ids(bundle))
        page = _next_pairs(bundle)
        if page is None:
            return 200, "", found
        response = client.get(path, params=page, headers=STRICT)
    else:
        return 0, f"no last page after {MAX_PAGES} pages", found
    return response.status_code, response.text, found


def order_problem(expectation: Expectation, found: list[str]) -> str:
    """Describe the first pair of results in the wrong order, or return ''."""
    keyed = [(rid, expectation.order[rid]) for rid in found if rid in expectation.order]
    for (first, (first_low, first_high)), (then, (then_low, then_high)) in zip(
        keyed, keyed[1:], strict=False
    ):
        # Wrong only when the two values' ranges are apart in the wrong direction.
        wrong = then_low > first_high if expectation.descending else first_low > then_high
        if wrong:
            return f"out of order: {first} ({first_low}) before {then} ({then_low})"
    return ""


def judge(expectation: Expectation, found: list[str]) -> tuple[tuple[str, ...], ...]:
    """Return (missed, unwanted, problems) of one answer."""
    seen = set(found)
    problems = []
    if len(seen) != len(found):
        problems.append("a resource is returned twice")
    if expectation.order:
        problem = order_problem(expectation, found)
        if problem:
            problems.append(problem)
    return (
        tuple(sorted(expectation.present - seen)),
        tuple(sorted(expectation.absent & seen)),
        tuple(problems),
    )


@dataclass
class Runner:
    """Runs the planned searches; settles every doubt over HTTP."""

    session: Session
    client: TestClient
    base_url: str
    over_http: set[str] = field(default_factory=set)
    first_of_type: set[tuple[str, str]] = field(default_factory=set)
    paged: dict[tuple[str, str], int] = field(default_factory=dict)

    def run(self, expectation: Expectation) -> list[Failure]:
        """Run one search (and for some, its pages and its count); return what went wrong.

        The service layer answers in ~1 ms where an HTTP request costs ~10 ms (auth,
        audit), so most searches skip HTTP; the first search of each kind and every
        failure go through `GET /fhir/<type>`, which is what a failure reports.
        """
        kind, shape = expectation.kind, (expectation.resource_type, expectation.kind)
        http = kind not in self.over_http
        self.over_http.add(kind)
        first = shape not in self.first_of_type
        self.first_of_type.add(shape)
        whole = [*expectation.pairs, ("_count", "1000")]
        failures = self._check(expectation, whole, http=http)
        if failures:
            return failures
        paged = self.paged.get(shape, 0)
        if first or paged < PAGED_KINDS.get(kind, 0):
            self.paged[shape] = paged + 1
            # Keyset paging walks differently (string and date walks, sort cursors).
            pages = [*expectation.pairs, ("_count", str(PAGE_SIZE))]
            failures = self._check(expectation, pages, http=False)
        if first and not failures:
            failures = self._check_total(expectation)
        return failures

    def _check_total(self, expectation: Expectation) -> list[Failure]:
        # `_summary=count` counts the matches apart from the page walks.
        resource_type = expectation.resource_type
        whole = [*expectation.pairs, ("_count", "1000")]
        found = service_pages(self.session, resource_type, whole, self.base_url)
        pairs = [*expectation.pairs, ("_summary", "count")]
        total = service_total(self.session, resource_type, pairs, self.base_url)
        if found is not None and total == len(found):
            return []
        path = search_path(resource_type, pairs)
        response = self.client.get(path, params=pairs, headers=STRICT)
        total = response.json().get("total") if response.status_code == 200 else None
        problem = f"total {total}, but {None if found is None else len(found)} matches"
        return [
            Failure(
                resource_type,
                expectation.param,
                expectation.kind,
                query_text(pairs),
                response.status_code,
                problem=problem,
                body=response.text,
            )
        ]

    def _check(
        self, expectation: Expectation, pairs: list[tuple[str, str]], *, http: bool
    ) -> list[Failure]:
        if not http:
            found = service_pages(self.session, expectation.resource_type, pairs, self.base_url)
            if found is not None and judge(expectation, found) == ((), (), ()):
                return []
        status, body, found = http_pages(self.client, expectation.resource_type, pairs)
        missed, unwanted, problems = judge(expectation, found)
        if status == 200 and not missed and not unwanted and not problems:
            return []
        return [
            Failure(
                expectation.resource_type,
                expectation.param,
                expectation.kind,
                query_text(pairs),
                status,
                missed,
                unwanted,
                "; ".join(problems),
                body,
            )
        ]


@pytest.fixture(scope="module")
def sweep(
    app: FastAPI,
    db_engine: Engine,
    settings: Settings,
    auth_headers: Callable[[str], dict[str, str]],
) -> Iterator[Sweep]:
    """Ingest the Inferno bundles in a rolled-back transaction and run the whole sweep once."""
    base_url = settings.fhir_base_url
    planner = Planner(base_url)
    with db_engine.connect() as connection:
        outer = connection.begin()
        # As the `session` fixture does, for the module: requests join this transaction.
        db.session_factory.configure(bind=connection, join_transaction_mode="create_savepoint")
        try:
            with (
                TestClient(
                    app, raise_server_exceptions=False, headers=auth_headers("admin")
                ) as client,
                Session(connection, join_transaction_mode="create_savepoint") as session,
            ):
                for name in BUNDLES:
                    bundle = with_own_ids(load_fixture(f"fhir-samples/{name}"))
                    response = client.post("/fhir", json=bundle, headers=FHIR_JSON)
                    assert response.status_code == 200, response.text[:2000]
                stored = connection.execute(
                    text(
                        "SELECT resource::text FROM fhir_resource WHERE NOT deleted"
                        " ORDER BY resource_type, id"
                    )
                ).scalars()
                for row in stored:
                    planner.plan_resource(orjson.loads(row))
                planner.plan_sorts()
                planner.plan_links()
                planner.plan_system_searches()
                runner = Runner(session, client, base_url)
                failures = [f for e in planner.searches.values() for f in runner.run(e)]
        finally:
            db.session_factory.kw.pop("join_transaction_mode", None)
            db.session_factory.configure(bind=db_engine)
            outer.rollback()
    kinds: dict[str, int] = {}
    for expectation in planner.searches.values():
        kinds[expectation.kind] = kinds.get(expectation.kind, 0) + 1
    yield Sweep(planner.checks, len(planner.searches), len(runner.over_http), kinds, failures)


# --- the tests ------------------------------------------------------------------------------

# Failures that are known server bugs: name -> (reason, does a failure belong to it).
KNOWN_BUGS: dict[str, tuple[str, Callable[[Failure], bool]]] = {}

KINDS = (
    "token",
    "token:text",
    "token:of-type",
    "token:not",
    "token:not-own",
    "string",
    "string:exact",
    "string:contains",
    "reference",
    "reference:id",
    "reference:absolute",
    "reference:type",
    "reference:identifier",
    "chain",
    "_has",
    "date",
    "date+sort",
    "date:and",
    "number",
    "quantity",
    "quantity:unit",
    "uri",
    "uri:below",
    "uri:above",
    "missing",
    "sort",
    "system",
)


def known_bug(failure: Failure) -> str | None:
    """Return the name of the known bug a failure is, or None."""
    return next((name for name, (_, belongs) in KNOWN_BUGS.items() if belongs(failure)), None)


def report(failures: list[Failure]) -> str:
    """Return failures as a readable list."""
    return "\n".join(str(failure) for failure in failures)


@pytest.mark.parametrize("kind", KINDS)
def test_every_resource_is_found_by_its_own_values(sweep: Sweep, kind: str) -> None:
    """Each search derived from the resources' own values answers 200 and as R4 requires."""
    if not sweep.kinds.get(kind):
        pytest.skip(f"the sample data gives no {kind} search")
    failures = [f for f in sweep.failures if f.kind == kind and known_bug(f) is None]
    assert not failures, f"{len(failures)} failing searches:\n{report(failures)}"


@pytest.mark.parametrize(
    "bug",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=reason, strict=True))
        for name, (reason, _) in KNOWN_BUGS.items()
    ],
)
def test_known_bug(sweep: Sweep, bug: str) -> None:
    """A known server bug still shows in the sweep (strict xfail: fixing it flags this)."""
    failures = [f for f in sweep.failures if known_bug(f) == bug]
    assert not failures, f"{len(failures)} failing searches:\n{report(failures)}"


def test_sweep_covers_every_parameter_type(sweep: Sweep) -> None:
    """The sweep really ran: many checks, and searches of every common parameter type."""
    assert sweep.checks > 20_000
    assert {"token", "string", "reference", "date", "quantity", "uri", "missing"} <= set(
        sweep.kinds
    )
    assert sweep.over_http == len(sweep.kinds)
