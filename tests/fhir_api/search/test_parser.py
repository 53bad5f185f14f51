"""The parser: typed criteria encoded like the index, and its refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from fhir_api.search.errors import InvalidSearch, UnsupportedModifier
from fhir_api.search.parser import (
    ChainCriterion,
    DateCriterion,
    HasCriterion,
    NumberCriterion,
    ReferenceCriterion,
    StringCriterion,
    TokenCriterion,
    parse_search,
    split_unescaped,
)

BASE = "http://127.0.0.1:8000/fhir"


def _one(resource_type: str, name: str, value: str) -> object:
    query = parse_search([resource_type], [(name, value)], base_url=BASE)
    assert not query.ignored
    (criterion,) = query.criteria[resource_type]
    return criterion


def test_token_keys_match_the_index_encoding() -> None:
    assert _one("Patient", "identifier", "sys|A,|B,C,sys|") == TokenCriterion(
        ("identifier=sys|A", "identifier=|B", "identifier=C", "identifier=sys|")
    )
    assert _one("Patient", "gender:not", "male") == TokenCriterion(("gender=male",), negate=True)


def test_escaped_commas_stay_in_the_value() -> None:
    assert split_unescaped(r"a\,b,c", ",") == ["a,b", "c"]
    assert _one("Patient", "family", r"a\,b") == StringCriterion("family", "start", ("a,b",))


def test_reference_forms_expand_to_targets() -> None:
    assert _one("Observation", "subject", f"{BASE}/Patient/1") == ReferenceCriterion(
        ("subject=Patient/1", f"subject={BASE}/Patient/1")
    )
    bare = _one("Observation", "subject", "1")
    assert isinstance(bare, ReferenceCriterion)
    targets = ("Group", "Device", "Patient", "Location")
    assert set(bare.keys) == {f"subject={p}{t}/1" for t in targets for p in ("", f"{BASE}/")}
    assert _one("Observation", "subject:identifier", "s|v") == TokenCriterion(
        ("subject:identifier=s|v",)
    )


def test_date_prefix_and_precision() -> None:
    criterion = _one("Patient", "birthdate", "ge1961-04")
    assert isinstance(criterion, DateCriterion)
    (comparison,) = criterion.comparisons
    assert comparison.prefix == "ge"
    assert comparison.low == datetime(1961, 4, 1, tzinfo=UTC)
    assert comparison.high == datetime(1961, 4, 30, 23, 59, 59, 999999, tzinfo=UTC)


def test_quantity_value_system_code() -> None:
    criterion = _one("Observation", "value-quantity", "lt5.4|http://unitsofmeasure.org|mg")
    assert isinstance(criterion, NumberCriterion)
    (comparison,) = criterion.comparisons
    assert (comparison.prefix, comparison.value) == ("lt", Decimal("5.4"))
    assert (comparison.low, comparison.high) == (Decimal("5.35"), Decimal("5.45"))
    assert (comparison.system, comparison.code) == ("http://unitsofmeasure.org", "mg")


def test_composite_with_a_typed_last_component() -> None:
    criterion = _one("Observation", "code-value-quantity", "http://loinc.org|8480-6$gt140")
    assert isinstance(criterion, NumberCriterion)
    assert criterion.param == "code-value-quantity$http://loinc.org|8480-6"
    keyed = _one("Observation", "code-value-concept", "a|b$c|d")
    assert keyed == TokenCriterion(("code-value-concept=a|b$c|d",))


def test_chain_and_has() -> None:
    chain = _one("Observation", "subject:Patient.name", "x")
    assert chain == ChainCriterion(
        "subject", (("Patient", StringCriterion("name", "start", ("x",))),), BASE
    )
    has = _one("Patient", "_has:Observation:subject:code", "1")
    assert has == HasCriterion("Observation", "subject", TokenCriterion(("code=1",)), BASE)


def test_result_parameters() -> None:
    query = parse_search(
        ["Observation"],
        [
            ("_count", "5000"),
            ("_sort", "-date,_id"),
            ("_include:iterate", "Observation:subject:Patient"),
            ("_revinclude", "Provenance:target"),
            ("_elements", "code,value"),
            ("_total", "accurate"),
            ("foo", "bar"),
        ],
        base_url=BASE,
    )
    assert query.count == 1000
    assert [(k.code, k.descending) for k in query.sort] == [("date", True), ("_id", False)]
    assert query.includes[0].iterate and query.includes[0].target_type == "Patient"
    assert query.revincludes[0].source_type == "Provenance"
    assert query.elements == ("code", "value")
    assert query.ignored == ["foo"]


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("birthdate", "xx1961", InvalidSearch),
        ("birthdate", "1961-02-30", InvalidSearch),
        ("gender:contains", "x", UnsupportedModifier),
        ("family:below", "x", UnsupportedModifier),
        ("general-practitioner:Spaceship", "1", UnsupportedModifier),
        ("_count", "-5", InvalidSearch),
        ("_has:Observation:subject", "1", InvalidSearch),
        ("family", "", InvalidSearch),
        ("identifier", "a|b|c", InvalidSearch),
    ],
)
def test_refusals(name: str, value: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_search(["Patient"], [(name, value)], base_url=BASE)
