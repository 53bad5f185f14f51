"""Encoding helpers shared by ingest and search."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from fhir_api.search_index import (
    canonical_values,
    date_range,
    decimal_range,
    encode_token,
    normalize_string,
    reference_query_keys,
    reference_value,
    string_entries,
    token_query_key,
)
from fhir_api.search_index.encoding import number_bounds, reference_type


def test_token_keys_with_and_without_system() -> None:
    assert encode_token("code", "http://loinc.org", "8480-6") == [
        "code=http://loinc.org|8480-6",
        "code=8480-6",
        "code=http://loinc.org|",
    ]
    assert encode_token("gender", None, "female") == ["gender=|female", "gender=female"]
    assert token_query_key("code", "http://loinc.org|8480-6") in encode_token(
        "code", "http://loinc.org", "8480-6"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  El   Idrissi ", "el idrissi"),
        ("Zoë Müller-Lüdenscheidt", "zoe muller-ludenscheidt"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),
        ("الإدريسي", "الادريسي"),
        ("أحمد", "احمد"),
        ("مُحَمَّد", "محمد"),
        ("مصطفى", "مصطفي"),
        ("فاطمة", "فاطمه"),
        ("عـــلي", "علي"),
    ],
)
def test_normalize_string(text: str, expected: str) -> None:
    assert normalize_string(text) == expected


def test_arabic_spelling_variants_normalise_equal() -> None:
    assert normalize_string("الإدريسي") == normalize_string("الادريسي")
    assert normalize_string("آمنة") == normalize_string("امنه")


def test_multi_word_values_add_one_entry_per_word() -> None:
    assert string_entries("family", "El Idrissi") == (
        ("family", "el idrissi", "El Idrissi"),
        ("family", "el", "El Idrissi"),
        ("family", "idrissi", "El Idrissi"),
    )
    assert string_entries("family", "Idrissi") == (("family", "idrissi", "Idrissi"),)
    assert string_entries("family", "   ") == ()


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2024", datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 12, 31, 23, 59, 59, 999999, UTC)),
        (
            "2024-02",
            datetime(2024, 2, 1, tzinfo=UTC),
            datetime(2024, 2, 29, 23, 59, 59, 999999, UTC),
        ),
        (
            "2023-02-28",
            datetime(2023, 2, 28, tzinfo=UTC),
            datetime(2023, 2, 28, 23, 59, 59, 999999, UTC),
        ),
        (
            "2024-05-03T10:15:00+02:00",
            datetime(2024, 5, 3, 8, 15, tzinfo=UTC),
            datetime(2024, 5, 3, 8, 15, 0, 999999, UTC),
        ),
        (
            "2024-05-03T10:15:00",
            datetime(2024, 5, 3, 10, 15, tzinfo=UTC),
            datetime(2024, 5, 3, 10, 15, 0, 999999, UTC),
        ),
        (
            "2024-05-03T10:15:00.25Z",
            datetime(2024, 5, 3, 10, 15, 0, 250000, UTC),
            datetime(2024, 5, 3, 10, 15, 0, 259999, UTC),
        ),
        (
            "2024-05-03T10:15Z",
            datetime(2024, 5, 3, 10, 15, tzinfo=UTC),
            datetime(2024, 5, 3, 10, 15, 59, 999999, UTC),
        ),
    ],
)
def test_date_ranges_follow_precision(value: str, low: datetime, high: datetime) -> None:
    assert date_range(value) == (low, high)


@pytest.mark.parametrize(
    "value", ["", "soon", "2024-13", "2024-02-30", "2024-05-03T25:00:00Z", "2024-05-03X10:00"]
)
def test_bad_dates_give_nothing(value: str) -> None:
    assert date_range(value) is None


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        (Decimal("5.4"), "5.35", "5.45"),
        (Decimal("5.40"), "5.395", "5.405"),
        (Decimal("100"), "99.5", "100.5"),
        (Decimal("1E+2"), "50", "150"),
        (Decimal("0.001"), "0.0005", "0.0015"),
    ],
)
def test_decimal_precision_bounds(value: Decimal, low: str, high: str) -> None:
    assert decimal_range(value) == (Decimal(low), Decimal(high))


def test_number_bounds_from_json_numbers() -> None:
    assert number_bounds(5.4) == (Decimal("5.4"), Decimal("5.35"), Decimal("5.45"))
    assert number_bounds(5) == (Decimal(5), Decimal("4.5"), Decimal("5.5"))
    assert number_bounds(5.0) == (Decimal("5.0"), Decimal("4.95"), Decimal("5.05"))
    assert number_bounds(True) is None
    assert number_bounds("abc") is None
    assert number_bounds(float("nan")) is None


def test_reference_forms() -> None:
    assert reference_value("Patient/123") == "Patient/123"
    assert reference_value("Patient/123/_history/4") == "Patient/123"
    assert reference_value("http://x.org/fhir/Patient/1") == "http://x.org/fhir/Patient/1"
    assert reference_value("#contained") is None
    urn = "urn:uuid:0c3e1c5a-1f7e-4c5b-9d22-7c0a0f2c6b11"
    assert reference_value(urn) == urn
    assert reference_type("http://x.org/fhir/Patient/1/_history/2") == "Patient"
    assert reference_type("urn:uuid:abc") is None
    assert canonical_values("http://x.org/ValueSet/v|1.0") == [
        "http://x.org/ValueSet/v",
        "http://x.org/ValueSet/v|1.0",
    ]


def test_reference_query_keys() -> None:
    assert reference_query_keys("subject", "Patient/1", ("Patient", "Group")) == [
        "subject=Patient/1"
    ]
    assert reference_query_keys("subject", "1", ("Patient", "Group")) == [
        "subject=Patient/1",
        "subject=Group/1",
    ]
