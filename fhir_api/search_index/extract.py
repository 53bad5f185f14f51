"""Turn a FHIR resource into its search-index values with the compiled extractors."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from fhir_api.search_index.compiler import (
    Branch,
    CompileError,
    Scope,
    compile_expression,
)
from fhir_api.search_index.definitions import (
    SearchParameterDefinition,
    definitions_for,
    patient_owner_params,
    resource_types,
)
from fhir_api.search_index.encoding import (
    DATE_MAX,
    DATE_MIN,
    DECIMAL_MAX,
    DECIMAL_MIN,
    canonical_values,
    composite_key,
    composite_param,
    composite_token_keys,
    date_range,
    decimal_range,
    encode_token,
    number_bounds,
    of_type_key,
    position_params,
    position_value,
    reference_value,
    string_entries,
    text_param,
    to_decimal,
)
from fhir_api.search_index.model_types import UnknownResourceType, resource_model

ISO_4217 = "urn:iso:std:iso:4217"

# Parameters deliberately not extracted, with the reason.
SKIPPED_PARAMETERS: Mapping[str, str] = {
    "DomainResource-text": "_text has no expression: narrative full-text search needs a "
    "text index over Resource.text, not extracted keys",
    "Resource-content": "_content has no expression: full-text search over the whole resource",
    "Resource-query": "_query has no expression: it names a custom query operation",
    # Every stored row has these as columns (fhir_resource.id, .last_updated);
    # index entries for them would only repeat the columns on every write.
    "Resource-id": "_id is the id column of fhir_resource",
    "Resource-lastUpdated": "_lastUpdated is the last_updated column of fhir_resource",
}

# R4 resource types without an R4B model: ingest refuses them (DESIGN.md,
# Ingest rules), so their parameters are never extracted.
UNSUPPORTED_RESOURCE_TYPES = frozenset(
    {
        "EffectEvidenceSynthesis",
        "MedicinalProduct",
        "MedicinalProductAuthorization",
        "MedicinalProductContraindication",
        "MedicinalProductIndication",
        "MedicinalProductIngredient",
        "MedicinalProductInteraction",
        "MedicinalProductManufactured",
        "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical",
        "MedicinalProductUndesirableEffect",
        "RiskEvidenceSynthesis",
        "SubstanceNucleicAcid",
        "SubstancePolymer",
        "SubstanceProtein",
        "SubstanceReferenceInformation",
        "SubstanceSourceMaterial",
        "SubstanceSpecification",
    }
)

# (resource type, param code) whose R4 expression names elements the R4B
# model of that type lacks: strict R4B validation at ingest rejects such
# elements, so these parameters can match nothing and are not extracted.
R4B_ABSENT_ELEMENTS: Mapping[tuple[str, str], str] = {
    ("DeviceDefinition", "classification"): "R4B has no DeviceDefinition.classification",
    ("Evidence", "effective"): "R4B redesigned Evidence: no effectivePeriod",
    ("Evidence", "jurisdiction"): "R4B redesigned Evidence: no jurisdiction",
    ("Evidence", "name"): "R4B redesigned Evidence: no name",
    ("Evidence", "topic"): "R4B redesigned Evidence: no topic",
    ("EvidenceVariable", "effective"): "R4B redesigned EvidenceVariable: no effectivePeriod",
    ("EvidenceVariable", "jurisdiction"): "R4B redesigned EvidenceVariable: no jurisdiction",
    ("EvidenceVariable", "topic"): "R4B redesigned EvidenceVariable: no topic",
}


@dataclass(slots=True)
class IndexValues:
    """Search-index values of one resource (see the package docstring for the encodings)."""

    tokens: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    strings: list[tuple[str, str, str]] = field(default_factory=list)
    dates: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    quantities: list[tuple[str, Decimal, Decimal, Decimal, str | None, str | None]] = field(
        default_factory=list
    )
    uris: list[tuple[str, str]] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)


Emitter = Callable[[str, list[Any], IndexValues], None]
Step = tuple[str, Callable[[Any], list[Any]], Emitter]
KeyForms = Callable[[list[Any]], list[str]]


# --- token -----------------------------------------------------------------


def _add_text(param: str, text: Any, out: IndexValues) -> None:
    if isinstance(text, str):
        # `:text` matches from the start of the display text (R4 search, token
        # modifiers); word entries would double the rows of every coded resource.
        out.strings.extend(string_entries(text_param(param), text, words=False))


def _token_coding(param: str, values: list[Any], out: IndexValues) -> None:
    for coding in values:
        if not isinstance(coding, dict):
            continue
        code = coding.get("code")
        if isinstance(code, str):
            out.tokens.extend(encode_token(param, coding.get("system"), code))
        _add_text(param, coding.get("display"), out)


def _token_codeable_concept(param: str, values: list[Any], out: IndexValues) -> None:
    for concept in values:
        if not isinstance(concept, dict):
            continue
        codings = concept.get("coding")
        if codings:
            _token_coding(param, codings, out)
        _add_text(param, concept.get("text"), out)


def _token_identifier(param: str, values: list[Any], out: IndexValues) -> None:
    for identifier in values:
        if not isinstance(identifier, dict):
            continue
        value = identifier.get("value")
        if not isinstance(value, str):
            continue
        out.tokens.extend(encode_token(param, identifier.get("system"), value))
        identifier_type = identifier.get("type")
        if isinstance(identifier_type, dict):
            for coding in identifier_type.get("coding", ()):
                code = coding.get("code") if isinstance(coding, dict) else None
                if isinstance(code, str):
                    out.tokens.append(of_type_key(param, coding.get("system"), code, value))
            _add_text(param, identifier_type.get("text"), out)


def _token_contact_point(param: str, values: list[Any], out: IndexValues) -> None:
    for contact in values:
        if isinstance(contact, dict) and isinstance(contact.get("value"), str):
            out.tokens.extend(encode_token(param, contact.get("system"), contact["value"]))


def _token_primitive(param: str, values: list[Any], out: IndexValues) -> None:
    for value in values:
        if isinstance(value, bool):
            out.tokens.extend(encode_token(param, None, "true" if value else "false"))
        elif isinstance(value, str):
            out.tokens.extend(encode_token(param, None, value))


# --- reference ---------------------------------------------------------------


def _reference_reference(param: str, values: list[Any], out: IndexValues) -> None:
    for reference in values:
        if not isinstance(reference, dict):
            continue
        target = reference.get("reference")
        if isinstance(target, str):
            indexed = reference_value(target)
            if indexed is not None:
                out.references.append(f"{param}={indexed}")
        identifier = reference.get("identifier")
        if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
            out.tokens.extend(
                encode_token(f"{param}:identifier", identifier.get("system"), identifier["value"])
            )


def _reference_canonical(param: str, values: list[Any], out: IndexValues) -> None:
    for url in values:
        if isinstance(url, str) and url:
            out.references.extend(f"{param}={form}" for form in canonical_values(url))


def _reference_resource(param: str, values: list[Any], out: IndexValues) -> None:
    # Bundle.entry[0].resource: an inline resource is referenced by type and id.
    for resource in values:
        if isinstance(resource, dict) and resource.get("id") and resource.get("resourceType"):
            out.references.append(f"{param}={resource['resourceType']}/{resource['id']}")


# --- date ------------------------------------------------------------------------


def _date_primitive(param: str, values: list[Any], out: IndexValues) -> None:
    for value in values:
        if isinstance(value, str):
            found = date_range(value)
            if found is not None:
                out.dates.append((param, found[0], found[1]))


def _period_bounds(period: Any) -> tuple[datetime, datetime] | None:
    if not isinstance(period, dict):
        return None
    start, end = period.get("start"), period.get("end")
    low_range = date_range(start) if isinstance(start, str) else None
    high_range = date_range(end) if isinstance(end, str) else None
    if low_range is None and high_range is None:
        return None
    # A missing end means "ongoing", a missing start "since ever" (R4 search, date).
    low = low_range[0] if low_range is not None else DATE_MIN
    high = high_range[1] if high_range is not None else DATE_MAX
    if low > high:
        # A start after the end breaks per-1; the period is searched as the span
        # between its bounds, so that every date row is an ordered range (the
        # sorted date indexes and the walk over them rely on it; migration 0016).
        return high, low
    return low, high


def _date_period(param: str, values: list[Any], out: IndexValues) -> None:
    for period in values:
        bounds = _period_bounds(period)
        if bounds is not None:
            out.dates.append((param, bounds[0], bounds[1]))


def _date_timing(param: str, values: list[Any], out: IndexValues) -> None:
    # R4 search: for a Timing only the outer limits matter (events and bounds).
    for timing in values:
        if not isinstance(timing, dict):
            continue
        ranges = [date_range(event) for event in timing.get("event", ()) if isinstance(event, str)]
        repeat = timing.get("repeat")
        if isinstance(repeat, dict):
            ranges.append(_period_bounds(repeat.get("boundsPeriod")))
        found = [item for item in ranges if item is not None]
        if found:
            out.dates.append((param, min(low for low, _ in found), max(high for _, high in found)))


# --- quantity and number -------------------------------------------------------


def _quantity_row(
    param: str, quantity: Any, system: str | None, code: str | None
) -> tuple[str, Decimal, Decimal, Decimal, str | None, str | None] | None:
    bounds = number_bounds(quantity.get("value")) if isinstance(quantity, dict) else None
    if bounds is None:
        return None
    return param, bounds[0], bounds[1], bounds[2], system, code


def _quantity_units(quantity: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    """The (system, code) pairs a Quantity is found by: its coded unit, and its human unit."""
    code = quantity.get("code")
    unit = quantity.get("unit")
    unit = unit if isinstance(unit, str) and unit else None
    if not isinstance(code, str):
        return [(None, unit)]
    system = quantity.get("system")
    units: list[tuple[str | None, str | None]] = [
        (system if isinstance(system, str) else None, code)
    ]
    # R4 matches `number||unit` against the code or the unit: a unit that
    # differs from the code ("pack-years" for {pack-years}) gets a row of its
    # own without a system, so `number|system|code` still only meets the code.
    if unit is not None and unit != code:
        units.append((None, unit))
    return units


def _quantity(param: str, values: list[Any], out: IndexValues) -> None:
    for quantity in values:
        if isinstance(quantity, dict):
            for system, code in _quantity_units(quantity):
                row = _quantity_row(param, quantity, system, code)
                if row is not None:
                    out.quantities.append(row)


def _money(param: str, values: list[Any], out: IndexValues) -> None:
    for money in values:
        if isinstance(money, dict):
            currency = money.get("currency")
            code = currency if isinstance(currency, str) else None
            row = _quantity_row(param, money, ISO_4217 if code else None, code)
            if row is not None:
                out.quantities.append(row)


def _range_bound(quantity: Any) -> tuple[Decimal, dict[str, Any]] | None:
    if isinstance(quantity, dict):
        value = to_decimal(quantity.get("value"))
        if value is not None:
            return value, quantity
    return None


def _range(param: str, values: list[Any], out: IndexValues, coded: bool) -> None:
    for range_value in values:
        if not isinstance(range_value, dict):
            continue
        low = _range_bound(range_value.get("low"))
        high = _range_bound(range_value.get("high"))
        first = low or high
        if first is None:
            continue
        value, unit_source = first
        units = _quantity_units(unit_source) if coded else [(None, None)]
        # An open side of a Range is unbounded (PostgreSQL numeric has ±Infinity).
        bottom = decimal_range(low[0])[0] if low is not None else DECIMAL_MIN
        top = decimal_range(high[0])[1] if high is not None else DECIMAL_MAX
        out.quantities.extend((param, value, bottom, top, system, code) for system, code in units)


def _quantity_range(param: str, values: list[Any], out: IndexValues) -> None:
    _range(param, values, out, coded=True)


def _number_range(param: str, values: list[Any], out: IndexValues) -> None:
    _range(param, values, out, coded=False)


def _number(param: str, values: list[Any], out: IndexValues) -> None:
    for number in values:
        bounds = number_bounds(number)
        if bounds is not None:
            out.quantities.append((param, bounds[0], bounds[1], bounds[2], None, None))


def _position(param: str, values: list[Any], out: IndexValues) -> None:
    # `near` (the one R4 `special` parameter) compares a distance, so a position
    # is a point: both its coordinates as numbers, each under its own param.
    latitude_param, longitude_param = position_params(param)
    for position in values:
        if not isinstance(position, dict):
            continue
        latitude = to_decimal(position.get("latitude"))
        longitude = to_decimal(position.get("longitude"))
        point = (
            None if latitude is None or longitude is None else position_value(latitude, longitude)
        )
        if point is None:
            continue
        latitude, longitude = point
        out.quantities.append((latitude_param, latitude, latitude, latitude, None, None))
        out.quantities.append((longitude_param, longitude, longitude, longitude, None, None))


# --- string and uri ---------------------------------------------------------------


def _string_primitive(param: str, values: list[Any], out: IndexValues) -> None:
    for value in values:
        if isinstance(value, str):
            out.strings.extend(string_entries(param, value))


def _string_parts(parts: tuple[str, ...]) -> Emitter:
    def emit(param: str, values: list[Any], out: IndexValues) -> None:
        for value in values:
            if not isinstance(value, dict):
                continue
            for part in parts:
                found = value.get(part)
                if isinstance(found, str):
                    out.strings.extend(string_entries(param, found))
                elif isinstance(found, list):
                    for item in found:
                        if isinstance(item, str):
                            out.strings.extend(string_entries(param, item))

    return emit


def _uri(param: str, values: list[Any], out: IndexValues) -> None:
    for value in values:
        if isinstance(value, str) and value:
            out.uris.append((param, value))


def _ignored(_param: str, _values: list[Any], _out: IndexValues) -> None:
    """Index nothing: the value has no meaning for this parameter type."""


def _no_forms(_values: list[Any]) -> list[str]:
    return []


# Values an expression can yield that carry nothing searchable for the
# parameter's type; naming them keeps "unknown pair = compile error" strict.
IGNORED: Mapping[str, tuple[str, ...]] = {
    # Free-text timings (CarePlan scheduledString, Immunization occurrenceString)
    # and ages (Procedure performedAge) have no calendar date.
    "date": ("string", "Age", "Range"),
    # Consent.source[x] may be an Attachment: not a reference to a resource.
    "reference": ("Attachment",),
    # SampledData is a series of values with no single quantity (brief: not needed).
    "quantity": ("SampledData",),
}
# Group.characteristic.value[x] beyond CodeableConcept/boolean has no token form.
IGNORED_KEY_FORMS: Mapping[str, tuple[str, ...]] = {
    "token": ("Quantity", "Range", "Reference"),
}

_TOKEN_STRINGS = ("code", "string", "id", "uri", "url", "canonical", "oid", "uuid", "boolean")
_DATES = ("date", "dateTime", "instant")
_QUANTITIES = ("Quantity", "Age", "Count", "Distance", "Duration", "SimpleQuantity")
_NUMBERS = ("integer", "decimal", "positiveInt", "unsignedInt", "integer64")
_URIS = ("uri", "url", "canonical", "oid", "uuid")

# How each (parameter type, FHIR type) pair is indexed; a pair missing here
# is a compile error, so a new combination cannot be silently dropped.
EMITTERS: Mapping[str, Mapping[str, Emitter]] = {
    "token": {
        "CodeableConcept": _token_codeable_concept,
        "Coding": _token_coding,
        "Identifier": _token_identifier,
        "ContactPoint": _token_contact_point,
        **dict.fromkeys(_TOKEN_STRINGS, _token_primitive),
    },
    "reference": {
        "Reference": _reference_reference,
        "Resource": _reference_resource,
        **dict.fromkeys(_URIS, _reference_canonical),
    },
    "date": {
        **dict.fromkeys(_DATES, _date_primitive),
        "Period": _date_period,
        "Timing": _date_timing,
    },
    "quantity": {
        **dict.fromkeys(_QUANTITIES, _quantity),
        "Money": _money,
        "Range": _quantity_range,
    },
    "number": {**dict.fromkeys(_NUMBERS, _number), "Range": _number_range},
    "string": {
        "string": _string_primitive,
        "markdown": _string_primitive,
        "HumanName": _string_parts(("family", "given", "prefix", "suffix", "text")),
        "Address": _string_parts(
            ("line", "city", "district", "state", "postalCode", "country", "text")
        ),
    },
    "uri": dict.fromkeys(_URIS, _uri),
    "special": {"LocationPosition": _position},
}
EMITTERS = {
    param_type: {**dict.fromkeys(IGNORED.get(param_type, ()), _ignored), **table}
    for param_type, table in EMITTERS.items()
}


# --- composite -----------------------------------------------------------------------


def _coding_forms(codings: list[Any]) -> list[str]:
    forms: list[str] = []
    for coding in codings:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            forms.extend(composite_token_keys(coding.get("system"), coding["code"]))
    return forms


def _concept_forms(values: list[Any]) -> list[str]:
    forms: list[str] = []
    for concept in values:
        if isinstance(concept, dict):
            forms.extend(_coding_forms(concept.get("coding", ())))
    return forms


def _identifier_forms(values: list[Any]) -> list[str]:
    return [
        form
        for item in values
        if isinstance(item, dict) and isinstance(item.get("value"), str)
        for form in composite_token_keys(item.get("system"), item["value"])
    ]


def _primitive_forms(values: list[Any]) -> list[str]:
    forms: list[str] = []
    for value in values:
        if isinstance(value, bool):
            forms.extend(composite_token_keys(None, "true" if value else "false"))
        elif isinstance(value, str):
            forms.extend(composite_token_keys(None, value))
    return forms


def _reference_forms(values: list[Any]) -> list[str]:
    forms: list[str] = []
    for value in values:
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            indexed = reference_value(value["reference"])
            if indexed is not None:
                forms.append(indexed)
        elif isinstance(value, str):
            forms.extend(canonical_values(value))
    return forms


# The key forms a component contributes when it is not the typed last part.
KEY_FORMS: Mapping[str, Mapping[str, KeyForms]] = {
    "token": {
        "CodeableConcept": _concept_forms,
        "Coding": _coding_forms,
        "Identifier": _identifier_forms,
        **dict.fromkeys(_TOKEN_STRINGS, _primitive_forms),
    },
    "reference": {"Reference": _reference_forms, **dict.fromkeys(_URIS, _reference_forms)},
    "uri": dict.fromkeys(_URIS, _reference_forms),
}
KEY_FORMS = {
    param_type: {**dict.fromkeys(IGNORED_KEY_FORMS.get(param_type, ()), _no_forms), **table}
    for param_type, table in KEY_FORMS.items()
}


@dataclass(frozen=True, slots=True)
class _CompiledComponent:
    code: str
    rooted: bool
    keyed: bool
    # Exactly one of the two is filled, depending on `keyed`.
    key_getters: tuple[tuple[Callable[[Any], list[Any]], KeyForms], ...]
    typed_getters: tuple[tuple[Callable[[Any], list[Any]], Emitter], ...]


def _compile_component(
    definition: SearchParameterDefinition, index: int, base: Branch, resource_type: str
) -> _CompiledComponent:
    component = definition.components[index]
    expression = component.expression
    if definition.id == "DocumentReference-relationship":
        # Erratum in R4 4.0.1: the two component expressions are swapped
        # relative to their definitions (relatesto is the target, relation the code).
        expression = definition.components[1 - index].expression
    scope = Scope(base.type_name, base.model, resource_type, False)
    branches = compile_expression(expression, resource_type, scope)
    keyed = component.type in KEY_FORMS
    key_getters: list[tuple[Callable[[Any], list[Any]], KeyForms]] = []
    typed_getters: list[tuple[Callable[[Any], list[Any]], Emitter]] = []
    for branch in branches:
        if keyed:
            to_forms = KEY_FORMS[component.type].get(branch.type_name)
            if to_forms is None:
                raise CompileError(f"no {component.type} key form for {branch.type_name}")
            key_getters.append((branch.get, to_forms))
        else:
            emitter = EMITTERS[component.type].get(branch.type_name)
            if emitter is None:
                raise CompileError(f"no {component.type} encoding for {branch.type_name}")
            typed_getters.append((branch.get, emitter))
    rooted = any(branch.rooted for branch in branches)
    return _CompiledComponent(
        component.code, rooted, keyed, tuple(key_getters), tuple(typed_getters)
    )


def _compile_composite(definition: SearchParameterDefinition, resource_type: str) -> Emitter:
    if definition.expression is None:
        raise CompileError(f"{definition.id} has no expression")
    bases = compile_expression(definition.expression, resource_type)
    plans: list[tuple[Callable[[Any], list[Any]], tuple[_CompiledComponent, ...]]] = []
    for base in bases:
        components = tuple(
            _compile_component(definition, index, base, resource_type)
            for index in range(len(definition.components))
        )
        leading = 0
        while leading < len(components) and components[leading].keyed:
            leading += 1
        if leading == 0 or any(component.keyed for component in components[leading:]):
            raise CompileError(f"composite {definition.id}: keys must come first")
        plans.append((base.get, components))

    def emit(param: str, resources: list[Any], out: IndexValues) -> None:
        resource = resources[0]
        for get_items, components in plans:
            for item in get_items(resource):
                _emit_composite(param, item, resource, components, out)

    return emit


def _emit_composite(
    param: str,
    item: Any,
    resource: Any,
    components: tuple[_CompiledComponent, ...],
    out: IndexValues,
) -> None:
    # Typed parts first: most composites do not apply to a given item
    # (code-value-string on a Quantity value), so bail out before building keys.
    typed: list[tuple[str, IndexValues]] = []
    for component in components:
        if component.keyed:
            continue
        focus = resource if component.rooted else item
        # Encode the typed part once, then copy its rows under each key prefix.
        rows = IndexValues()
        for get, emit in component.typed_getters:
            values = get(focus)
            if values:
                emit("", values, rows)
        if not (rows.quantities or rows.dates or rows.strings):
            return
        typed.append((component.code, rows))
    key_lists: list[list[str]] = []
    for component in components:
        if not component.keyed:
            continue
        focus = resource if component.rooted else item
        forms: list[str] = []
        for get, to_forms in component.key_getters:
            values = get(focus)
            if values:
                forms.extend(to_forms(values))
        if not forms:
            return
        key_lists.append(forms)
    for prefix in itertools.product(*key_lists):
        if not typed:
            out.tokens.append(composite_key(param, *prefix))
            continue
        for code, rows in typed:
            # Several typed parts (the MolecularSequence coordinates) are each
            # indexed under their own component code after the keys.
            suffix = (code,) if len(typed) > 1 else ()
            name = composite_param(param, *prefix, *suffix)
            out.quantities.extend((name, *row[1:]) for row in rows.quantities)
            out.dates.extend((name, *row[1:]) for row in rows.dates)
            out.strings.extend((name, *row[1:]) for row in rows.strings)


# --- tables ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResourceExtractor:
    """The compiled extraction plan of one resource type."""

    resource_type: str
    steps: tuple[Step, ...]
    compartment_params: frozenset[str]
    # The steps again, grouped by the top-level key they read (absent keys
    # are never visited) and the few that must always run.
    steps_by_key: Mapping[str, tuple[Step, ...]]
    unkeyed_steps: tuple[Step, ...]


def _resource_itself(resource: Any) -> list[Any]:
    return [resource]


def compile_parameter(
    definition: SearchParameterDefinition, resource_type: str
) -> list[tuple[Callable[[Any], list[Any]], Emitter, str | None]]:
    """Compile one search parameter for one resource type into (getter, emitter, key) steps."""
    if definition.expression is None:
        raise CompileError(f"{definition.id} has no expression")
    if definition.type == "composite":
        return [(_resource_itself, _compile_composite(definition, resource_type), None)]
    table = EMITTERS.get(definition.type)
    if table is None:
        raise CompileError(f"{definition.id}: no encoding for type {definition.type}")
    steps: list[tuple[Callable[[Any], list[Any]], Emitter, str | None]] = []
    for branch in compile_expression(definition.expression, resource_type):
        emitter = table.get(branch.type_name)
        if emitter is None:
            raise CompileError(
                f"{definition.id}: no {definition.type} encoding for {branch.type_name}"
            )
        steps.append((branch.get, emitter, branch.first_key))
    return steps


@functools.cache
def at_most_one_patient(resource_type: str) -> bool:
    """Tell whether a resource of the type is in at most one patient's compartment.

    So when the type names its patients through one parameter of at most one
    value (`Encounter.subject`); a Patient is in its own compartment and those
    of the patients it links to.
    """
    params = patient_owner_params().get(resource_type, ())
    return resource_type != "Patient" and (
        len(params) <= 1 and all(single_valued(resource_type, code) for code in params)
    )


@functools.cache
def single_valued(resource_type: str, code: str) -> bool:
    """Tell whether a parameter gives a resource of the type at most one index value.

    So when its expression reads one path of elements that never repeat (the
    variants of one choice element count as one: a resource has only one), as
    `Encounter.date` reads `Encounter.period`. Every value of a date, number
    or quantity gives one index row.
    """
    definition = definitions_for(resource_type).get(code)
    if (
        definition is None
        or definition.expression is None
        or definition.type == "composite"
        or definition.id in SKIPPED_PARAMETERS
        or (resource_type, code) in R4B_ABSENT_ELEMENTS
    ):
        return False
    try:
        branches = compile_expression(definition.expression, resource_type)
    except CompileError:
        return False
    paths = {branch.single_path for branch in branches}
    # Several branches are only one value if they are the variants of one choice
    # element, each under its own JSON key (`X | X` or two filters of X are not).
    keys = {branch.keys for branch in branches}
    return (
        bool(branches)
        and None not in paths
        and len(paths) == 1
        and None not in keys
        and len(keys) == len(branches)
    )


@functools.cache
def extractor_for(resource_type: str) -> ResourceExtractor:
    """Return the compiled extraction plan of a resource type (compiled once)."""
    if resource_type in UNSUPPORTED_RESOURCE_TYPES:
        raise UnknownResourceType(resource_type)
    resource_model(resource_type)
    steps: list[Step] = []
    by_key: dict[str, list[Step]] = {}
    unkeyed: list[Step] = []
    for code, definition in definitions_for(resource_type).items():
        if definition.id in SKIPPED_PARAMETERS or (resource_type, code) in R4B_ABSENT_ELEMENTS:
            continue
        for get, emit, first_key in compile_parameter(definition, resource_type):
            step = (code, get, emit)
            steps.append(step)
            if first_key is None:
                unkeyed.append(step)
            else:
                by_key.setdefault(first_key, []).append(step)
    compartment = frozenset(patient_owner_params().get(resource_type, ()))
    return ResourceExtractor(
        resource_type,
        tuple(steps),
        compartment,
        MappingProxyType({key: tuple(group) for key, group in by_key.items()}),
        tuple(unkeyed),
    )


def compile_all() -> dict[str, ResourceExtractor]:
    """Compile the extractors of every supported resource type."""
    return {
        resource_type: extractor_for(resource_type)
        for resource_type in sorted(resource_types() - UNSUPPORTED_RESOURCE_TYPES)
    }


def extract_index(resource: Mapping[str, Any]) -> IndexValues:
    """Return the search-index values of a validated FHIR resource (plain JSON)."""
    document = resource if isinstance(resource, dict) else dict(resource)
    resource_type = document.get("resourceType")
    if not isinstance(resource_type, str):
        raise UnknownResourceType(repr(resource_type))
    extractor = extractor_for(resource_type)
    out = IndexValues()
    steps_by_key = extractor.steps_by_key
    for key in document:
        for code, get, emit in steps_by_key.get(key, ()):
            values = get(document)
            if values:
                emit(code, values, out)
    for code, get, emit in extractor.unkeyed_steps:
        values = get(document)
        if values:
            emit(code, values, out)
    out.tokens = list(dict.fromkeys(out.tokens))
    out.references = list(dict.fromkeys(out.references))
    if len(out.strings) > 1:
        out.strings = list(dict.fromkeys(out.strings))
    if len(out.quantities) > 1:
        out.quantities = list(dict.fromkeys(out.quantities))
    out.patient_ids = _patient_ids(document, extractor, out.references)
    return out


def patients_named_indirectly(resource: Mapping[str, Any]) -> list[str]:
    """Return the compartment parameters naming someone only by identifier or contained.

    Such references put no patient in the index (`_patient_ids`): a resource
    whose patient is named only so belongs to no record.
    """
    document = resource if isinstance(resource, dict) else dict(resource)
    extractor = extractor_for(str(document.get("resourceType")))
    contained_patients = {
        f"#{item.get('id')}"
        for item in document.get("contained") or ()
        if isinstance(item, dict) and item.get("resourceType") == "Patient"
    }
    found: dict[str, None] = {}
    for code, get, _emit in extractor.steps:
        if code not in extractor.compartment_params:
            continue
        for value in get(document):
            if not isinstance(value, dict) or "resourceType" in value:
                continue
            reference = value.get("reference")
            by_identifier = reference is None and isinstance(value.get("identifier"), dict)
            if (by_identifier and value.get("type") in (None, "Patient")) or (
                reference in contained_patients
            ):
                found[code] = None
    return list(found)


def _patient_ids(
    resource: dict[str, Any], extractor: ResourceExtractor, references: list[str]
) -> list[str]:
    ids: dict[str, None] = {}
    if extractor.resource_type == "Patient" and isinstance(resource.get("id"), str):
        ids[resource["id"]] = None
    if extractor.compartment_params:
        for reference in references:
            param, _, value = reference.partition("=")
            # Only relative references: an absolute URL names another server's patient.
            if param in extractor.compartment_params and value.startswith("Patient/"):
                ids[value[len("Patient/") :]] = None
    return list(ids)
