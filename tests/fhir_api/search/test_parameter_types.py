"""Each search parameter type with its modifiers and prefixes, over HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.builders import NATIONAL_ID, observation, patient
from tests.fhir_api.search.helpers import create, found

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def test_string_default_is_case_and_accent_insensitive_prefix(client: TestClient) -> None:
    idrissi = create(client, patient("ST1", family="El Idrissi"))
    accented = create(client, patient("ST2", family="Bénali"))
    assert found(client, "/fhir/Patient?name=idrissi") == {idrissi}
    assert found(client, "/fhir/Patient?name=EL%20IDR") == {idrissi}
    assert found(client, "/fhir/Patient?family=benali") == {accented}
    assert found(client, "/fhir/Patient?family=BÉN") == {accented}
    assert found(client, "/fhir/Patient?name=drissi") == set()
    assert found(client, "/fhir/Patient?name=idrissi,benali") == {idrissi, accented}


def test_string_prefixes_with_quotes_and_like_characters_match_literally(
    client: TestClient,
) -> None:
    # Prefixes are written into the SQL text: quotes and LIKE's own characters must stay data.
    quoted = create(client, patient("SQ1", family="O'Brien"))
    percent = create(client, patient("SQ2", family="100%_Sure/Yes"))
    create(client, patient("SQ3", family="100x Sure"))
    assert found(client, "/fhir/Patient?family=o'bri") == {quoted}
    assert found(client, "/fhir/Patient?family=o''bri") == set()
    assert found(client, "/fhir/Patient?family=100%25_") == {percent}
    assert found(client, "/fhir/Patient?family=100%25_sure/") == {percent}
    assert found(client, "/fhir/Patient?family=100_") == set()
    assert found(client, "/fhir/Patient?family='; DROP TABLE fhir_resource; --") == set()


def test_string_exact_and_contains(client: TestClient) -> None:
    idrissi = create(client, patient("SE1", family="El Idrissi"))
    assert found(client, "/fhir/Patient?family:exact=El%20Idrissi") == {idrissi}
    assert found(client, "/fhir/Patient?family:exact=el%20idrissi") == set()
    assert found(client, "/fhir/Patient?family:exact=Idrissi") == set()
    assert found(client, "/fhir/Patient?family:contains=dris") == {idrissi}
    assert found(client, "/fhir/Patient?family:contains=xyz") == set()


def test_arabic_names_match_across_hamza_variants(client: TestClient) -> None:
    with_hamza = create(client, patient("AR1", family="الإدريسي"))
    without = create(client, patient("AR2", family="الادريسي"))
    other = create(client, patient("AR3", family="بنعلي"))
    assert found(client, "/fhir/Patient?name=الإدريسي") == {with_hamza, without}
    assert found(client, "/fhir/Patient?family=الادريسي") == {with_hamza, without}
    assert found(client, "/fhir/Patient?name=بنع") == {other}


def test_token_forms(client: TestClient) -> None:
    with_system = create(client, patient("TK1"))
    no_system = create(client, patient(identifier=[{"value": "TK1"}]))
    assert found(client, f"/fhir/Patient?identifier={NATIONAL_ID}|TK1") == {with_system}
    assert found(client, "/fhir/Patient?identifier=TK1") == {with_system, no_system}
    assert found(client, "/fhir/Patient?identifier=|TK1") == {no_system}
    assert with_system in found(client, f"/fhir/Patient?identifier={NATIONAL_ID}|")
    assert no_system not in found(client, f"/fhir/Patient?identifier={NATIONAL_ID}|")
    assert found(client, "/fhir/Patient?gender=female") >= {with_system, no_system}


def test_token_not_text_and_of_type(client: TestClient) -> None:
    male = create(client, patient("TN1", gender="male"))
    female = create(client, patient("TN2"))
    assert male in found(client, "/fhir/Patient?gender:not=female")
    assert female not in found(client, "/fhir/Patient?gender:not=female")
    heart = observation(f"Patient/{male}")
    heart["code"]["text"] = "Fréquence cardiaque"
    heart_id = create(client, heart)
    assert found(client, "/fhir/Observation?code:text=frequence") == {heart_id}
    typed = create(
        client,
        patient(
            identifier=[
                {
                    "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                    "system": "urn:waha:mr",
                    "value": "MR-77",
                }
            ]
        ),
    )
    assert found(client, f"/fhir/Patient?identifier:of-type={V2_0203}|MR|MR-77") == {typed}
    assert found(client, f"/fhir/Patient?identifier:of-type={V2_0203}|NI|MR-77") == set()


def test_reference_forms(client: TestClient) -> None:
    subject = create(client, patient("RF1"))
    other = create(client, patient("RF2"))
    mine = create(client, observation(f"Patient/{subject}"))
    create(client, observation(f"Patient/{other}"))
    base = "http://127.0.0.1:8000/fhir"
    assert found(client, f"/fhir/Observation?subject=Patient/{subject}") == {mine}
    assert found(client, f"/fhir/Observation?subject={subject}") == {mine}
    assert found(client, f"/fhir/Observation?subject={base}/Patient/{subject}") == {mine}
    assert found(client, f"/fhir/Observation?subject:Patient={subject}") == {mine}
    assert found(client, f"/fhir/Observation?subject:Group={subject}") == set()
    assert found(client, f"/fhir/Observation?patient={subject}") == {mine}


def test_reference_identifier_modifier(client: TestClient) -> None:
    logical = observation("Patient/unused")
    logical["subject"] = {"identifier": {"system": NATIONAL_ID, "value": "LOGICAL-1"}}
    by_identifier = create(client, logical)
    assert found(client, f"/fhir/Observation?subject:identifier={NATIONAL_ID}|LOGICAL-1") == {
        by_identifier
    }
    assert found(client, "/fhir/Observation?subject:identifier=LOGICAL-2") == set()


def _birth(client: TestClient, birth_date: str) -> str:
    return create(client, patient(f"BD-{birth_date}", birthDate=birth_date))


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        ("1961", True),
        ("1961-04", True),
        ("1961-04-02", False),  # a month is not inside one day
        ("eq1961-04", True),
        ("ne1961-04", False),
        ("ne1961-05", True),
        ("gt1961-04-15", True),  # the month extends after the 15th
        ("gt1961-04", False),
        ("lt1961-04-15", True),
        ("lt1961-04-01", False),
        ("ge1961-04", True),
        ("ge1961-05", False),
        ("le1961-04", True),
        ("le1961-03", False),
        ("sa1961-03-31", True),
        ("sa1961-04-01", False),
        ("eb1961-05-01", True),
        ("eb1961-04-30", False),
        ("ap1961-04", True),
        ("ap1990", False),
    ],
)
def test_partial_date_prefixes(client: TestClient, query: str, matches: bool) -> None:
    month = _birth(client, "1961-04")
    assert (month in found(client, f"/fhir/Patient?birthdate={query}")) is matches


def test_datetime_with_zone_and_precision(client: TestClient) -> None:
    resource = observation("Patient/x")
    resource.pop("subject")
    resource["effectiveDateTime"] = "2026-11-02T10:30:00+01:00"
    seen = create(client, resource)
    assert found(client, "/fhir/Observation?date=2026-11-02T09:30:00Z") == {seen}
    assert found(client, "/fhir/Observation?date=2026-11-02T10:30:00%2B01:00") == {seen}
    # An unescaped '+' arrives as a space; it is read back as the zone sign.
    assert found(client, "/fhir/Observation?date=2026-11-02T10:30:00+01:00") == {seen}
    assert found(client, "/fhir/Observation?date=ge2026-11-02T09:31") == set()
    assert found(client, "/fhir/Observation?date=2026-11-02T09:30") == {seen}


def _encounter(subject: str, period: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "FLD"},
        "subject": {"reference": subject},
        "period": period,
    }


def test_period_edges(client: TestClient) -> None:
    subject = f"Patient/{create(client, patient('PE1'))}"
    closed = create(
        client,
        _encounter(subject, {"start": "2026-11-02T09:00:00Z", "end": "2026-11-02T09:40:00Z"}),
    )
    ongoing = create(client, _encounter(subject, {"start": "2025-06-01"}))
    assert found(client, "/fhir/Encounter?date=2026-11-02") == {closed}
    assert found(client, "/fhir/Encounter?date=gt2030-01-01") == {ongoing}
    assert found(client, "/fhir/Encounter?date=lt2026-01-01") == {ongoing}
    assert found(client, "/fhir/Encounter?date=sa2025-12-31") == {closed}
    assert found(client, "/fhir/Encounter?date=eb2026-12-01") == {closed}
    # Both prefixes are overlap tests (R4 "ge"/"le"), so the ongoing period matches too.
    both = "/fhir/Encounter?date=ge2026-11-02&date=le2026-11-02"
    assert found(client, both) == {closed, ongoing}
    assert found(client, "/fhir/Encounter?date=ge2026-11-03&date=le2026-11-04") == {ongoing}
    assert found(client, "/fhir/Encounter?date=ne2026-11-02") == {ongoing}


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        ("72", True),
        ("72.0", True),
        ("72.4", False),
        ("7.2e1", True),
        ("ne72", False),
        ("gt71", True),
        ("gt72", False),
        ("ge72", True),
        ("lt72", False),
        ("le72", True),
        ("ap70", True),
        ("ap50", False),
        (f"72|{UCUM}|/min", True),
        ("72||/min", True),
        (f"72|{UCUM}|mg", False),
        ("gt71|urn:other|/min", False),
    ],
)
def test_quantity_prefixes_precision_and_units(
    client: TestClient, query: str, matches: bool
) -> None:
    resource = observation("Patient/x", 72.0)
    resource.pop("subject")
    seen = create(client, resource)
    assert (seen in found(client, f"/fhir/Observation?value-quantity={query}")) is matches


def test_quantity_is_found_by_its_human_unit_as_well_as_its_code(client: TestClient) -> None:
    """R4: `number||unit` matches the code or the unit; `number|system|code` the code only."""
    resource = observation("Patient/x", 26.0)
    resource.pop("subject")
    resource["valueQuantity"] = {
        "value": 26,
        "unit": "pack-years",
        "system": UCUM,
        "code": "{pack-years}",
    }
    smoker = create(client, resource)
    assert smoker in found(client, "/fhir/Observation?value-quantity=26||pack-years")
    assert smoker in found(client, "/fhir/Observation?value-quantity=26||{pack-years}")
    assert smoker in found(client, f"/fhir/Observation?value-quantity=26|{UCUM}|{{pack-years}}")
    assert smoker not in found(client, f"/fhir/Observation?value-quantity=26|{UCUM}|pack-years")
    assert smoker not in found(client, "/fhir/Observation?value-quantity=27||pack-years")


def test_number_precision(client: TestClient) -> None:
    subject = create(client, patient("NU1"))
    risk = create(
        client,
        {
            "resourceType": "RiskAssessment",
            "status": "final",
            "subject": {"reference": f"Patient/{subject}"},
            "prediction": [{"probabilityDecimal": 0.45}],
        },
    )
    assert found(client, "/fhir/RiskAssessment?probability=0.45") == {risk}
    assert found(client, "/fhir/RiskAssessment?probability=0.5") == {risk}  # [0.45, 0.55)
    assert found(client, "/fhir/RiskAssessment?probability=0.4") == set()
    assert found(client, "/fhir/RiskAssessment?probability=gt0.4") == {risk}
    assert found(client, "/fhir/RiskAssessment?probability=lt0.4") == set()


def test_uri_below_and_above(client: TestClient) -> None:
    value_set = create(
        client,
        {
            "resourceType": "ValueSet",
            "status": "active",
            "url": "http://waha.health/fhir/ValueSet/vitals/heart",
        },
    )
    assert found(client, "/fhir/ValueSet?url=http://waha.health/fhir/ValueSet/vitals/heart") == {
        value_set
    }
    assert found(client, "/fhir/ValueSet?url=http://waha.health/fhir/ValueSet/vitals") == set()
    assert found(client, "/fhir/ValueSet?url:below=http://waha.health/fhir/ValueSet") == {value_set}
    above = "/fhir/ValueSet?url:above=http://waha.health/fhir/ValueSet/vitals/heart/v2"
    assert found(client, above) == {value_set}
    assert found(client, "/fhir/ValueSet?url:above=http://waha.health/fhir/Other") == set()


def test_composites(client: TestClient) -> None:
    resource = observation("Patient/x", 150.0, code="8480-6")
    resource.pop("subject")
    systolic = create(client, resource)
    concept = observation("Patient/x")
    concept.pop("subject")
    concept.pop("valueQuantity")
    concept["valueCodeableConcept"] = {"coding": [{"system": "urn:waha:finding", "code": "pos"}]}
    positive = create(client, concept)
    assert found(client, f"/fhir/Observation?code-value-quantity={LOINC}|8480-6$gt140") == {
        systolic
    }
    assert found(client, "/fhir/Observation?code-value-quantity=8480-6$lt140") == set()
    assert found(client, "/fhir/Observation?code-value-quantity=8480-6$150") == {systolic}
    query = f"/fhir/Observation?code-value-concept={LOINC}|8867-4$urn:waha:finding|pos"
    assert found(client, query) == {positive}
    assert found(client, "/fhir/Observation?code-value-concept=8867-4$neg") == set()


def test_composites_with_several_numbers_molecular_sequence(client: TestClient) -> None:
    chromosome = "http://terminology.hl7.org/CodeSystem/chromosome-human"
    sequence = create(
        client,
        {
            "resourceType": "MolecularSequence",
            "coordinateSystem": 0,
            "referenceSeq": {
                "chromosome": {"coding": [{"system": chromosome, "code": "1"}]},
                "windowStart": 22125500,
                "windowEnd": 22125510,
            },
            "variant": [
                {"start": 22125503, "end": 22125504, "observedAllele": "C", "referenceAllele": "T"}
            ],
        },
    )
    base = "/fhir/MolecularSequence?"
    assert found(client, base + "chromosome-variant-coordinate=1$ge22125500$le22125510") == {
        sequence
    }
    assert found(client, base + "chromosome-variant-coordinate=1$gt22125504$le22125510") == set()
    assert found(client, base + "chromosome-variant-coordinate=1$ge22125500$gt22125504") == set()
    assert found(client, base + "chromosome-variant-coordinate=2$ge22125500$le22125510") == set()
    window = f"chromosome-window-coordinate={chromosome}|1$22125500$22125510"
    assert found(client, base + window) == {sequence}
    either = "chromosome-variant-coordinate=2$1$1,1$lt22125504$gt22125503"
    assert found(client, base + either) == {sequence}
    response = client.get(base + "chromosome-variant-coordinate=1$ge22125500")
    assert response.status_code == 400


def test_missing_on_every_kind(client: TestClient) -> None:
    dated = create(client, patient("MI1"))
    undated = create(client, patient("MI2", birthDate=None))
    nameless = create(client, {"resourceType": "Patient", "gender": "other"})
    assert found(client, "/fhir/Patient?birthdate:missing=true") >= {undated}
    assert dated not in found(client, "/fhir/Patient?birthdate:missing=true")
    assert dated in found(client, "/fhir/Patient?birthdate:missing=false")
    assert nameless in found(client, "/fhir/Patient?name:missing=true")
    assert nameless in found(client, "/fhir/Patient?identifier:missing=true")
    assert nameless not in found(client, "/fhir/Patient?identifier:missing=false")
    observed = observation(f"Patient/{dated}")
    with_subject = create(client, observed)
    observed.pop("subject")
    without_subject = create(client, observed)
    assert found(client, "/fhir/Observation?subject:missing=true") == {without_subject}
    assert found(client, "/fhir/Observation?subject:missing=false") == {with_subject}
    assert found(client, "/fhir/Observation?value-quantity:missing=false") == {
        with_subject,
        without_subject,
    }
    assert found(client, "/fhir/Patient?organization:missing=false") == set()
