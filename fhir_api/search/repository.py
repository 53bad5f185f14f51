"""All SQL of the search API: parsed criteria to SQLAlchemy Core over the record store's index.

Every statement reads `fhir_resource` through `visible()`, the one place where
the caller's `SearchScope` becomes part of the SQL (matches, includes, chains
and `_has` alike), so the auth layer narrows searches by adding a condition there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

import orjson
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    CompoundSelect,
    DateTime,
    Float,
    FromClause,
    Select,
    String,
    Table,
    Text,
    and_,
    bindparam,
    exists,
    false,
    func,
    literal,
    literal_column,
    not_,
    null,
    or_,
    select,
    true,
    tuple_,
    type_coerce,
    union_all,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import Subquery, TableValuedAlias
from sqlalchemy.types import NullType

from fhir_api.models import (
    ResourceRow,
    SearchDateRow,
    SearchQuantityRow,
    SearchStringRow,
    SearchUriRow,
)
from fhir_api.search.geo import EARTH_RADIUS_KM, NearPoint
from fhir_api.search.parser import (
    AllOfCriterion,
    AnyOfCriterion,
    ChainCriterion,
    Criterion,
    DateComparison,
    DateCriterion,
    HasCriterion,
    IdCriterion,
    MissingCriterion,
    NearCriterion,
    NumberComparison,
    NumberCriterion,
    ReferenceCriterion,
    SortKey,
    StringCriterion,
    TokenCriterion,
    UriCriterion,
)
from fhir_api.search_index import at_most_one_patient, position_params, single_valued

RESOURCE = cast(Table, ResourceRow.__table__)
STRINGS = cast(Table, SearchStringRow.__table__)
DATES = cast(Table, SearchDateRow.__table__)
QUANTITIES = cast(Table, SearchQuantityRow.__table__)
URIS = cast(Table, SearchUriRow.__table__)
# Aliases are immutable: built once, shared by every statement (building them per
# request was half the Python cost of a search).
MATCHED = RESOURCE.alias("r")
STORED = RESOURCE.alias("stored")
# A name search walks the string index in (value, id) order: each matching
# resource once, at the first of its matching values ("earlier" finds the others).
DRIVING_ENTRY = STRINGS.alias("entry")
EARLIER_ENTRY = STRINGS.alias("earlier")
# A search sorted by the date it filters on walks that date's rows in order:
# those across the window's edge (from the range index), then those within it
# (from a btree in sort order), in a union the planner merges lazily.
EDGE_DATE = DATES.alias("edge")
INNER_DATE = DATES.alias("inner")
# Keyed criteria the planner expects to match fewer resources than this drive a
# sorted date search better than the date walk does (a patient's encounters,
# not a unit's). The estimate costs a planning; it is kept a while per process,
# since which plan wins changes with the data, slowly, and never the answer.
DATE_WALK_MIN_KEYED_MATCHES = 200
DATE_WALK_DECISION_SECONDS = 300.0
_walk_decisions: dict[Hashable, tuple[bool, float]] = {}
# A search sorted by a date it does not filter on walks that date's index too,
# but nothing bounds the walk: a caller who may see few of the rows would read
# them all. It reads this many rows per page asked for (within the bounds), and
# a page it could not fill that way is found by the planner's plan instead.
SORT_WALK_ROWS_PER_MATCH = 400
SORT_WALK_MIN_ROWS = 8_000
SORT_WALK_MAX_ROWS = 200_000
# Searches whose walk ran out of budget, with when: their next pages (and the
# same search by the same caller) go to the planner at once for a while, so a
# caller who sees few of the rows does not pay for a failed walk on every page.
_sort_walks_given_up: dict[Hashable, float] = {}
CHAINED = RESOURCE.alias("chained")
# Resources with several patients, read through their partial index only.
SEVERAL_PATIENTS = RESOURCE.alias("several")
HAS_SOURCE = RESOURCE.alias("has_source")
# The bounds of the range a date row covers (rows are ordered: these are low
# and high), and that range, as the expression the range index is built on.
# Filters test these expressions, not the columns: the btrees on the columns
# are for walks in sort order, and a generic plan, blind to the instants,
# would otherwise drive a search from "every period ending after $1" (787,000
# rows for one patient's observations since a date).
ROW_START = func.least(DATES.c.low, DATES.c.high)
ROW_END = func.greatest(DATES.c.low, DATES.c.high)
# Closed bounds written into the SQL: the expression is then the range index's
# own even in a generic plan (psycopg prepares a statement it runs often, and
# PostgreSQL may plan it once for any values). A window filter writes its
# instants into the SQL too (`_window_tests`): blind to them, a generic plan
# cannot tell `date=ge2025-06-02` (787,000 rows) from a day, and its default
# estimate for an overlap once made it drive one patient's observations from the
# range index (6.6 s, where the token and reference lookups take 2 ms).
CLOSED: ColumnElement[str] = literal_column("'[]'")
DATE_RANGE = func.tstzrange(ROW_START, ROW_END, CLOSED)
SIDE_TABLES = {"string": STRINGS, "date": DATES, "quantity": QUANTITIES, "uri": URIS}
ScopeCondition = Callable[[FromClause], ColumnElement[bool]]
PatientCondition = Callable[[ColumnElement[str], ColumnElement[int]], ColumnElement[bool]]


@dataclass(frozen=True, slots=True)
class SearchScope:
    """Which resources a caller may find; `condition` adds SQL over a `fhir_resource` alias.

    When `key` is given, the condition's SQL is the same for every scope of that
    key and differs only in the named `parameters`, so page statements are reused.
    """

    condition: ScopeCondition | None = None
    key: Hashable | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # The caller's patients, as SQL over a patient id: a cheaper test of index
    # rows than `condition` is of their resources (see `may_be_visible`).
    patient_condition: PatientCondition | None = None


UNRESTRICTED = SearchScope()


def visible(resource: FromClause, scope: SearchScope) -> list[ColumnElement[bool]]:
    """Return what every query over `fhir_resource` carries: not deleted, and in scope."""
    conditions: list[ColumnElement[bool]] = [resource.c.deleted.is_(False)]
    if scope.condition is not None:
        conditions.append(scope.condition(resource))
    return conditions


def may_be_visible(
    rows: FromClause, resource_type: str, scope: SearchScope
) -> ColumnElement[bool] | None:
    """Return what an index row's resource must pass to be in scope (None: nothing).

    `rows` are index rows of `resource_type`: (resource_type, id, compartment_key,
    n), `n` numbering them from 1 in the order the walk tests them.
    A row carries its resource's first patient (`compartment_key`, NULL for
    none). A resource with exactly that one patient is in scope only if the
    patient is the caller's; one with none or several is left to the full test.
    Tested on a date walk's rows before their resources are read: a unit sees
    about one encounter in eight, and reading the other seven to find that out
    was most of a restricted walk's time.
    """
    if scope.patient_condition is None:
        return None
    key = rows.c.compartment_key
    known: list[ColumnElement[bool]] = [key.is_(None), scope.patient_condition(key, rows.c.n)]
    if not at_most_one_patient(resource_type):
        several = SEVERAL_PATIENTS
        has_several = exists(
            select(literal(1))
            .select_from(several)
            .where(
                several.c.resource_type == rows.c.resource_type,
                several.c.id == rows.c.id,
                # Written into the SQL: a generic plan must see the partial index's own test.
                func.cardinality(several.c.patient_ids) > literal_column("1"),
            )
            .correlate_except(several)
        )
        known.append(has_several)
    return or_(*known)


def _fetched_refs(resource: FromClause) -> ColumnElement[Any]:
    """Select a resource's reference keys as psycopg hands them over: a list of str.

    Typed as an ARRAY, SQLAlchemy walks every list again in Python on the way
    out, for nothing (a tenth of the API's time serving a sorted page of 50).
    """
    return type_coerce(resource.c.refs, NullType()).label("refs")


def _text_array(values: Sequence[str]) -> ColumnElement[Any]:
    return literal(list(values), ARRAY(Text))


def _overlaps(column: ColumnElement[Any], keys: Sequence[str]) -> ColumnElement[bool]:
    return column.bool_op("&&")(_text_array(keys))


def _side(
    table: Table, resource: FromClause, param: str, *conditions: ColumnElement[bool]
) -> ColumnElement[bool]:
    return exists(
        select(literal(1))
        .select_from(table)
        .where(
            table.c.resource_type == resource.c.resource_type,
            table.c.resource_id == resource.c.id,
            table.c.param == param,
            *conditions,
        )
    )


def string_key(table: FromClause) -> ColumnElement[str]:
    """Return a string index table's normalized value in byte order (how it is indexed).

    The index is built on `value_normalized COLLATE "C"`: a prefix LIKE becomes
    a range of it, and it hands out (value, id) in order, which a name search
    walks. Conditions must use the same collation for the index to serve them.
    """
    return table.c.value_normalized.collate("C")


def _starts_with(
    column: ColumnElement[Any], value: str, *, slot: str | None = None
) -> ColumnElement[bool]:
    """Match a string prefix, with the pattern written into the SQL text.

    Searches run as prepared statements, and after a few executions PostgreSQL
    may plan them generically: `LIKE $1` then cannot become the index range that
    a constant prefix gives (`name=el` on 1M resources: 112 ms instead of 15 ms).
    With `slot`, the pattern is the named parameter of a reused page statement
    (`_slot_values` gives it), still written into the text at each execution.
    """
    pattern = bindparam(
        slot,
        None if slot is not None else _like_prefix(value),
        type_=Text(),
        literal_execute=True,
    )
    return column.like(pattern, escape="/")


def _like_prefix(value: str) -> str:
    return value.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True, slots=True)
class _DateSlots:
    """A date comparison of a reused page statement: its prefix, its bounds as parameters."""

    prefix: str
    low: BindParameter[datetime]
    high: BindParameter[datetime]


def _date_condition(
    low: ColumnElement[datetime], high: ColumnElement[datetime], item: DateComparison | _DateSlots
) -> ColumnElement[bool]:
    # R4 search "prefix": the resource's range [low, high] against the value's range.
    sl, sh = item.low, item.high
    contained = and_(low >= sl, high <= sh)
    prefix = item.prefix
    # The extra bounds below are implied by the spec's condition; they are there
    # so that a btree on the bound can narrow a scan.
    if prefix == "eq":
        return and_(contained, low <= sh)
    if prefix == "ne":
        return not_(contained)
    if prefix == "gt":
        return high > sh
    if prefix == "lt":
        return low < sl
    if prefix == "ge":
        return and_(high >= sl, or_(high > sh, contained))
    if prefix == "le":
        return and_(low <= sh, or_(low < sl, contained))
    if prefix == "sa":
        return low > sh
    if prefix == "eb":
        return high < sl
    # ap: the widened value range overlaps the resource's range.
    return and_(low <= sh, high >= sl)


def _number_condition(table: Table, item: NumberComparison) -> ColumnElement[bool]:
    value = table.c.value
    prefix = item.prefix
    if prefix in ("eq", "ap"):
        # The value's precision: 100 matches [99.5, 100.5) (R4 search, number).
        condition: ColumnElement[bool] = and_(value >= item.low, value < item.high)
    elif prefix == "ne":
        condition = or_(value < item.low, value >= item.high)
    elif prefix == "gt":
        condition = value > item.value
    elif prefix == "lt":
        condition = value < item.value
    elif prefix == "ge":
        condition = value >= item.value
    elif prefix == "le":
        condition = value <= item.value
    elif prefix == "sa":
        condition = table.c.low > item.value
    else:
        condition = table.c.high < item.value
    if item.code is not None:
        condition = and_(condition, table.c.code == item.code)
    if item.system is not None:
        condition = and_(condition, table.c.system == item.system)
    return condition


# Widens the box by ~0.1 mm so that a written coordinate finer than a double
# still meets the box its double belongs to; the distance test stays exact.
_BOX_MARGIN = Decimal("1e-9")


def _degrees(value: float, margin: Decimal) -> Decimal:
    # The index holds numerics: bounds of the same type keep it usable (a float
    # bound would make PostgreSQL compare every row as double precision).
    return Decimal(repr(value)) + margin


def _great_circle_km(
    latitude: ColumnElement[Any], longitude: ColumnElement[Any], point: NearPoint
) -> ColumnElement[float]:
    """Return the haversine distance of a row's position from a point (as geo.great_circle_km)."""
    phi = func.radians(sql_cast(latitude, Float))
    half_lat = func.sin((phi - math.radians(point.latitude)) / 2)
    half_lon = func.sin(func.radians(sql_cast(longitude, Float) - point.longitude) / 2)
    chord = half_lat * half_lat + (
        func.cos(phi) * math.cos(math.radians(point.latitude)) * half_lon * half_lon
    )
    return 2 * EARTH_RADIUS_KM * func.asin(func.least(1.0, func.sqrt(chord)))


def _near(resource: FromClause, criterion: NearCriterion) -> ColumnElement[bool]:
    latitude_param, longitude_param = position_params(criterion.param)
    latitude = QUANTITIES.alias("near_latitude")
    other = QUANTITIES.alias("near_other")
    # The longitude of the same resource, by owner. LIMIT keeps PostgreSQL from
    # making it a join, which it planned as a scan of every longitude in the box
    # per latitude in the box (quadratic: 4 s for 2,000 Locations).
    longitude = (
        select(other.c.value)
        .where(
            other.c.resource_type == latitude.c.resource_type,
            other.c.resource_id == latitude.c.resource_id,
            other.c.param == longitude_param,
        )
        .limit(1)
        .lateral("near_longitude")
    )
    circles: list[ColumnElement[bool]] = []
    for point in criterion.points:
        # The bounding box narrows by index; the great circle decides.
        south, north = point.latitude_range()
        box = [
            and_(
                longitude.c.value >= _degrees(west, -_BOX_MARGIN),
                longitude.c.value <= _degrees(east, _BOX_MARGIN),
            )
            for west, east in point.longitude_ranges()
        ]
        distance = _great_circle_km(latitude.c.value, longitude.c.value, point)
        circles.append(
            and_(
                latitude.c.value >= _degrees(south, -_BOX_MARGIN),
                latitude.c.value <= _degrees(north, _BOX_MARGIN),
                or_(*box),
                distance <= point.distance_km,
            )
        )
    return exists(
        select(literal(1))
        .select_from(latitude.join(longitude, true()))
        .where(
            latitude.c.resource_type == resource.c.resource_type,
            latitude.c.resource_id == resource.c.id,
            latitude.c.param == latitude_param,
            or_(*circles),
        )
    )


def _unnested(column: ColumnElement[Any], name: str) -> TableValuedAlias:
    return func.unnest(column).table_valued(name).render_derived()


def _any_key_like(column: ColumnElement[Any], prefix: str) -> ColumnElement[bool]:
    keys = _unnested(column, "key")
    pattern = _like_escape(prefix) + "%"
    return exists(select(literal(1)).select_from(keys).where(keys.c.key.like(pattern)))


def _missing(resource: FromClause, criterion: MissingCriterion) -> ColumnElement[bool]:
    param = criterion.param
    if criterion.kind in SIDE_TABLES:
        present = _side(SIDE_TABLES[criterion.kind], resource, param)
    else:
        column = resource.c.tokens if criterion.kind == "token" else resource.c.refs
        present = _any_key_like(column, f"{param}=")
        if criterion.kind == "reference":
            present = or_(present, _any_key_like(resource.c.tokens, f"{param}:identifier="))
    return not_(present) if criterion.missing else present


def condition_for(
    resource: FromClause, resource_type: str, criterion: Criterion, scope: SearchScope
) -> ColumnElement[bool]:
    """Return the SQL condition of one criterion over a `fhir_resource` alias."""
    if isinstance(criterion, IdCriterion):
        return _keyed_condition(resource, criterion, list(criterion.ids))
    if isinstance(criterion, TokenCriterion | ReferenceCriterion):
        return _keyed_condition(resource, criterion, _text_array(criterion.keys))
    if isinstance(criterion, StringCriterion):
        match: ColumnElement[bool]
        if criterion.mode == "exact":
            match = STRINGS.c.value_exact.in_(list(criterion.values))
        elif criterion.mode == "contains":
            column = STRINGS.c.value_normalized
            match = or_(*(column.contains(v, autoescape=True) for v in criterion.values))
        else:
            match = _prefix_match(STRINGS, criterion)
        return _side(STRINGS, resource, criterion.param, match)
    if isinstance(criterion, DateCriterion):
        if criterion.param is None:
            updated = resource.c.last_updated
            return or_(*(_date_condition(updated, updated, c) for c in criterion.comparisons))
        ranges = or_(*(_date_condition(ROW_START, ROW_END, c) for c in criterion.comparisons))
        return _side(DATES, resource, criterion.param, ranges)
    if isinstance(criterion, NumberCriterion):
        numbers = or_(*(_number_condition(QUANTITIES, c) for c in criterion.comparisons))
        return _side(QUANTITIES, resource, criterion.param, numbers)
    if isinstance(criterion, UriCriterion):
        return _side(URIS, resource, criterion.param, _uri_match(criterion))
    if isinstance(criterion, NearCriterion):
        return _near(resource, criterion)
    if isinstance(criterion, MissingCriterion):
        return _missing(resource, criterion)
    if isinstance(criterion, ChainCriterion):
        return _overlaps_select(resource.c.refs, _chain_keys(criterion, scope))
    if isinstance(criterion, HasCriterion):
        return _has(resource, resource_type, criterion, scope)
    if isinstance(criterion, AnyOfCriterion):
        return or_(*(condition_for(resource, resource_type, c, scope) for c in criterion.options))
    if isinstance(criterion, AllOfCriterion):
        return and_(*(condition_for(resource, resource_type, c, scope) for c in criterion.parts))
    raise TypeError(f"no SQL for {type(criterion).__name__}")


KeyedCriterion = IdCriterion | TokenCriterion | ReferenceCriterion


def _prefix_match(
    table: FromClause, criterion: StringCriterion, *, slotted: bool = False
) -> ColumnElement[bool]:
    key = string_key(table)
    return or_(
        *(
            _starts_with(key, value, slot=_prefix_slot(n) if slotted else None)
            for n, value in enumerate(criterion.values)
        )
    )


def _in_text(value: str) -> ColumnElement[str]:
    """Return a value written into the SQL text at each execution, as a name walk's prefix is.

    The statement's text is then one per prefix anyway, and a generic plan
    sees the type and parameter as a custom plan does: blind to them, it
    estimated a common prefix at 48 names (1,729) and compared every page
    entry against all of them (9 ms, against 2.5 for a probe per entry).
    """
    return literal(value, type_=Text(), literal_execute=True)


def _prefix_slot(number: int) -> str:
    return f"prefix_{number}"


# From this many keys on, an overlap's keys reach PostgreSQL as an InitPlan's
# value, which it plans without seeing. Seeing them, it adds up each key's share
# of rows until it expects most rows to match, then walks the table in page
# order testing every row against every key: 1,000 identifiers took 2.4 s that
# way, against 2 ms through the GIN index. A generic plan is blind to them too.
OPAQUE_KEYS = 17


def many_keys(criterion: Criterion) -> bool:
    """Tell whether a token or reference criterion's keys are planned without being seen."""
    return isinstance(criterion, TokenCriterion | ReferenceCriterion) and (
        len(criterion.keys) >= OPAQUE_KEYS
    )


def _keyed_condition(
    resource: FromClause, criterion: KeyedCriterion, values: ColumnElement[Any] | list[str]
) -> ColumnElement[bool]:
    """Match ids or index keys given as one value: a literal list, or a template's slot."""
    if isinstance(criterion, IdCriterion):
        matched = resource.c.id.in_(values)
        return not_(matched) if criterion.negate else matched
    keys = values
    if many_keys(criterion) and not isinstance(values, list):
        keys = select(values).scalar_subquery()
    if isinstance(criterion, TokenCriterion):
        overlap = resource.c.tokens.bool_op("&&")(keys)
        return not_(overlap) if criterion.negate else overlap
    return resource.c.refs.bool_op("&&")(keys)


def _uri_match(criterion: UriCriterion) -> ColumnElement[bool]:
    column = URIS.c.uri
    if criterion.mode == "below":
        return or_(*(_starts_with(column, v) for v in criterion.values))
    if criterion.mode == "above":
        # Every stored uri the value lies below: its prefixes at path boundaries.
        prefixes: list[str] = []
        for value in criterion.values:
            parts = value.rstrip("/").split("/")
            prefixes.extend("/".join(parts[:n]) for n in range(len(parts), 2, -1))
        return column.in_(prefixes)
    return column.in_(list(criterion.values))


def _overlaps_select(
    column: ColumnElement[Any], keys: Select[Any] | CompoundSelect[Any]
) -> ColumnElement[bool]:
    # ARRAY(subquery) is uncorrelated: PostgreSQL runs it once and probes the GIN index.
    return column.bool_op("&&")(func.array(keys.scalar_subquery()))


def _chain_keys(criterion: ChainCriterion, scope: SearchScope) -> Select[Any] | CompoundSelect[Any]:
    target = CHAINED
    per_type = [
        and_(
            target.c.resource_type == target_type, condition_for(target, target_type, inner, scope)
        )
        for target_type, inner in criterion.targets
    ]
    local = target.c.resource_type + "/" + target.c.id
    key = literal(f"{criterion.param}=") + local
    keys = select(key).where(or_(*per_type), *visible(target, scope))
    if not criterion.base_url:
        return keys
    absolute = literal(f"{criterion.param}={criterion.base_url}/") + local
    return keys.union_all(select(absolute).where(or_(*per_type), *visible(target, scope)))


def _has(
    resource: FromClause, resource_type: str, criterion: HasCriterion, scope: SearchScope
) -> ColumnElement[bool]:
    source = HAS_SOURCE
    refs = _unnested(source.c.refs, "ref")
    ref: ColumnElement[Any] = refs.c.ref
    if criterion.base_url:
        # A reference written as this server's absolute URL points here too.
        ref = func.replace(ref, f"={criterion.base_url}/", "=")
    prefix = f"{criterion.reference_param}={resource_type}/"
    pointed = (
        select(func.substr(ref, len(prefix) + 1))
        .select_from(source)
        .join(refs, true())
        .where(
            source.c.resource_type == criterion.source_type,
            *visible(source, scope),
            condition_for(source, criterion.source_type, criterion.inner, scope),
            ref.like(_like_escape(prefix) + "%"),
        )
    )
    return and_(resource.c.resource_type == resource_type, resource.c.id.in_(pointed))


# --- matching, sorting and paging -----------------------------------------------------


def match_condition(
    resource: FromClause,
    criteria: dict[str, list[Criterion]],
    scope: SearchScope,
    *,
    slotted: bool = False,
    walked: str | None = None,
) -> ColumnElement[bool]:
    """Return the condition of a (possibly multi-type) search, scope included.

    `slotted` leaves the values of keyed criteria as named parameters (`_slot_values`);
    the window of date param `walked` is tested by a date walk instead.
    """
    per_type = [
        and_(
            resource.c.resource_type == t,
            *_type_conditions(
                resource, t, found, scope, slots=n if slotted else None, walked=walked
            ),
        )
        for n, (t, found) in enumerate(criteria.items())
    ]
    type_condition = per_type[0] if len(per_type) == 1 else or_(*per_type)
    return and_(type_condition, *visible(resource, scope))


def _slot_name(type_number: int, criterion_number: int) -> str:
    return f"keys_{type_number}_{criterion_number}"


def _date_slot(type_number: int, window: int, part: str) -> str:
    return f"date_{type_number}_{window}_{part}"


def _windowed(criterion: Criterion) -> bool:
    """Tell whether a criterion is a single date comparison, tested within its param's window."""
    return (
        isinstance(criterion, DateCriterion)
        and criterion.param is not None
        and len(criterion.comparisons) == 1
    )


def _windows(criteria: Sequence[Criterion]) -> dict[str, list[DateComparison]]:
    """Group the single date comparisons of one type's criteria by param, in order."""
    windows: dict[str, list[DateComparison]] = {}
    for criterion in criteria:
        if _windowed(criterion):
            assert isinstance(criterion, DateCriterion) and criterion.param is not None  # noqa: S101
            windows.setdefault(criterion.param, []).append(criterion.comparisons[0])
    return windows


def _type_conditions(
    resource: FromClause,
    resource_type: str,
    criteria: Sequence[Criterion],
    scope: SearchScope,
    *,
    slots: int | None = None,
    walked: str | None = None,
) -> list[ColumnElement[bool]]:
    """Return one type's conditions; the window of date param `walked` is left to its walk."""
    # Single-valued date criteria on one param (`date=ge..&date=lt..`) are tested
    # against the same date row: one range scan instead of two unselective half-open
    # ones. It differs from separate tests only for a resource with several values.
    conditions: list[ColumnElement[bool]] = []
    for number, criterion in enumerate(criteria):
        if slots is not None and isinstance(criterion, KeyedCriterion):
            name = _slot_name(slots, number)
            slot: BindParameter[Any] = (
                bindparam(name, expanding=True)
                if isinstance(criterion, IdCriterion)
                else bindparam(name, type_=ARRAY(Text))
            )
            conditions.append(_keyed_condition(resource, criterion, slot))
        elif not _windowed(criterion):
            conditions.append(condition_for(resource, resource_type, criterion, scope))
    for window, (param, comparisons) in enumerate(_windows(criteria).items()):
        if param == walked:
            continue
        tests, floor, ceiling = _window_tests(
            ROW_START,
            ROW_END,
            comparisons,
            slots=None if slots is None else (slots, window),
            written=True,
        )
        hint = _window_hint(DATE_RANGE, floor, ceiling)
        conditions.append(_side(DATES, resource, param, *tests, *hint))
    return conditions


def _window_tests(
    low: ColumnElement[datetime],
    high: ColumnElement[datetime],
    comparisons: Sequence[DateComparison],
    *,
    slots: tuple[int, int] | None,
    written: bool = False,
) -> tuple[list[ColumnElement[bool]], Any, Any]:
    """Return a date window's tests of one row, and the bounds of a range every match overlaps.

    With `slots` (type number, window number), for a reused statement, the
    instants are named parameters (`_slot_values`); which tests and bounds exist
    depends on the prefixes, part of its shape. `written` puts the instants into
    the SQL text at each execution: PostgreSQL then always plans with them.
    """
    floor: Any
    ceiling: Any
    floor, ceiling = _window_bounds(comparisons)
    if slots is None:
        return [_date_condition(low, high, c) for c in comparisons], floor, ceiling
    instant = DateTime(timezone=True)
    type_number, window = slots
    tests = [
        _date_condition(
            low,
            high,
            _DateSlots(
                c.prefix,
                bindparam(
                    _date_slot(type_number, window, f"{n}_low"),
                    type_=instant,
                    literal_execute=written,
                ),
                bindparam(
                    _date_slot(type_number, window, f"{n}_high"),
                    type_=instant,
                    literal_execute=written,
                ),
            ),
        )
        for n, c in enumerate(comparisons)
    ]
    if floor is not None:
        floor = bindparam(
            _date_slot(type_number, window, "floor"), type_=instant, literal_execute=written
        )
    if ceiling is not None:
        ceiling = bindparam(
            _date_slot(type_number, window, "ceiling"), type_=instant, literal_execute=written
        )
    return tests, floor, ceiling


def _window_bounds(
    comparisons: Sequence[DateComparison],
) -> tuple[datetime | None, datetime | None]:
    """Return the bounds of a range every matching date row overlaps (for the range index).

    Bounds from what `high` must reach and what `low` must not pass. When the first
    is later (`date=ge2031-05&date=le2031-04`: a period spanning April), a match
    contains the range between them, so it overlaps it too; tstzrange wants them
    in order.
    """
    floor: datetime | None = None
    ceiling: datetime | None = None
    for item in comparisons:
        if item.prefix in ("eq", "ge", "ap"):
            floor = item.low if floor is None else max(floor, item.low)
        elif item.prefix in ("gt", "sa"):
            floor = item.high if floor is None else max(floor, item.high)
        if item.prefix in ("eq", "le", "ap"):
            ceiling = item.high if ceiling is None else min(ceiling, item.high)
        elif item.prefix in ("lt", "eb"):
            ceiling = item.low if ceiling is None else min(ceiling, item.low)
    if floor is not None and ceiling is not None and floor > ceiling:
        return ceiling, floor
    return floor, ceiling


def _window_hint(
    row_range: ColumnElement[Any], floor: Any, ceiling: Any
) -> list[ColumnElement[bool]]:
    """Return the range-overlap test the bounds imply (for the range index), if any."""
    if floor is None and ceiling is None:
        return []
    window = func.tstzrange(floor, ceiling, CLOSED)
    return [row_range.bool_op("&&")(window)]


def sort_expression(resource: FromClause, key: SortKey) -> ColumnElement[Any]:
    """Return the value a row sorts by for one `_sort` key (NULL when it has none)."""
    if key.code == "_id":
        return resource.c.id
    if key.code == "_lastUpdated":
        return resource.c.last_updated
    aggregate = func.max if key.descending else func.min
    if key.type in ("string", "date", "number", "quantity", "uri"):
        table = SIDE_TABLES["quantity" if key.type == "number" else key.type]
        column = {
            "string": STRINGS.c.value_normalized,
            "date": DATES.c.high if key.descending else DATES.c.low,
            "quantity": QUANTITIES.c.value,
            "number": QUANTITIES.c.value,
            "uri": URIS.c.uri,
        }[key.type]
        return (
            select(aggregate(column))
            .where(
                table.c.resource_type == resource.c.resource_type,
                table.c.resource_id == resource.c.id,
                table.c.param == key.code,
            )
            .scalar_subquery()
        )
    # Tokens and references sort by their first key of the parameter (code order).
    array = resource.c.refs if key.type == "reference" else resource.c.tokens
    keys = _unnested(array, "key")
    return (
        select(aggregate(keys.c.key))
        .select_from(keys)
        .where(keys.c.key.like(_like_escape(f"{key.code}=") + "%"))
        .scalar_subquery()
    )


SortValue = str | datetime | Decimal | None
# Sort keys whose value every resource has (NOT NULL columns of fhir_resource).
NEVER_NULL_SORTS = frozenset({"_lastUpdated", "_id"})


def sort_value_kind(key: SortKey) -> str:
    """Return how a sort key's cursor value is typed: text, instant or decimal."""
    if key.code == "_lastUpdated" or key.type == "date":
        return "instant"
    if key.type in ("number", "quantity"):
        return "decimal"
    return "text"


def _after(
    columns: Sequence[tuple[ColumnElement[Any], bool]],
    values: Sequence[Any],
    never_null: Sequence[bool] | None = None,
    *,
    nulls_first: bool = False,
) -> ColumnElement[bool]:
    """Rows strictly after `values` in the order of `columns`.

    A search's order puts resources without a sort value last; walking it
    backwards (`nulls_first`), they come first.
    """
    alternatives: list[ColumnElement[bool]] = []
    equal_so_far: list[ColumnElement[bool]] = []
    flags = never_null or [False] * len(columns)
    for (column, descending), value, not_null in zip(columns, values, flags, strict=True):
        if value is None:
            # NULLs compare equal; every value follows them when they come first.
            if nulls_first:
                alternatives.append(and_(*equal_so_far, column.is_not(None)))
            equal_so_far.append(column.is_(None))
            continue
        later = column < value if descending else column > value
        if not (not_null or nulls_first):
            later = or_(later, column.is_(None))
        alternatives.append(and_(*equal_so_far, later))
        equal_so_far.append(column == value)
    return or_(false(), *alternatives)


def _in_order(
    column: ColumnElement[Any], descending: bool, never_null: bool, *, nulls_first: bool = False
) -> Any:
    """Order by `column`, NULLs last (first walking back); never-NULL columns need no clause.

    An index hands out a descending order with its NULLs first: `DESC NULLS LAST`
    keeps the planner from reading `_sort=-_lastUpdated` off the (type,
    last_updated) index, and it sorted a whole type instead (1.5 s on 133,000
    encounters, 0.5 ms from the index).
    """
    ordered = column.desc() if descending else column.asc()
    if never_null:
        return ordered
    return ordered.nulls_first() if nulls_first else ordered.nulls_last()


def page_statement(
    *,
    criteria: dict[str, list[Criterion]],
    sort: Sequence[SortKey],
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    scope: SearchScope,
    slotted: bool = False,
    walk_dates: bool = False,
) -> Select[Any]:
    """Build the page query: (sort values..., type, id, json text, refs) after a keyset position.

    Ties break on (resource_type, id), so the order is total and pages never
    overlap or skip rows while others insert; `backwards` walks the order in reverse.
    `slotted` leaves keyed criteria and an unsorted cursor as named parameters.
    """
    resource = MATCHED
    driver = string_driver(criteria, sort)
    if driver is not None:
        # The driver's criterion is met by the walk; repeating it as an EXISTS would
        # let the planner go back to fetching every match.
        criteria = {t: [c for c in found if c is not driver] for t, found in criteria.items()}
    directions = [key.descending != backwards for key in sort]
    walked = date_walk(criteria, sort) if walk_dates else None
    if walked is not None:
        page = _date_walk_page(
            resource, criteria, sort[0], walked, scope, after, backwards, limit, slotted=slotted
        )
        return _page_with_resources(page, directions, backwards)
    condition = match_condition(resource, criteria, scope, slotted=slotted)
    if sort:
        labels = [sort_expression(resource, key).label(f"s{n}") for n, key in enumerate(sort)]
        matched = (
            select(*labels, resource.c.resource_type, resource.c.id)
            .where(condition)
            .subquery("matched")
        )
        keyed = _keyed(matched, directions, backwards)
        # The type and id columns, and the sort values of `_lastUpdated` and `_id`.
        never_null = [key.code in NEVER_NULL_SORTS for key in sort] + [True, True]
        walk = select(matched)
        if after is not None:
            walk = walk.where(_after(keyed, after, never_null, nulls_first=backwards))
        ordering = [
            _in_order(c, d, not_null, nulls_first=backwards)
            for (c, d), not_null in zip(keyed, never_null, strict=True)
        ]
        page = walk.order_by(*ordering).limit(limit).subquery("page")
    elif driver is not None:
        (resource_type,) = criteria
        page = _string_walk(
            resource_type, condition, driver, after, backwards, limit, slotted=slotted
        )
        directions = [backwards]
    else:
        # No sort keys: filter and order on the base table so the primary key serves the walk.
        position = tuple_(resource.c.resource_type, resource.c.id)
        order: list[ColumnElement[Any]] = [resource.c.resource_type, resource.c.id]
        base = select(resource.c.resource_type, resource.c.id).where(condition)
        if after is not None:
            boundary = tuple_(
                *(
                    bindparam(f"after_{n}", type_=String()) if slotted else literal(value)
                    for n, value in enumerate(after)
                )
            )
            base = base.where(position < boundary if backwards else position > boundary)
        base = base.order_by(*(c.desc() if backwards else c.asc() for c in order))
        page = base.limit(limit).subquery("page")
    return _page_with_resources(page, directions, backwards)


def _page_with_resources(
    page: Subquery, directions: Sequence[bool], backwards: bool, *, flagged: bool = False
) -> Select[Any]:
    """Join a page of (sort values..., type, id) to the stored resources, in page order.

    A flagged page's `beyond` column comes last, and its rows so marked stay
    whether or not their resource is stored.
    """
    stored = STORED
    final_order = _keyed(page, directions, backwards)
    on = and_(stored.c.resource_type == page.c.resource_type, stored.c.id == page.c.id)
    statement = (
        select(
            *(page.c[f"s{n}"] for n in range(len(directions))),
            page.c.resource_type,
            page.c.id,
            sql_cast(stored.c.resource, Text),
            _fetched_refs(stored),
        )
        .join_from(page, stored, on, isouter=flagged)
        .order_by(
            *(_in_order(c, d, never_null=False, nulls_first=backwards) for c, d in final_order)
        )
    )
    if flagged:
        statement = statement.add_columns(page.c.beyond).where(
            or_(page.c.beyond, stored.c.id.is_not(None))
        )
    return statement


def date_walk(
    criteria: dict[str, list[Criterion]], sort: Sequence[SortKey]
) -> tuple[str, list[DateComparison]] | None:
    """Return (type, window) when a search sorted by a date filters on that same date.

    Such a page can walk the date's rows in sort order and stop after a page of
    visible matches, where the planner fetches every row of the window (2,323
    encounters in a week) to check and sort them. Only for a parameter with at
    most one value per resource: its one row's bound then is the sort value.
    """
    if len(sort) != 1 or sort[0].type != "date" or len(criteria) != 1:
        return None
    ((resource_type, found),) = criteria.items()
    window = _windows(found).get(sort[0].code)
    if not window or not single_valued(resource_type, sort[0].code):
        return None
    return resource_type, window


def walks_dates(
    session: Session, criteria: dict[str, list[Criterion]], sort: Sequence[SortKey]
) -> bool:
    """Tell whether a page of this search is best found by walking its sort date.

    Unless its keyed criteria (token, reference, _id) are narrow: a patient's
    few encounters are fetched and sorted faster than the week is walked.
    """
    if date_walk(criteria, sort) is None:
        return False
    ((resource_type, found),) = criteria.items()
    keyed: list[Criterion] = [c for c in found if isinstance(c, KeyedCriterion)]
    return _keyed_criteria_are_broad(session, resource_type, keyed)


def _keyed_criteria_are_broad(
    session: Session, resource_type: str, keyed: Sequence[Criterion]
) -> bool:
    """Tell whether keyed criteria match enough resources for a date walk to win."""
    if not keyed:
        return True
    decision_key = (resource_type, *keyed)
    now = time.monotonic()
    known = _walk_decisions.get(decision_key)
    if known is not None and now - known[1] < DATE_WALK_DECISION_SECONDS:
        return known[0]
    expected = estimate_matches(session, criteria={resource_type: list(keyed)}, scope=UNRESTRICTED)
    walk = expected >= DATE_WALK_MIN_KEYED_MATCHES
    if len(_walk_decisions) >= MAX_TEMPLATES:
        _walk_decisions.clear()
    _walk_decisions[decision_key] = (walk, now)
    return walk


def _date_walk_page(
    resource: FromClause,
    criteria: dict[str, list[Criterion]],
    key: SortKey,
    walked: tuple[str, list[DateComparison]],
    scope: SearchScope,
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    *,
    slotted: bool = False,
) -> Subquery:
    """Return a page of (s0, type, id): the window's date rows in sort order, checked lazily.

    `-date` sorts by a period's end (`high`), `date` by its start (`low`); the
    parameter is single-valued, so each resource has one row. The rows come in
    two parts that never interleave: those across the window's edge on the sort
    side (a period ending after its end, for `-date`), few, from the range index
    and sorted; then those within, read from a btree in sort order, so that a
    long window is read a page's worth at a time (the planner may still sort a
    week's few thousand rows whole: cheaper). Each row is checked against the
    other criteria and the caller's scope in a lateral subquery the planner
    cannot fold into a join, so the walk stops after a page. `OFFSET 0` keeps
    each part and that subquery apart: pushed into a part, the window's tests
    would tempt the planner into fetching and sorting the window.
    """
    resource_type, window = walked
    descending = key.descending != backwards
    ((_, found),) = criteria.items()
    # Numbered as `_slot_values` numbers the windows of the search's one type.
    window_number = list(_windows(found)).index(key.code)
    slots = (0, window_number) if slotted else None
    _, floor, ceiling = _window_tests(DATES.c.low, DATES.c.high, window, slots=slots)
    # Every match overlaps [floor, ceiling]; the edge is the bound on the sort side.
    edge, far = (ceiling, floor) if key.descending else (floor, ceiling)
    position = None if after is None else after[0]

    def part(dates: FromClause, *conditions: ColumnElement[bool]) -> Select[Any]:
        """Select one part's rows in walk order, `dates` a date table or subquery of one."""
        value = dates.c.high if key.descending else dates.c.low
        bounds: list[ColumnElement[bool]] = []
        if position is not None:
            # Implied by the cursor, and a range of the btree (the exact test is below).
            bounds.append(value <= position if descending else value >= position)
        return (
            select(
                value.label("s0"),
                dates.c.low,
                dates.c.high,
                dates.c.resource_type,
                dates.c.resource_id.label("id"),
                dates.c.compartment_key,
            )
            .where(*conditions, *bounds)
            .order_by(
                value.desc() if descending else value.asc(),
                dates.c.resource_type.desc() if backwards else dates.c.resource_type.asc(),
                dates.c.resource_id.desc() if backwards else dates.c.resource_id.asc(),
            )
            .offset(0)
        )

    inner_value = INNER_DATE.c.high if key.descending else INNER_DATE.c.low
    inner = [INNER_DATE.c.resource_type == resource_type, INNER_DATE.c.param == key.code]
    if far is not None:
        inner.append(inner_value >= far if key.descending else inner_value <= far)
    if edge is None:
        rows: Subquery = part(INNER_DATE, *inner).subquery("rows")
    else:
        inner.append(inner_value < edge if key.descending else inner_value >= edge)
        edge_range = func.tstzrange(
            func.least(EDGE_DATE.c.low, EDGE_DATE.c.high),
            func.greatest(EDGE_DATE.c.low, EDGE_DATE.c.high),
            CLOSED,
        )
        # Only the range test inside, so that even a generic plan, blind to the
        # instants, takes the range index: `high >= edge` on the btree would read
        # every later period.
        across_edge = (
            select(EDGE_DATE)
            .where(
                EDGE_DATE.c.resource_type == resource_type,
                EDGE_DATE.c.param == key.code,
                edge_range.bool_op("&&")(func.tstzrange(edge, edge, CLOSED)),
            )
            .offset(0)
            .subquery("across_edge")
        )
        edge_value = across_edge.c.high if key.descending else across_edge.c.low
        across = part(across_edge, edge_value >= edge if key.descending else edge_value < edge)
        rows = union_all(across, part(INNER_DATE, *inner)).subquery("rows")
    tests, _, _ = _window_tests(rows.c.low, rows.c.high, window, slots=slots)
    keyed = [
        (rows.c.s0, descending),
        (rows.c.resource_type, backwards),
        (rows.c.id, backwards),
    ]
    conditions = [*tests]
    if after is not None:
        conditions.append(_after(keyed, after))
    walk_order = _in_walk_order(rows, descending, backwards)
    columns: list[ColumnElement[Any]] = [rows.c.s0, rows.c.resource_type, rows.c.id]
    if scope.patient_condition is not None:
        # Numbered for the caller's patient test (`may_be_visible`); over the
        # walk's own order, the numbering streams with it.
        number = func.row_number().over(order_by=walk_order)
        columns += [rows.c.compartment_key, number.label("n")]
    ordered = select(*columns).where(*conditions).order_by(*walk_order).subquery("ordered")
    check = (
        select(literal(1).label("ok"))
        .select_from(resource)
        .where(
            *_walk_row_checks(ordered, resource_type, scope),
            match_condition(resource, criteria, scope, slotted=slotted, walked=key.code),
        )
        .offset(0)
        .lateral("checked")
    )
    walk = (
        select(ordered.c.s0, ordered.c.resource_type, ordered.c.id)
        .select_from(ordered.join(check, true()))
        .order_by(*_in_walk_order(ordered, descending, backwards))
        .limit(limit)
    )
    return walk.subquery("page")


def _walk_row_checks(
    rows: FromClause, resource_type: str, scope: SearchScope
) -> list[ColumnElement[bool]]:
    """Return how a walk's check finds a row's resource, after testing the row itself.

    The row's own test names no column of the resource: PostgreSQL runs it
    before reading the resource, and skips that read when it fails.
    """
    checks = [MATCHED.c.resource_type == rows.c.resource_type, MATCHED.c.id == rows.c.id]
    row_test = may_be_visible(rows, resource_type, scope)
    return checks if row_test is None else [row_test, *checks]


def sort_walk(criteria: dict[str, list[Criterion]], sort: Sequence[SortKey]) -> str | None:
    """Return the type when a search sorted by a date, with no window on it, can walk it.

    Such a search (`Encounter?_sort=-date`, a code's observations by date) has
    no window to walk: it walks the whole date index in sort order, checking
    each row lazily, and then the resources without that date, which sort
    last. Only for keyed criteria (or none), whose breadth the planner can
    estimate: a rare name would leave the walk reading every date.
    """
    if len(sort) != 1 or sort[0].type != "date" or len(criteria) != 1:
        return None
    ((resource_type, found),) = criteria.items()
    if not single_valued(resource_type, sort[0].code) or sort[0].code in _windows(found):
        return None
    if not all(isinstance(criterion, KeyedCriterion) for criterion in found):
        return None
    return resource_type


def walks_sort_dates(
    session: Session, criteria: dict[str, list[Criterion]], sort: Sequence[SortKey]
) -> bool:
    """Tell whether a page of this search is best found by walking its sort date unbounded."""
    resource_type = sort_walk(criteria, sort)
    if resource_type is None:
        return False
    return _keyed_criteria_are_broad(session, resource_type, criteria[resource_type])


def _in_walk_order(page: FromClause, descending: bool, backwards: bool) -> list[Any]:
    """Order a walk's rows by its date, then id: the scans' own order.

    Not by the type, which a walk fixes: asked for it too, PostgreSQL does not
    see the scans' order and sorts every row read before handing out a page.
    """
    return [
        page.c.s0.desc() if descending else page.c.s0.asc(),
        page.c.id.desc() if backwards else page.c.id.asc(),
    ]


def _sort_walk_rows(
    resource_type: str, key: SortKey, after: Sequence[Any] | None, backwards: bool
) -> tuple[Select[Any], list[tuple[ColumnElement[Any], bool]]]:
    """Select the sort date's rows after a dated position, in walk order, and that order."""
    dates = INNER_DATE
    descending = key.descending != backwards
    # The btrees hold (high DESC, id) and (low, id): each order, or its reverse.
    value = dates.c.high if key.descending else dates.c.low
    keyed: list[tuple[ColumnElement[Any], bool]] = [
        (value, descending),
        (dates.c.resource_type, backwards),
        (dates.c.resource_id, backwards),
    ]
    conditions = [dates.c.resource_type == resource_type, dates.c.param == key.code]
    if after is not None:
        position = after[0]
        conditions.append(value <= position if descending else value >= position)
        conditions.append(_after(keyed, after, [True, True, True]))
    rows = (
        select(
            value.label("s0"),
            dates.c.resource_type,
            dates.c.resource_id.label("id"),
            dates.c.compartment_key,
        )
        .where(*conditions)
        .order_by(*(c.desc() if d else c.asc() for c, d in keyed))
    )
    return rows, keyed


def _sort_walk_page(
    criteria: dict[str, list[Criterion]],
    key: SortKey,
    scope: SearchScope,
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    budget: int,
    listed: Sequence[tuple[str, str]] = (),
    *,
    slotted: bool = False,
) -> Subquery:
    """Return a page of (s0, type, id, beyond) from the first `budget` date rows after `after`.

    The row after the budget comes too, flagged `beyond`, when the page is not
    full without it: it tells, in the same statement (the same snapshot), that
    the budget ran out before the dated rows did. `listed` are resources the
    page already holds, left out here so that the page still fills.
    """
    resource = MATCHED
    (resource_type,) = criteria
    rows_select, keyed = _sort_walk_rows(resource_type, key, after, backwards)
    # row_number over the index's own order streams: the scan still stops at a full page.
    number = func.row_number().over(order_by=[c.desc() if d else c.asc() for c, d in keyed])
    rows = rows_select.add_columns(number.label("n")).limit(budget + 1).subquery("rows")
    beyond = rows.c.n > budget
    checks = [
        *_walk_row_checks(rows, resource_type, scope),
        match_condition(resource, criteria, scope, slotted=slotted),
    ]
    if listed:
        position = tuple_(resource.c.resource_type, resource.c.id)
        checks.append(position.not_in([tuple_(literal(t), literal(i)) for t, i in listed]))
    check = (
        select(literal(1).label("ok"))
        .select_from(resource)
        .where(*checks)
        .offset(0)
        .lateral("checked")
    )
    descending = key.descending != backwards
    return (
        select(rows.c.s0, rows.c.resource_type, rows.c.id, beyond.label("beyond"))
        .select_from(rows.outerjoin(check, true()))
        .where(or_(beyond, check.c.ok.is_not(None)))
        .order_by(*_in_walk_order(rows, descending, backwards))
        .limit(limit)
        .subquery("page")
    )


def _undated_page(
    criteria: dict[str, list[Criterion]],
    key: SortKey,
    scope: SearchScope,
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    walked: Sequence[tuple[str, str]] = (),
) -> Subquery:
    """Return a page of (NULL, type, id): matches without the sort date, in (type, id) order.

    `walked` are the page's resources the dated walk found, left out here: one
    that lost its date since that walk's statement is not listed twice.
    """
    resource = MATCHED
    dated = exists(
        select(literal(1))
        .select_from(DATES)
        .where(
            DATES.c.resource_type == resource.c.resource_type,
            DATES.c.resource_id == resource.c.id,
            DATES.c.param == key.code,
        )
    )
    position = tuple_(resource.c.resource_type, resource.c.id)
    page = select(
        sql_cast(null(), DateTime(timezone=True)).label("s0"),
        resource.c.resource_type,
        resource.c.id,
    ).where(match_condition(resource, criteria, scope), not_(dated))
    if walked:
        page = page.where(position.not_in([tuple_(literal(t), literal(i)) for t, i in walked]))
    if after is not None:
        boundary = tuple_(literal(after[-2]), literal(after[-1]))
        page = page.where(position < boundary if backwards else position > boundary)
    order = (resource.c.resource_type, resource.c.id)
    page = page.order_by(*(c.desc() if backwards else c.asc() for c in order))
    return page.limit(limit).subquery("page")


PageRow = tuple[list[Any], str, str, str, list[str]]


def _page_rows(
    session: Session,
    statement: Select[Any],
    values: Mapping[str, Any] | None = None,
    *,
    flagged: bool = False,
) -> list[tuple[PageRow, bool]]:
    """Run a page query of one sort key: its rows with their resources, and each row's flag.

    A flagged page carries a `beyond` column: its rows so marked are kept even
    without a stored resource, for what they tell rather than what they hold.
    """
    return [
        (
            ([row[0]], str(row[1]), str(row[2]), str(row[3]), list(row[4] or ())),
            bool(flagged and row[5]),
        )
        for row in session.execute(statement, values)
    ]


def _sort_walk_statement(
    criteria: dict[str, list[Criterion]],
    key: SortKey,
    scope: SearchScope,
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    budget: int,
    listed: Sequence[tuple[str, str]],
) -> tuple[Select[Any], Mapping[str, Any] | None]:
    """Return a sort walk's statement and its values: a reused one for a walk from the start.

    Built per search, the walk's statement cost more of the API's time than
    PostgreSQL took to run it.
    """
    directions = [key.descending != backwards]
    shape = None
    if after is None and not listed:
        shape = _page_shape(criteria, [key], None, backwards, limit, scope, walk_dates=False)
    if shape is None:
        page = _sort_walk_page(criteria, key, scope, after, backwards, limit, budget, listed)
        return _page_with_resources(page, directions, backwards, flagged=True), None
    template_key = ("sort walk", shape, budget)
    template = _TEMPLATES.get(template_key)
    if template is None:
        page = _sort_walk_page(criteria, key, scope, None, backwards, limit, budget, slotted=True)
        template = _page_with_resources(page, directions, backwards, flagged=True)
        if len(_TEMPLATES) >= MAX_TEMPLATES:
            _TEMPLATES.clear()
        _TEMPLATES[template_key] = template
    return template, {**scope.parameters, **_slot_values(criteria, [key], None)}


def first_page_statement(
    *,
    criteria: dict[str, list[Criterion]],
    sort: Sequence[SortKey],
    limit: int,
    scope: SearchScope,
    walk_dates: bool,
    walk_sort_dates: bool,
) -> Select[Any]:
    """Return the statement of a search's first page as `list_page` first runs it (for EXPLAIN)."""
    if walk_sort_dates:
        page = _sort_walk_page(criteria, sort[0], scope, None, False, limit, _walk_budget(limit))
        return _page_with_resources(page, [sort[0].descending], False, flagged=True)
    return page_statement(
        criteria=criteria,
        sort=sort,
        after=None,
        backwards=False,
        limit=limit,
        scope=scope,
        walk_dates=walk_dates,
    )


def first_page_template(
    *,
    criteria: dict[str, list[Criterion]],
    sort: Sequence[SortKey],
    limit: int,
    scope: SearchScope,
    walk_dates: bool,
    walk_sort_dates: bool = False,
) -> tuple[Select[Any], dict[str, Any]] | None:
    """Return the reused statement of a first page and its values, or None (for EXPLAIN).

    Reused statements are the ones psycopg prepares and PostgreSQL may come to
    plan generically, blind to the values.
    """
    if walk_sort_dates:
        budget = _walk_budget(limit)
        walk = _sort_walk_statement(criteria, sort[0], scope, None, False, limit, budget, ())
        statement, values = walk
        return None if values is None else (statement, dict(values))
    shape = _page_shape(criteria, sort, None, False, limit, scope, walk_dates)
    if shape is None:
        return None
    template = _page_template(shape, criteria, sort, None, False, limit, scope, walk_dates)
    return template, {**scope.parameters, **_slot_values(criteria, sort, None)}


def _walk_budget(limit: int) -> int:
    """Return how many date rows a date sort's walk reads for a page of `limit`."""
    return min(max(limit * SORT_WALK_ROWS_PER_MATCH, SORT_WALK_MIN_ROWS), SORT_WALK_MAX_ROWS)


def _sort_walk_key(
    criteria: dict[str, list[Criterion]], sort: Sequence[SortKey], scope: SearchScope
) -> Hashable | None:
    """Return the key of a sorted search and its caller's scope (None: a scope without a key)."""
    if scope.condition is not None and scope.key is None:
        return None
    ((resource_type, found),) = criteria.items()
    parameters = orjson.dumps(dict(scope.parameters), option=orjson.OPT_SORT_KEYS)
    return (resource_type, tuple(found), tuple(sort), scope.key, parameters)


def _walk_sort_dates(
    session: Session,
    *,
    criteria: dict[str, list[Criterion]],
    key: SortKey,
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    scope: SearchScope,
) -> list[PageRow] | None:
    """Return a page by walking the sort date, or None when the walk's budget ran out.

    Forward, the order is every dated match, then every undated one (NULLs
    last, by type and id); backwards, the reverse.
    """
    directions = [key.descending != backwards]
    budget = _walk_budget(limit)
    in_undated = after is not None and after[0] is None
    found: list[PageRow] = []

    def walk(position: Sequence[Any] | None, size: int) -> list[PageRow] | None:
        """Walk a budget of dated rows after `position`: None if it ended short of them."""
        # A resource that gained its date since the undated statement is listed once.
        listed = [(row[1], row[2]) for row in found]
        statement, values = _sort_walk_statement(
            criteria, key, scope, position, backwards, size, budget, listed
        )
        rows = _page_rows(session, statement, values, flagged=True)
        walked = [row for row, beyond in rows if not beyond]
        if len(walked) < size and any(beyond for _, beyond in rows):
            return None
        return walked

    def undated(position: Sequence[Any] | None, size: int) -> list[PageRow]:
        seen = [(row[1], row[2]) for row in found]
        page = _undated_page(criteria, key, scope, position, backwards, size, seen)
        statement = _page_with_resources(page, directions, backwards)
        return [row for row, _ in _page_rows(session, statement)]

    if not backwards:
        if not in_undated:
            dated = walk(after, limit)
            if dated is None or len(dated) == limit:
                return dated
            found, after = dated, None
        return found + undated(after, limit - len(found))
    if after is None or in_undated:
        found = undated(after, limit)
        if len(found) == limit:
            return found
        after = None
    dated = walk(after, limit - len(found))
    return None if dated is None else found + dated


def string_driver(
    criteria: dict[str, list[Criterion]], sort: Sequence[SortKey]
) -> StringCriterion | None:
    """Return the prefix string criterion an unsorted one-type search walks, or None.

    A name prefix can match thousands of resources (a common family name); the
    string index hands them out in (value, id) order, so the walk stops after
    one page instead of fetching every match to order it. Searches with a keyed
    criterion (token, reference, _id) are left to the planner: their GIN lookups
    are narrower. Such a search's pages follow the matched value, then the id.
    """
    if sort or len(criteria) != 1:
        return None
    ((_, found),) = criteria.items()
    if any(isinstance(criterion, KeyedCriterion) for criterion in found):
        return None
    return next((c for c in found if isinstance(c, StringCriterion) and c.mode == "start"), None)


def cursor_kinds(criteria: dict[str, list[Criterion]], sort: Sequence[SortKey]) -> list[str]:
    """Return how the values a page cursor carries before (type, id) are typed."""
    if string_driver(criteria, sort) is not None:
        return ["text"]
    return [sort_value_kind(key) for key in sort]


def _string_walk(
    resource_type: str,
    condition: ColumnElement[bool],
    driver: StringCriterion,
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    *,
    slotted: bool = False,
) -> Subquery:
    """Return a page of (s0 = matched value, type, id) walked from the string index."""
    resource, entry, earlier = MATCHED, DRIVING_ENTRY, EARLIER_ENTRY
    key = string_key(entry)
    first_match = not_(
        exists(
            select(literal(1))
            .select_from(earlier)
            .where(
                earlier.c.resource_type == entry.c.resource_type,
                earlier.c.resource_id == entry.c.resource_id,
                earlier.c.param == _in_text(driver.param),
                _prefix_match(earlier, driver, slotted=slotted),
                string_key(earlier) < key,
            )
        )
    )
    walk = (
        select(key.label("s0"), resource.c.resource_type, resource.c.id)
        .join_from(
            resource,
            entry,
            and_(
                entry.c.resource_type == resource.c.resource_type,
                entry.c.resource_id == resource.c.id,
            ),
        )
        .where(
            condition,
            entry.c.resource_type == _in_text(resource_type),
            entry.c.param == _in_text(driver.param),
            _prefix_match(entry, driver, slotted=slotted),
            first_match,
        )
    )
    if after is not None:
        # One type: (value, id) is the whole position, in the index's own order.
        position = tuple_(key, entry.c.resource_id)
        last_key, last_id = (
            (bindparam("after_0", type_=Text()), bindparam("after_2", type_=String()))
            if slotted
            else (literal(after[0], type_=Text()), literal(after[-1]))
        )
        boundary = tuple_(last_key.collate("C"), last_id)
        walk = walk.where(position < boundary if backwards else position > boundary)
    ordering = (key, entry.c.resource_id)
    walk = walk.order_by(*(c.desc() if backwards else c.asc() for c in ordering))
    return walk.limit(limit).subquery("page")


def list_page(
    session: Session,
    *,
    criteria: dict[str, list[Criterion]],
    sort: Sequence[SortKey],
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    scope: SearchScope,
) -> list[PageRow]:
    """Return up to `limit` matches after a keyset position: (sort values, type, id, json, refs)."""
    if walks_sort_dates(session, criteria, sort):
        given_up_key = _sort_walk_key(criteria, sort, scope)
        now = time.monotonic()
        given_up = _sort_walks_given_up.get(given_up_key) if given_up_key else None
        if given_up is None or now - given_up >= DATE_WALK_DECISION_SECONDS:
            walked = _walk_sort_dates(
                session,
                criteria=criteria,
                key=sort[0],
                after=after,
                backwards=backwards,
                limit=limit,
                scope=scope,
            )
            if walked is not None:
                return walked
            if given_up_key is not None:
                if len(_sort_walks_given_up) >= MAX_TEMPLATES:
                    _sort_walks_given_up.clear()
                _sort_walks_given_up[given_up_key] = now
    values: dict[str, Any] = {}
    shape = None
    walk_dates = walks_dates(session, criteria, sort)
    shape = _page_shape(criteria, sort, after, backwards, limit, scope, walk_dates)
    if shape is None:
        statement = page_statement(
            criteria=criteria,
            sort=sort,
            after=after,
            backwards=backwards,
            limit=limit,
            scope=scope,
            walk_dates=walk_dates,
        )
    else:
        statement = _page_template(
            shape, criteria, sort, after, backwards, limit, scope, walk_dates
        )
        values = {**scope.parameters, **_slot_values(criteria, sort, after)}
    width = len(cursor_kinds(criteria, sort))
    return [
        (
            list(row[:width]),
            str(row[width]),
            str(row[width + 1]),
            str(row[width + 2]),
            list(row[width + 3] or ()),
        )
        for row in session.execute(statement, values)
    ]


# Searches of one shape (types, keyed criteria, sort, paging direction, page size)
# differ only in their values: the page query is built once per shape and reused.
# Building it and deriving its cache key cost more than the rest of an identifier
# search's service time (2.1 ms of CPU per search before, 0.9 ms after); a reused
# statement keeps its memoized cache key, so SQLAlchemy's compiled-SQL cache
# answers at once. Scopes without a key and other criteria kinds are built per search.
# Bounded, since the shapes come from callers.
_TEMPLATES: dict[Hashable, Select[Any]] = {}
MAX_TEMPLATES = 512


def _page_shape(
    criteria: dict[str, list[Criterion]],
    sort: Sequence[SortKey],
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    scope: SearchScope,
    walk_dates: bool,
) -> Hashable | None:
    """Return what a reusable page query depends on, or None when it cannot be reused."""
    # A scope without a key is its own SQL; a sorted cursor's SQL depends on which
    # values are NULL.
    if (scope.condition is not None and scope.key is None) or (sort and after is not None):
        return None
    driver = string_driver(criteria, sort)
    shape: list[tuple[str, tuple[Hashable, ...]]] = []
    for resource_type, found in criteria.items():
        kinds: list[Hashable] = []
        for criterion in found:
            if criterion is driver:
                # Its parameter is in the SQL text; its prefixes are slots.
                kinds.append((StringCriterion, driver.param, len(driver.values)))
                continue
            if _windowed(criterion):
                assert isinstance(criterion, DateCriterion)  # noqa: S101
                # The param and prefix shape the SQL; the instants are slots.
                kinds.append((DateCriterion, criterion.param, criterion.comparisons[0].prefix))
                continue
            if not isinstance(criterion, KeyedCriterion):
                return None
            negate = not isinstance(criterion, ReferenceCriterion) and criterion.negate
            kinds.append((type(criterion), negate, many_keys(criterion)))
        shape.append((resource_type, tuple(kinds)))
    # Whether rows are tested by patient is the scope's too; said, not left to its key.
    patients = scope.patient_condition is not None
    return (
        tuple(shape),
        tuple(sort),
        after is not None,
        backwards,
        limit,
        scope.key,
        patients,
        walk_dates,
    )


def _page_template(
    shape: Hashable,
    criteria: dict[str, list[Criterion]],
    sort: Sequence[SortKey],
    after: Sequence[Any] | None,
    backwards: bool,
    limit: int,
    scope: SearchScope,
    walk_dates: bool,
) -> Select[Any]:
    template = _TEMPLATES.get(shape)
    if template is None:
        # Built with this caller's scope; later callers of the same key pass their values.
        template = page_statement(
            criteria=criteria,
            sort=sort,
            after=after,
            backwards=backwards,
            limit=limit,
            scope=scope,
            slotted=True,
            walk_dates=walk_dates,
        )
        if len(_TEMPLATES) >= MAX_TEMPLATES:
            # Only a caller spraying shapes fills it; starting over is simple and thread-safe.
            _TEMPLATES.clear()
        _TEMPLATES[shape] = template
    return template


def _slot_values(
    criteria: dict[str, list[Criterion]], sort: Sequence[SortKey], after: Sequence[Any] | None
) -> dict[str, Any]:
    """Return the values of a slotted page query's named parameters."""
    values: dict[str, Any] = {}
    driver = string_driver(criteria, sort)
    if driver is not None:
        # The walk takes the driver out of the criteria the slots are numbered in.
        values.update({_prefix_slot(n): _like_prefix(v) for n, v in enumerate(driver.values)})
        criteria = {t: [c for c in found if c is not driver] for t, found in criteria.items()}
    for type_number, found in enumerate(criteria.values()):
        for window, comparisons in enumerate(_windows(found).values()):
            for n, comparison in enumerate(comparisons):
                values[_date_slot(type_number, window, f"{n}_low")] = comparison.low
                values[_date_slot(type_number, window, f"{n}_high")] = comparison.high
            floor, ceiling = _window_bounds(comparisons)
            values[_date_slot(type_number, window, "floor")] = floor
            values[_date_slot(type_number, window, "ceiling")] = ceiling
        for number, criterion in enumerate(found):
            if isinstance(criterion, IdCriterion):
                values[_slot_name(type_number, number)] = list(criterion.ids)
            elif isinstance(criterion, TokenCriterion | ReferenceCriterion):
                values[_slot_name(type_number, number)] = list(criterion.keys)
    for n, value in enumerate(after or ()):
        values[f"after_{n}"] = value
    return values


def _keyed(
    table: FromClause, directions: Sequence[bool], backwards: bool
) -> list[tuple[ColumnElement[Any], bool]]:
    return [
        *((table.c[f"s{n}"], descending) for n, descending in enumerate(directions)),
        (table.c.resource_type, backwards),
        (table.c.id, backwards),
    ]


def count_matches(
    session: Session,
    *,
    criteria: dict[str, list[Criterion]],
    scope: SearchScope,
    limit: int | None = None,
) -> int:
    """Count the matches of a search (at most `limit + 1` when a limit is given)."""
    resource = MATCHED
    inner = (
        select(literal(1)).select_from(resource).where(match_condition(resource, criteria, scope))
    )
    if limit is not None:
        inner = inner.limit(limit + 1)
    return int(session.execute(select(func.count()).select_from(inner.subquery())).scalar_one())


def estimate_matches(
    session: Session, *, criteria: dict[str, list[Criterion]], scope: SearchScope
) -> int:
    """Return the planner's estimate of the number of matches (`_total=estimate`)."""
    resource = MATCHED
    statement = (
        select(literal(1)).select_from(resource).where(match_condition(resource, criteria, scope))
    )
    connection = session.connection()
    # Rendered in full: literal_execute prefixes are only written in at execution.
    compiled = statement.compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    # EXPLAIN plans without running: the estimate costs a planning, not a count.
    plan = connection.exec_driver_sql(
        "EXPLAIN (FORMAT JSON) " + str(compiled), dict(compiled.params)
    ).scalar_one()
    document = orjson.loads(plan) if isinstance(plan, str | bytes) else plan
    return int(document[0]["Plan"]["Plan Rows"])


def list_by_keys(
    session: Session, keys: Sequence[tuple[str, str]], scope: SearchScope
) -> list[tuple[str, str, str, list[str]]]:
    """Return (type, id, json, refs) of the visible resources among `keys` (for _include)."""
    ids_by_type: dict[str, list[str]] = {}
    for resource_type, resource_id in keys:
        ids_by_type.setdefault(resource_type, []).append(resource_id)
    statement = _keys_statement(scope)
    found: list[tuple[str, str, str, list[str]]] = []
    for resource_type in sorted(ids_by_type):
        values = {**scope.parameters, "type": resource_type, "ids": ids_by_type[resource_type]}
        found.extend(
            (str(r[0]), str(r[1]), str(r[2]), list(r[3] or ()))
            for r in session.execute(statement, values)
        )
    return found


# One statement per scope key (ids as an array, not an IN list rendered per call):
# its SQL and cache key are made once.
_KEYS_STATEMENTS: dict[Hashable, Select[Any]] = {}


def _keys_statement(scope: SearchScope) -> Select[Any]:
    """Return the (type, id, json, refs) query of given ids of one type within a scope."""
    reusable = scope.condition is None or scope.key is not None
    statement = _KEYS_STATEMENTS.get(scope.key) if reusable else None
    if statement is not None:
        return statement
    resource = MATCHED
    statement = (
        select(
            resource.c.resource_type,
            resource.c.id,
            sql_cast(resource.c.resource, Text),
            _fetched_refs(resource),
        )
        .where(
            resource.c.resource_type == bindparam("type", type_=Text),
            resource.c.id == func.any(bindparam("ids", type_=ARRAY(Text))),
            *visible(resource, scope),
        )
        .order_by(resource.c.id)
    )
    if reusable:
        if len(_KEYS_STATEMENTS) >= MAX_TEMPLATES:
            _KEYS_STATEMENTS.clear()
        _KEYS_STATEMENTS[scope.key] = statement
    return statement


def list_referencing(
    session: Session,
    *,
    source_type: str | None,
    ref_keys: Sequence[str],
    scope: SearchScope,
    limit: int,
) -> list[tuple[str, str, str, list[str]]]:
    """Return (type, id, json, refs) of visible resources holding any of `ref_keys`."""
    if not ref_keys:
        return []
    resource = MATCHED
    conditions = [_overlaps(resource.c.refs, ref_keys), *visible(resource, scope)]
    if source_type is not None:
        conditions.append(resource.c.resource_type == source_type)
    statement = (
        select(
            resource.c.resource_type,
            resource.c.id,
            sql_cast(resource.c.resource, Text),
            _fetched_refs(resource),
        )
        .where(*conditions)
        .order_by(resource.c.resource_type, resource.c.id)
        .limit(limit)
    )
    return [(str(r[0]), str(r[1]), str(r[2]), list(r[3] or ())) for r in session.execute(statement)]


def list_ids(
    session: Session,
    resource_type: str,
    criteria: Sequence[Criterion],
    *,
    limit: int,
    scope: SearchScope = UNRESTRICTED,
) -> list[str]:
    """Return ids of visible resources of one type matching every criterion (conditional ops)."""
    resource = MATCHED
    statement = (
        select(resource.c.id)
        .where(match_condition(resource, {resource_type: list(criteria)}, scope))
        .limit(limit)
    )
    return [str(value) for value in session.execute(statement).scalars()]
