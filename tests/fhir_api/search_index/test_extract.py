"""extract_index on hand-made resources: encodings, composites, compartments, odd input."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from fhir_api.search_index import (
    DATE_MAX,
    DATE_MIN,
    DECIMAL_MAX,
    UnknownResourceType,
    extract_index,
)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _blood_pressure() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": "bp-1",
        "meta": {
            "lastUpdated": "2024-05-03T10:00:00Z",
            "profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns|4.0.1"],
            "tag": [{"system": "https://waha.health/tags", "code": "unit-01"}],
            "source": "https://waha.health/units/unit-01",
        },
        "status": "final",
        "category": [{"coding": [{"code": "vital-signs"}], "text": "Vital Signs"}],
        "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure"}]},
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1/_history/2"},
        "performer": [
            {"reference": "Practitioner/dr-1"},
            {"reference": "http://other.org/fhir/Patient/p9"},
            {"identifier": {"system": "https://waha.health/sid/staff", "value": "N-7"}},
        ],
        "effectivePeriod": {"start": "2024-05-03"},
        "component": [
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                "valueQuantity": {"value": 120, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
            {
                "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                "valueQuantity": {"value": 80.5, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
        ],
    }


def test_observation_tokens_references_and_resource_level() -> None:
    index = extract_index(_blood_pressure())
    assert {"code=http://loinc.org|85354-9", "code=85354-9", "code=http://loinc.org|"} <= set(
        index.tokens
    )
    assert {"category=|vital-signs", "category=vital-signs", "status=final"} <= set(index.tokens)
    assert "_tag=https://waha.health/tags|unit-01" in index.tokens
    # _id and _lastUpdated are columns of every row, never index entries.
    assert not any(token.startswith("_id=") for token in index.tokens)
    assert "performer:identifier=https://waha.health/sid/staff|N-7" in index.tokens
    assert len(index.tokens) == len(set(index.tokens))
    assert {
        "subject=Patient/p1",
        "patient=Patient/p1",
        "encounter=Encounter/e1",
        "performer=Practitioner/dr-1",
        "performer=http://other.org/fhir/Patient/p9",
    } <= set(index.references)
    assert ("_profile", "http://hl7.org/fhir/StructureDefinition/vitalsigns|4.0.1") in index.uris
    assert ("_source", "https://waha.health/units/unit-01") in index.uris
    assert ("code:text", "blood pressure", "Blood pressure") in index.strings
    # `:text` is indexed whole (starts-with on the display), not word by word.
    assert ("category:text", "vital signs", "Vital Signs") in index.strings
    assert ("category:text", "vital", "Vital Signs") not in index.strings
    assert not any(param == "_lastUpdated" for param, _, _ in index.dates)


def test_open_period_reaches_the_end_of_time() -> None:
    index = extract_index(_blood_pressure())
    assert ("date", datetime(2024, 5, 3, tzinfo=UTC), DATE_MAX) in index.dates
    observation = _blood_pressure()
    observation["effectivePeriod"] = {"end": "2024"}
    index = extract_index(observation)
    assert ("date", DATE_MIN, datetime(2024, 12, 31, 23, 59, 59, 999999, UTC)) in index.dates


def test_observation_compartment_ignores_absolute_patient_urls() -> None:
    assert extract_index(_blood_pressure()).patient_ids == ["p1"]


def test_quantity_precision_and_units() -> None:
    observation = _blood_pressure()
    observation["valueQuantity"] = {"value": Decimal("5.40"), "unit": "mmol/L"}
    index = extract_index(observation)
    assert (
        "value-quantity",
        Decimal("5.40"),
        Decimal("5.395"),
        Decimal("5.405"),
        None,
        "mmol/L",
    ) in index.quantities
    assert (
        "component-value-quantity",
        Decimal("80.5"),
        Decimal("80.45"),
        Decimal("80.55"),
        UCUM,
        "mm[Hg]",
    ) in index.quantities


def test_token_quantity_composites() -> None:
    index = extract_index(_blood_pressure())
    rows = {row[0]: row for row in index.quantities if row[0].startswith("component-code-value")}
    assert rows["component-code-value-quantity$http://loinc.org|8480-6"][1] == Decimal(120)
    assert rows["component-code-value-quantity$8480-6"][2:4] == (Decimal("119.5"), Decimal("120.5"))
    assert rows["component-code-value-quantity$8462-4"][1] == Decimal("80.5")
    # Components are paired within one component only, never across.
    assert not any(
        row[0].endswith("8480-6") and row[1] == Decimal("80.5") for row in index.quantities
    )
    combo = {row[0] for row in index.quantities if row[0].startswith("combo-code-value-quantity$")}
    assert "combo-code-value-quantity$8462-4" in combo


def test_token_token_and_token_date_and_string_composites() -> None:
    observation = _blood_pressure()
    del observation["component"]
    observation["code"] = {"coding": [{"system": LOINC, "code": "72166-2"}]}
    observation["valueCodeableConcept"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "8517006"}]
    }
    index = extract_index(observation)
    assert {
        "code-value-concept=http://loinc.org|72166-2$http://snomed.info/sct|8517006",
        "code-value-concept=72166-2$8517006",
        "code-value-concept=72166-2$http://snomed.info/sct|8517006",
        "code-value-concept=http://loinc.org|72166-2$8517006",
    } <= set(index.tokens)
    del observation["valueCodeableConcept"]
    observation["valueDateTime"] = "2023-06"
    index = extract_index(observation)
    assert (
        "code-value-date$72166-2",
        datetime(2023, 6, 1, tzinfo=UTC),
        datetime(2023, 6, 30, 23, 59, 59, 999999, UTC),
    ) in index.dates
    del observation["valueDateTime"]
    observation["valueString"] = "Ex Smoker"
    index = extract_index(observation)
    assert ("code-value-string$http://loinc.org|72166-2", "ex smoker", "Ex Smoker") in index.strings


def test_document_reference_relationship_pairs_target_then_code() -> None:
    document = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"url": "Binary/b1"}}],
        "relatesTo": [{"code": "replaces", "target": {"reference": "DocumentReference/d0"}}],
    }
    index = extract_index(document)
    assert "relationship=DocumentReference/d0$|replaces" in index.tokens
    assert "relationship=DocumentReference/d0$replaces" in index.tokens
    assert "relatesto=DocumentReference/d0" in index.references
    assert index.patient_ids == ["p1"]


def test_molecular_sequence_coordinates_use_the_root_chromosome() -> None:
    sequence = {
        "resourceType": "MolecularSequence",
        "coordinateSystem": 0,
        "referenceSeq": {
            "chromosome": {"coding": [{"code": "1"}]},
            "windowStart": 10,
            "windowEnd": 99,
        },
        "variant": [{"start": 20, "end": 21}],
    }
    index = extract_index(sequence)
    names = {row[0] for row in index.quantities}
    assert "chromosome-variant-coordinate$1$variant-start" in names
    assert "chromosome-variant-coordinate$|1$variant-end" in names
    assert "chromosome-window-coordinate$1$window-end" in names


def test_patient_names_addresses_and_contacts() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [
            {
                "system": "https://waha.health/fhir/sid/national-id",
                "value": "AB123",
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NI"}
                    ],
                    "text": "National ID",
                },
            }
        ],
        "name": [{"family": "El Idrissi", "given": ["Fatima", "Zahra"], "text": "فاطمة الإدريسي"}],
        "telecom": [
            {"system": "phone", "value": "+212600000000"},
            {"system": "email", "value": "a@b.ma"},
        ],
        "address": [{"line": ["Douar Sidi Bouzid"], "city": "Safi", "country": "MA"}],
        "gender": "female",
        "birthDate": "1990",
        "active": True,
        "link": [{"other": {"reference": "Patient/p0"}, "type": "replaces"}],
    }
    index = extract_index(patient)
    tokens = set(index.tokens)
    assert "identifier=https://waha.health/fhir/sid/national-id|AB123" in tokens
    assert "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|NI|AB123" in tokens
    assert {"phone=phone|+212600000000", "email=email|a@b.ma", "telecom=+212600000000"} <= tokens
    assert "phone=email|a@b.ma" not in tokens
    assert {"active=true", "gender=female"} <= tokens
    strings = set(index.strings)
    assert ("family", "idrissi", "El Idrissi") in strings
    assert ("name", "el idrissi", "El Idrissi") in strings
    assert ("given", "zahra", "Zahra") in strings
    assert ("name", "الادريسي", "فاطمة الإدريسي") in strings
    assert ("address", "safi", "Safi") in strings and ("address-city", "safi", "Safi") in strings
    assert ("identifier:text", "national id", "National ID") in strings
    assert ("birthdate", datetime(1990, 1, 1, tzinfo=UTC)) == index.dates[0][:2]
    assert index.patient_ids == ["p1", "p0"]


def test_patient_deceased_is_a_boolean_token() -> None:
    alive = extract_index({"resourceType": "Patient", "id": "a"})
    assert "deceased=false" in alive.tokens
    dead = extract_index({"resourceType": "Patient", "id": "d", "deceasedDateTime": "2020"})
    assert "deceased=true" in dead.tokens
    not_dead = extract_index({"resourceType": "Patient", "id": "n", "deceasedBoolean": False})
    assert "deceased=false" in not_dead.tokens


def test_encounter_compartment_and_type_filtered_participants() -> None:
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "FLD"},
        "subject": {"reference": "Patient/p1"},
        "participant": [
            {"individual": {"reference": "Practitioner/dr-1"}},
            {"individual": {"reference": "RelatedPerson/rp-1"}},
            {"individual": {"type": "Practitioner", "identifier": {"value": "N-9"}}},
        ],
        "serviceProvider": {"reference": "Organization/unit-01"},
        "period": {"start": "2024-05-03T09:00:00Z", "end": "2024-05-03T09:30:00Z"},
    }
    index = extract_index(encounter)
    assert index.patient_ids == ["p1"]
    assert "practitioner=Practitioner/dr-1" in index.references
    assert "participant=RelatedPerson/rp-1" in index.references
    assert not any(ref.startswith("practitioner=RelatedPerson") for ref in index.references)
    assert "practitioner:identifier=N-9" in index.tokens
    assert "class=http://terminology.hl7.org/CodeSystem/v3-ActCode|FLD" in index.tokens
    assert "service-provider=Organization/unit-01" in index.references


def test_practitioner_is_in_no_patient_compartment() -> None:
    practitioner = {
        "resourceType": "Practitioner",
        "id": "dr-1",
        "name": [{"family": "Benali", "prefix": ["Dr."]}],
    }
    index = extract_index(practitioner)
    assert index.patient_ids == []
    assert ("name", "dr.", "Dr.") in index.strings


def test_a_quantity_unit_unlike_its_code_is_indexed_without_a_system() -> None:
    observation = _blood_pressure()
    observation["valueQuantity"] = {
        "value": 26,
        "unit": "pack-years",
        "system": UCUM,
        "code": "{pack-years}",
    }
    rows = [row for row in extract_index(observation).quantities if row[0] == "value-quantity"]
    assert [(system, code) for *_, system, code in rows] == [
        (UCUM, "{pack-years}"),
        (None, "pack-years"),
    ]


def test_money_and_range_quantities() -> None:
    claim_item = {
        "resourceType": "ChargeItem",
        "status": "billed",
        "code": {"text": "visit"},
        "subject": {"reference": "Patient/p1"},
        "priceOverride": {"value": 150.0, "currency": "MAD"},
    }
    index = extract_index(claim_item)
    assert (
        "price-override",
        Decimal("150.0"),
        Decimal("149.95"),
        Decimal("150.05"),
        "urn:iso:std:iso:4217",
        "MAD",
    ) in index.quantities
    assessment = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "prediction": [{"probabilityRange": {"low": {"value": 0.2}}}],
    }
    index = extract_index(assessment)
    assert index.quantities == [
        ("probability", Decimal("0.2"), Decimal("0.15"), DECIMAL_MAX, None, None)
    ]


def test_canonical_references_with_and_without_version() -> None:
    response = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "questionnaire": "https://waha.health/Questionnaire/intake|2",
    }
    references = set(extract_index(response).references)
    assert "questionnaire=https://waha.health/Questionnaire/intake" in references
    assert "questionnaire=https://waha.health/Questionnaire/intake|2" in references


def test_minimal_and_odd_resources_do_not_crash() -> None:
    assert extract_index({"resourceType": "Observation"}).tokens == []
    odd = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"extension": [{"url": "http://x/absent", "valueCode": "unknown"}]},
        "subject": {"reference": "#p1"},
        "performer": [
            {"reference": "urn:uuid:0c3e1c5a-1f7e-4c5b-9d22-7c0a0f2c6b11"},
            {"display": "someone"},
            {"reference": ""},
        ],
        "effectiveDateTime": "not a date",
        "valueQuantity": {"unit": "mg"},
        "extension": [{"url": "http://x/e", "valueString": "x"}],
    }
    index = extract_index(odd)
    assert index.patient_ids == []
    assert not any(ref.startswith("subject=") for ref in index.references)
    assert "performer=urn:uuid:0c3e1c5a-1f7e-4c5b-9d22-7c0a0f2c6b11" in index.references
    assert index.dates == [] and index.quantities == []


def test_unknown_or_unsupported_types_are_refused() -> None:
    with pytest.raises(UnknownResourceType):
        extract_index({"resourceType": "NotAResource"})
    with pytest.raises(UnknownResourceType):
        extract_index({"resourceType": "MedicinalProduct"})
    with pytest.raises(UnknownResourceType):
        extract_index({"id": "x"})


def test_every_sample_resource_extracts(sample_resources: list[dict[str, Any]]) -> None:
    for resource in sample_resources:
        index = extract_index(resource)
        assert len(index.references) == len(set(index.references))
        for _, start, end in index.dates:
            assert start <= end and start.tzinfo is not None
        for _, value, bottom, top, _, _ in index.quantities:
            assert bottom <= value <= top
