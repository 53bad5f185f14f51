"""Compile the official R4 search parameters into fast extractors of index values.

Every R4 SearchParameter `expression` (shipped in `fhir_api.definitions`) is
parsed once and compiled against the R4B model types into plain Python
getters; `extract_index(resource)` then walks dicts and lists only (no FHIRPath
interpretation per write). Plans are compiled per resource type on first use
and cached for the life of the process; `compile_all()` compiles every type
(call it at start-up to pay the ~3 s of R4B model imports before serving).

Encodings (ingest writes them, the search side builds the same keys with the
helpers exported here):

tokens (`IndexValues.tokens`, deduplicated strings)
    A token (Coding, CodeableConcept.coding, Identifier system|value,
    ContactPoint system|value, code/string/uri, boolean as "true"/"false")
    gives `encode_token(param, system, code)`:
    `param=system|code` (`param=|code` without a system), `param=code`, and
    `param=system|` when there is a system. Search: `token_query_key(param,
    value)` for `code`, `sys|code`, `|code`, `sys|`.
    Identifier.type codings add `of_type_key(param, typeSystem, typeCode, value)`
    = `param:of-type=typeSystem|typeCode|value`.
    Reference.identifier adds `encode_token(f"{param}:identifier", system, value)`.
    Token text (CodeableConcept.text, Coding.display, Identifier.type.text) is a
    string entry under `text_param(param)` = `param:text`, the whole text only
    (no per-word entries: `:text` matches from the start of the text).

references (`IndexValues.references`, deduplicated `param=value`)
    Relative `Type/id` (`/_history/n` dropped); absolute URLs as given (the
    write engine stores this server's own absolute URLs as relative ones);
    canonicals both without `|version` and as given (`canonical_values`).
    Contained (`#x`) references are not indexed. Search keys:
    `reference_query_keys(param, value, targets)` (a bare id expands to every
    target type).

strings (`(param, normalized, exact)`)
    `normalize_string`: NFKD, combining marks (Mn) dropped, Arabic letter
    variants folded (ٱ->ا, ى/ی->ي, ة->ه, tatweel dropped), casefold, whitespace
    collapsed. HumanName gives family, each given, prefix, suffix and text;
    Address each line, city, district, state, postalCode, country and text.
    Every part is one entry, plus one entry per word of a multi-word part (its
    `exact` stays the whole part), so `name=idrissi` prefix-matches
    "El Idrissi" while `:exact` still compares whole parts.

dates (`(param, low, high)`, UTC)
    date/dateTime/instant cover their precision (`date_range`: "2024" is
    2024-01-01T00:00:00Z..2024-12-31T23:59:59.999999Z); no zone means UTC.
    Period: start's low .. end's high, an open end is `DATE_MIN`/`DATE_MAX`.
    Timing: the outer limits of its events and repeat.boundsPeriod.

quantities (`(param, value, low, high, system, code)`)
    Quantity (and Age, Duration, ...): code, else unit with system None.
    Money: system `urn:iso:std:iso:4217`, code = currency. Number params use
    system = code = None. low/high come from the written precision
    (`decimal_range`: 5.4 -> 5.35..5.45; 100 -> 99.5..100.5). Range: value =
    low (else high), low = low's lower bound, high = high's upper bound, an
    open side is `DECIMAL_MIN`/`DECIMAL_MAX` (±Infinity).

uris (`(param, uri)`), including `_profile` and `_source`.

positions (Location `near`, the one R4 `special` parameter)
    Location.position gives two number rows (low = high = value):
    `position_params(param)` = `param$latitude` and `param$longitude`, in
    decimal degrees (WGS84) as written. A position without both, or with a
    latitude past ±90, is not indexed; a longitude past ±180 is wrapped.

composites
    Components keep their parameter's encoding; leading token/reference/uri
    components become key parts (`composite_token_keys`: `system|code` and
    `code`; references as above) joined with `$`. If every component is a key,
    the token `composite_key(param, k1, k2)` = `param=k1$k2` is written for
    each combination of forms. Otherwise the typed last component goes to its
    own list under `composite_param(param, k1)` = `param$k1` (quantities,
    dates, strings). The MolecularSequence coordinates (chromosome $ start $
    end) index each number under `param$k1$<component code>`, so start and end
    are not tied to the same variant. DocumentReference `relationship` is
    `relatesto$relation` (R4's swapped component expressions are corrected).

_id and _lastUpdated
    Not extracted: every row has them as columns (`fhir_resource.id`,
    `fhir_resource.last_updated`); search uses the columns.

patient_ids
    From the patient CompartmentDefinition: relative `Patient/<id>` values of
    the listed params; a Patient is in its own compartment.
"""

from fhir_api.search_index.definitions import (
    SearchParameterInfo,
    fhir_version,
    patient_compartment_params,
    resource_types,
    search_parameters_for,
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
    normalize_string,
    of_type_key,
    position_params,
    reference_query_keys,
    reference_value,
    string_entries,
    text_param,
    token_query_key,
)
from fhir_api.search_index.extract import (
    IndexValues,
    at_most_one_patient,
    compile_all,
    extract_index,
    single_valued,
)
from fhir_api.search_index.model_types import UnknownResourceType

__all__ = [
    "DATE_MAX",
    "DATE_MIN",
    "DECIMAL_MAX",
    "DECIMAL_MIN",
    "IndexValues",
    "SearchParameterInfo",
    "UnknownResourceType",
    "canonical_values",
    "compile_all",
    "composite_key",
    "composite_param",
    "composite_token_keys",
    "date_range",
    "decimal_range",
    "encode_token",
    "extract_index",
    "fhir_version",
    "normalize_string",
    "of_type_key",
    "patient_compartment_params",
    "position_params",
    "reference_query_keys",
    "reference_value",
    "resource_types",
    "search_parameters_for",
    "at_most_one_patient",
    "single_valued",
    "string_entries",
    "text_param",
    "token_query_key",
]
