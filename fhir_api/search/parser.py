"""Parse FHIR search query parameters into a typed query, using the official definitions.

Each criterion is already encoded the way ingest wrote the index
(`fhir_api.search_index`), so the SQL side only compares keys and ranges.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Literal

from fhir_api.search.errors import InvalidSearch, SearchTooCostly, UnsupportedModifier
from fhir_api.search.geo import DEFAULT_NEAR_KM, KILOMETRES_PER_UNIT, NearPoint
from fhir_api.search_index import (
    SearchParameterInfo,
    composite_key,
    composite_param,
    date_range,
    decimal_range,
    normalize_string,
    of_type_key,
    position_params,
    reference_query_keys,
    reference_value,
    search_parameters_for,
    text_param,
    token_query_key,
)
from fhir_api.search_index.definitions import definitions_for

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
DEFAULT_COUNT = 20
MAX_COUNT = 1_000
# Bounds on one request's criteria: every value is a key the database tests, and
# a body posted to `_search` has no URL length limit. A page's worth of ids fits.
MAX_VALUES = 1_000
MAX_PARAMETERS = 100
# Parameters that shape the answer rather than select resources.
RESULT_PARAMETERS = frozenset(
    {
        "_count",
        "_sort",
        "_total",
        "_summary",
        "_elements",
        "_include",
        "_revinclude",
        "_cursor",
        "_format",
        "_pretty",
        "_type",
        "_contained",
        "_containedType",
    }
)
# R4 parameters without an expression: nothing is indexed for them (treated as unknown).
UNINDEXED = frozenset({"_text", "_content", "_query", "_list"})
SUMMARY_MODES = ("true", "false", "count", "data", "text")
TOTAL_MODES = ("none", "estimate", "accurate")
StringMode = Literal["start", "exact", "contains"]
UriMode = Literal["eq", "below", "above"]
MissingKind = Literal["token", "reference", "string", "date", "quantity", "uri"]


@dataclass(frozen=True, slots=True)
class IdCriterion:
    """`_id`: the logical id is one of `ids` (or none of them with `:not`)."""

    ids: tuple[str, ...]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class TokenCriterion:
    """Token-array keys: any key matches (none with `:not`)."""

    keys: tuple[str, ...]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class ReferenceCriterion:
    """Reference-array keys: any key matches."""

    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StringCriterion:
    """A string-table match on `param`: normalized prefix, exact part, or substring."""

    param: str
    mode: StringMode
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DateComparison:
    """One date value with its prefix, as the closed UTC range it covers."""

    prefix: str
    low: datetime
    high: datetime


@dataclass(frozen=True, slots=True)
class DateCriterion:
    """A date-table match on `param` (or the row's last_updated when `param` is None)."""

    param: str | None
    comparisons: tuple[DateComparison, ...]


@dataclass(frozen=True, slots=True)
class NumberComparison:
    """One number or quantity value with its prefix, precision range and unit."""

    prefix: str
    value: Decimal
    low: Decimal
    high: Decimal
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class NumberCriterion:
    """A quantity-table match on `param`."""

    param: str
    comparisons: tuple[NumberComparison, ...]


@dataclass(frozen=True, slots=True)
class UriCriterion:
    """A uri-table match on `param`: equal, below (prefix) or above (the value's prefixes)."""

    param: str
    mode: UriMode
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NearCriterion:
    """Location `near`: the indexed position of `param` lies within any of the circles."""

    param: str
    points: tuple[NearPoint, ...]


@dataclass(frozen=True, slots=True)
class MissingCriterion:
    """`:missing`: whether the resource has any index value for `param`."""

    param: str
    kind: MissingKind
    missing: bool


@dataclass(frozen=True, slots=True)
class ChainCriterion:
    """`ref[:Type].param=...`: the reference points at a target matching `inner`."""

    param: str
    targets: tuple[tuple[str, Criterion], ...]
    base_url: str = ""


@dataclass(frozen=True, slots=True)
class HasCriterion:
    """`_has:Type:ref:param=...`: some `source_type` resource matching `inner` points here."""

    source_type: str
    reference_param: str
    inner: Criterion
    base_url: str = ""


@dataclass(frozen=True, slots=True)
class AnyOfCriterion:
    """Alternatives that do not share one index param (comma-separated composites)."""

    options: tuple[Criterion, ...]


@dataclass(frozen=True, slots=True)
class AllOfCriterion:
    """Conditions that must all hold (a composite with several typed components)."""

    parts: tuple[Criterion, ...]


Criterion = (
    IdCriterion
    | TokenCriterion
    | ReferenceCriterion
    | StringCriterion
    | DateCriterion
    | NumberCriterion
    | UriCriterion
    | NearCriterion
    | MissingCriterion
    | ChainCriterion
    | HasCriterion
    | AnyOfCriterion
    | AllOfCriterion
)


@dataclass(frozen=True, slots=True)
class SortKey:
    """One `_sort` key: a parameter code (or `_id`/`_lastUpdated`) and its direction."""

    code: str
    type: str
    descending: bool


@dataclass(frozen=True, slots=True)
class Include:
    """One `_include` or `_revinclude`: source type, reference param (None = `*`), target."""

    source_type: str
    param: str | None
    target_type: str | None
    iterate: bool


@dataclass(slots=True)
class SearchQuery:
    """A parsed search: criteria per type, result parameters, and what was ignored."""

    resource_types: tuple[str, ...]
    criteria: dict[str, list[Criterion]]
    sort: tuple[SortKey, ...] = ()
    count: int = DEFAULT_COUNT
    cursor: str | None = None
    total: str | None = None
    summary: str | None = None
    elements: tuple[str, ...] = ()
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    ignored: list[str] = field(default_factory=list)
    # The parameters as received, without the cursor, for the Bundle links.
    pairs: list[tuple[str, str]] = field(default_factory=list)


def split_unescaped(raw: str, separator: str) -> list[str]:
    """Split on `separator` unless escaped with a backslash; drop the escapes (R4 "Escaping")."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in raw:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _split_keep_escapes(raw: str, separator: str) -> list[str]:
    # Like split_unescaped, but keeps other escapes for a later split ($ then |).
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in raw:
        if escaped:
            current.append(char if char == separator else "\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _values(raw: str) -> list[str]:
    values = _split_keep_escapes(raw, ",")
    if len(values) > MAX_VALUES:
        raise SearchTooCostly(f"a search parameter takes at most {MAX_VALUES:,} values")
    if any(value == "" for value in values):
        raise InvalidSearch("a search value is empty")
    return values


def _unescape(value: str) -> str:
    return "".join(split_unescaped(value, "\x00"))


def _split_prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in PREFIXES:
        return value[:2], value[2:]
    return "eq", value


# Messages name the parameter, never the value: search values are patient data.
def parse_date_value(value: str, name: str) -> DateComparison:
    """Parse one date search value (`ge2024-01`), or raise a 400."""
    prefix, rest = _split_prefix(value)
    # A `+` zone offset arrives as a space when the client did not escape it.
    found = date_range(rest.replace(" ", "+"))
    if found is None:
        raise InvalidSearch(f"{name}: a value is not a FHIR date with a valid prefix")
    low, high = found
    if prefix == "ap":
        # R4 leaves "approximately" to the server: 10% of the distance to now, at least a day.
        gap = abs(datetime.now(UTC) - low) / 10
        widen = max(gap, timedelta(days=1))
        low = max(low - widen, datetime.min.replace(tzinfo=UTC) + widen)
        high = min(high + widen, datetime.max.replace(tzinfo=UTC) - widen)
    return DateComparison(prefix, low, high)


def parse_number_value(value: str, name: str, *, quantity: bool) -> NumberComparison:
    """Parse one number (`gt5.4`) or quantity (`5.4|system|code`) search value."""
    number_text, system, code = value, None, None
    if quantity:
        parts = split_unescaped(value, "|")
        if len(parts) not in (1, 3):
            raise InvalidSearch(f"{name}: a value is not number|system|code")
        number_text = parts[0]
        if len(parts) == 3:
            system, code = parts[1] or None, parts[2] or None
    prefix, rest = _split_prefix(number_text)
    try:
        number = Decimal(rest)
    except InvalidOperation as error:
        raise InvalidSearch(f"{name}: a value is not a number with a valid prefix") from error
    if not number.is_finite():
        raise InvalidSearch(f"{name}: a value is not a finite number")
    low, high = decimal_range(number)
    if prefix == "ap":
        # R4 recommends 10% of the value for "approximately".
        spread = max(abs(number) / 10, high - number)
        low, high = number - spread, number + spread
    return NumberComparison(prefix, number, low, high, system, code)


# FHIR's decimal (R4 datatypes): no spaces, NaN, Infinity or other digits than 0-9.
_FHIR_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _decimal(text: str, name: str, what: str) -> Decimal:
    if _FHIR_DECIMAL.fullmatch(text) is None:
        raise InvalidSearch(f"{name}: the {what} is not a decimal number")
    return Decimal(text)


def _coordinate(text: str, name: str, what: str, limit: float) -> float:
    number = float(_decimal(text, name, what))
    if not -limit <= number <= limit:
        raise InvalidSearch(f"{name}: the {what} is outside ±{limit:g} degrees")
    return number


def parse_near_value(value: str, name: str) -> NearPoint:
    """Parse one `near` value, `latitude|longitude[|distance[|units]]`, or raise a 400."""
    parts = split_unescaped(value, "|")
    if not 2 <= len(parts) <= 4:
        raise InvalidSearch(f"{name}: a value is not latitude|longitude|distance|units")
    latitude = _coordinate(parts[0], name, "latitude", 90.0)
    longitude = _coordinate(parts[1], name, "longitude", 180.0)
    distance_text = parts[2] if len(parts) > 2 else ""
    if not distance_text:
        # R4: without a distance, what is near is the server's call (and units do not matter).
        return NearPoint(latitude, longitude, DEFAULT_NEAR_KM)
    units = parts[3] if len(parts) > 3 and parts[3] else "km"
    if units not in KILOMETRES_PER_UNIT:
        known = ", ".join(KILOMETRES_PER_UNIT)
        raise InvalidSearch(f"{name}: distance units must be one of the UCUM codes {known}")
    distance = _decimal(distance_text, name, "distance")
    if distance < 0:
        raise InvalidSearch(f"{name}: the distance must be a number of zero or more")
    return NearPoint(latitude, longitude, float(distance) * KILOMETRES_PER_UNIT[units])


def _local_reference(value: str, base_url: str) -> str:
    if base_url and value.startswith(base_url + "/"):
        return value[len(base_url) + 1 :]
    return value


class _Parser:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def criterion(
        self, resource_type: str, name: str, raw: str, *, allow_chain: bool = True
    ) -> Criterion | None:
        """Return the criterion of one parameter, or None when the type does not know it."""
        if name.startswith("_has:"):
            if not allow_chain:
                raise UnsupportedModifier("_has and chains are supported one level deep")
            return self._has(resource_type, name, raw)
        head, dot, chained = name.partition(".")
        code, _, modifier = head.partition(":")
        if code == "_id":
            return self._id(modifier, raw)
        if code == "_lastUpdated":
            self._no_modifier(name, modifier)
            values = _values(raw)
            return DateCriterion(None, tuple(parse_date_value(v, name) for v in values))
        info = search_parameters_for(resource_type).get(code)
        if info is None or code in UNINDEXED:
            return None
        if dot:
            if not allow_chain:
                raise UnsupportedModifier("_has and chains are supported one level deep")
            return self._chain(info, modifier, chained, raw)
        if modifier == "missing":
            return self._missing(info, raw)
        return self._typed(resource_type, info, modifier, raw, name)

    @staticmethod
    def _no_modifier(name: str, modifier: str) -> None:
        if modifier:
            raise UnsupportedModifier(f"{name}: modifier :{modifier} is not supported here")

    def _id(self, modifier: str, raw: str) -> Criterion:
        if modifier not in ("", "not"):
            raise UnsupportedModifier(f"_id: modifier :{modifier} is not supported")
        return IdCriterion(tuple(_unescape(v) for v in _values(raw)), negate=modifier == "not")

    def _missing(self, info: SearchParameterInfo, raw: str) -> Criterion:
        if raw not in ("true", "false"):
            raise InvalidSearch(f"{info.code}:missing takes true or false")
        kinds: dict[str, MissingKind] = {
            "token": "token",
            "reference": "reference",
            "string": "string",
            "date": "date",
            "number": "quantity",
            "quantity": "quantity",
            "uri": "uri",
            # `near`: a position is indexed as its two coordinates, or not at all.
            "special": "quantity",
        }
        kind = kinds.get(info.type)
        if kind is None:
            raise UnsupportedModifier(f"{info.code}:missing is not supported for {info.type}")
        param = position_params(info.code)[0] if info.type == "special" else info.code
        return MissingCriterion(param, kind, raw == "true")

    def _typed(
        self, resource_type: str, info: SearchParameterInfo, modifier: str, raw: str, name: str
    ) -> Criterion:
        values = _values(raw)
        code = info.code
        if info.type == "string":
            if modifier not in ("", "exact", "contains"):
                raise UnsupportedModifier(f"{name}: strings take :exact or :contains")
            if modifier == "exact":
                return StringCriterion(code, "exact", tuple(_unescape(v) for v in values))
            mode: StringMode = "contains" if modifier == "contains" else "start"
            normalized = tuple(normalize_string(_unescape(v)) for v in values)
            return StringCriterion(code, mode, normalized)
        if info.type == "token":
            return self._token(code, modifier, values, name)
        if info.type == "reference":
            return self._reference(info, modifier, values, name)
        if info.type == "date":
            self._no_modifier(name, modifier)
            return DateCriterion(code, tuple(parse_date_value(v, name) for v in values))
        if info.type in ("number", "quantity"):
            self._no_modifier(name, modifier)
            quantity = info.type == "quantity"
            comparisons = tuple(parse_number_value(v, name, quantity=quantity) for v in values)
            return NumberCriterion(code, comparisons)
        if info.type == "uri":
            if modifier not in ("", "below", "above"):
                raise UnsupportedModifier(f"{name}: uris take :below or :above")
            uri_mode: UriMode = "eq" if not modifier else modifier  # type: ignore[assignment]  # narrowed by the check above
            return UriCriterion(code, uri_mode, tuple(_unescape(v) for v in values))
        if info.type == "composite":
            self._no_modifier(name, modifier)
            return self._composite(resource_type, code, values, name)
        if info.type == "special":
            self._no_modifier(name, modifier)
            return NearCriterion(code, tuple(parse_near_value(v, name) for v in values))
        raise UnsupportedModifier(f"{name}: parameters of type {info.type} are not supported")

    def _token(self, code: str, modifier: str, values: list[str], name: str) -> Criterion:
        if modifier == "text":
            normalized = tuple(normalize_string(_unescape(v)) for v in values)
            return StringCriterion(text_param(code), "start", normalized)
        if modifier == "of-type":
            keys: list[str] = []
            for value in values:
                parts = split_unescaped(value, "|")
                if len(parts) != 3 or not parts[1] or not parts[2]:
                    raise InvalidSearch(f"{name}: a value is not system|code|value")
                keys.append(of_type_key(code, parts[0] or None, parts[1], parts[2]))
            return TokenCriterion(tuple(keys))
        if modifier not in ("", "not"):
            raise UnsupportedModifier(f"{name}: modifier :{modifier} is not supported")
        keys = [token_query_key(code, self._token_value(v)) for v in values]
        return TokenCriterion(tuple(keys), negate=modifier == "not")

    @staticmethod
    def _token_value(value: str) -> str:
        parts = split_unescaped(value, "|")
        if len(parts) > 2:
            raise InvalidSearch("a token value has more than one '|'")
        return "|".join(parts)

    def _reference(
        self, info: SearchParameterInfo, modifier: str, values: list[str], name: str
    ) -> Criterion:
        code = info.code
        if modifier == "identifier":
            keys = [token_query_key(f"{code}:identifier", self._token_value(v)) for v in values]
            return TokenCriterion(tuple(keys))
        if modifier and modifier not in info.targets:
            raise UnsupportedModifier(f"{name}: modifier :{modifier} is not supported")
        found: list[str] = []
        for value in values:
            local = _local_reference(_unescape(value), self.base_url)
            if modifier:
                if "/" in local:
                    kind, _, local = local.partition("/")
                    if kind != modifier:
                        raise InvalidSearch(f"{name}: a value is not a {modifier} reference")
                found.extend(reference_query_keys(code, local, (modifier,)))
            else:
                targets = info.targets or ()
                found.extend(reference_query_keys(code, local, targets))
        return ReferenceCriterion(tuple(dict.fromkeys(self._with_absolute(found))))

    def _with_absolute(self, keys: list[str]) -> list[str]:
        # A bundle's new entries are matched in memory before ingest makes their
        # references to this server's absolute URL local (writes.py).
        absolute = [
            f"{param}={self.base_url}/{value}"
            for param, _, value in (key.partition("=") for key in keys)
            if self.base_url and "://" not in value
        ]
        return keys + absolute

    def _composite(self, resource_type: str, code: str, values: list[str], name: str) -> Criterion:
        components = definitions_for(resource_type)[code].components
        types = [component.type for component in components]
        keyed = [t in ("token", "reference", "uri") for t in types]
        # Ingest keys the leading token/reference/uri parts; typed parts follow them.
        first_typed = keyed.index(False) if False in keyed else len(keyed)
        if not keyed[0] or any(keyed[first_typed:]):
            raise UnsupportedModifier(f"{name}: this composite is not supported")
        tokens: list[str] = []
        typed: list[Criterion] = []
        for value in values:
            parts = _split_keep_escapes(value, "$")
            if len(parts) != len(components):
                raise InvalidSearch(f"{name}: a value needs {len(components)} '$' parts")
            keys = [
                self._composite_part(kind, _unescape(part))
                for kind, part, is_key in zip(types, parts, keyed, strict=True)
                if is_key
            ]
            if all(keyed):
                tokens.append(composite_key(code, *keys))
                continue
            trailing = list(zip(components[first_typed:], parts[first_typed:], strict=True))
            if len(trailing) == 1:
                component, raw = trailing[0]
                typed.append(
                    _typed_part(composite_param(code, *keys), component.type, _unescape(raw), name)
                )
                continue
            # Several typed parts (the MolecularSequence coordinates): ingest indexes
            # each under its component code, and all of them must match.
            typed.append(
                AllOfCriterion(
                    tuple(
                        _typed_part(
                            composite_param(code, *keys, component.code),
                            component.type,
                            _unescape(raw),
                            name,
                        )
                        for component, raw in trailing
                    )
                )
            )
        if tokens:
            return TokenCriterion(tuple(tokens))
        return typed[0] if len(typed) == 1 else AnyOfCriterion(tuple(typed))

    def _composite_part(self, component_type: str, value: str) -> str:
        if component_type == "reference":
            local = _local_reference(value, self.base_url)
            return reference_value(local) or local
        return value

    def _chain(self, info: SearchParameterInfo, modifier: str, chained: str, raw: str) -> Criterion:
        if info.type != "reference":
            raise UnsupportedModifier(f"{info.code}: only references can be chained")
        if modifier and modifier not in info.targets:
            raise UnsupportedModifier(f"{info.code}: :{modifier} is not one of its targets")
        targets = (modifier,) if modifier else info.targets
        inner: list[tuple[str, Criterion]] = []
        for target in targets:
            criterion = self.criterion(target, chained, raw, allow_chain=False)
            if criterion is not None:
                inner.append((target, criterion))
        if not inner:
            raise InvalidSearch(f"{info.code}.{chained}: no target type has that parameter")
        return ChainCriterion(info.code, tuple(inner), self.base_url)

    def _has(self, resource_type: str, name: str, raw: str) -> Criterion:
        parts = name.split(":", 3)
        if len(parts) != 4 or not all(parts[1:]):
            raise InvalidSearch(f"{name}: use _has:Type:reference:parameter")
        _, source_type, reference_param, inner_name = parts
        source_params = search_parameters_for(source_type)
        if not source_params:
            raise InvalidSearch(f"{name}: {source_type} is not a resource type")
        reference = source_params.get(reference_param)
        if reference is None or reference.type != "reference":
            raise InvalidSearch(f"{name}: {reference_param} is not a reference of {source_type}")
        if reference.targets and resource_type not in reference.targets:
            raise InvalidSearch(f"{name}: {reference_param} does not point at {resource_type}")
        inner = self.criterion(source_type, inner_name, raw, allow_chain=False)
        if inner is None:
            raise InvalidSearch(f"{name}: {source_type} has no parameter {inner_name}")
        return HasCriterion(source_type, reference_param, inner, self.base_url)


def _typed_part(param: str, component_type: str, raw: str, name: str) -> Criterion:
    """Return the criterion of one typed composite component under its index param."""
    if component_type == "date":
        return DateCriterion(param, (parse_date_value(raw, name),))
    if component_type in ("quantity", "number"):
        comparison = parse_number_value(raw, name, quantity=component_type == "quantity")
        return NumberCriterion(param, (comparison,))
    if component_type == "string":
        return StringCriterion(param, "start", (normalize_string(raw),))
    raise UnsupportedModifier(f"{name}: this composite is not supported")


def parse_count(raw: str) -> int:
    """Parse `_count`: a non-negative integer, capped at the maximum page size."""
    if not raw.isdigit():
        raise InvalidSearch(f"_count must be a non-negative integer, not {raw!r}")
    return min(int(raw), MAX_COUNT)


def _sort_keys(resource_types: Sequence[str], raw: str) -> tuple[SortKey, ...]:
    keys: list[SortKey] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        descending = item.startswith("-")
        code = item[1:] if descending else item
        if code in ("_id", "_lastUpdated"):
            keys.append(SortKey(code, code, descending))
            continue
        kinds = {search_parameters_for(t).get(code) for t in resource_types}
        if None in kinds:
            raise InvalidSearch(f"_sort: {code!r} is not a parameter of every searched type")
        types = {info.type for info in kinds if info is not None}
        if len(types) != 1 or next(iter(types)) in ("composite", "special"):
            raise InvalidSearch(f"_sort: {code!r} cannot be sorted on")
        keys.append(SortKey(code, next(iter(types)), descending))
    return tuple(keys)


def _include(raw: str, iterate: bool, name: str) -> Include:
    if raw == "*":
        return Include("*", None, None, iterate)
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidSearch(f"{name}: use SourceType:param[:TargetType]")
    source_type, param = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    params = search_parameters_for(source_type)
    if not params:
        raise InvalidSearch(f"{name}: {source_type} is not a resource type")
    if param == "*":
        return Include(source_type, None, target, iterate)
    info = params.get(param)
    if info is None or info.type != "reference":
        raise InvalidSearch(f"{name}: {param} is not a reference of {source_type}")
    if target is not None and info.targets and target not in info.targets:
        raise InvalidSearch(f"{name}: {param} does not point at {target}")
    return Include(source_type, param, target, iterate)


def parse_search(
    resource_types: Sequence[str], pairs: Sequence[tuple[str, str]], *, base_url: str
) -> SearchQuery:
    """Parse query parameters for one or more types; unknown parameters are collected."""
    if len(pairs) > MAX_PARAMETERS:
        raise SearchTooCostly(f"a search takes at most {MAX_PARAMETERS} parameters")
    parser = _Parser(base_url)
    query = SearchQuery(tuple(resource_types), {t: [] for t in resource_types})
    for name, raw in pairs:
        if name == "_cursor":
            query.cursor = raw
            continue
        query.pairs.append((name, raw))
        base_name, _, modifier = name.partition(":")
        if base_name in RESULT_PARAMETERS:
            _result_parameter(query, base_name, modifier, raw)
            continue
        parsed = [(t, parser.criterion(t, name, raw)) for t in resource_types]
        if any(criterion is None for _, criterion in parsed):
            # A system search applies only parameters every listed type defines.
            query.ignored.append(name)
            continue
        for resource_type, criterion in parsed:
            if criterion is not None:
                query.criteria[resource_type].append(criterion)
    return query


def _result_parameter(query: SearchQuery, name: str, modifier: str, raw: str) -> None:
    if name == "_count":
        query.count = parse_count(raw)
    elif name == "_sort":
        query.sort = query.sort + _sort_keys(query.resource_types, raw)
    elif name == "_total":
        if raw not in TOTAL_MODES:
            raise InvalidSearch(f"_total takes {', '.join(TOTAL_MODES)}")
        query.total = raw
    elif name == "_summary":
        if raw not in SUMMARY_MODES:
            raise InvalidSearch(f"_summary takes {', '.join(SUMMARY_MODES)}")
        query.summary = None if raw == "false" else raw
    elif name == "_elements":
        query.elements = tuple(e.strip() for e in raw.split(",") if e.strip())
    elif name in ("_include", "_revinclude"):
        if modifier not in ("", "iterate", "recurse"):
            raise UnsupportedModifier(f"{name}: modifier :{modifier} is not supported")
        item = _include(raw, modifier != "", name)
        if name == "_include":
            query.includes = (*query.includes, item)
        else:
            query.revincludes = (*query.revincludes, item)
    elif name in ("_contained", "_containedType"):
        query.ignored.append(name)
    # _format, _pretty and _type are handled by the HTTP edge.
