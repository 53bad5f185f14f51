"""Builders of valid R4 JSON for tests (no real people)."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import orjson

NATIONAL_ID = "https://waha.health/fhir/sid/national-id"
BUNDLE_ID_SYSTEM = "https://waha.health/fhir/sid/unit-bundle"
FIXTURES = Path(__file__).parent / "fixtures"

JSON = dict[str, Any]


def patient(national_id: str = "AB123456", family: str = "El Idrissi", **extra: Any) -> JSON:
    """Return a Patient with a national ID."""
    return {
        "resourceType": "Patient",
        "identifier": [{"system": NATIONAL_ID, "value": national_id}],
        "name": [{"family": family, "given": ["Fatima"]}],
        "gender": "female",
        "birthDate": "1961-04-02",
        **extra,
    }


def observation(subject: str, value: float = 72.0, code: str = "8867-4") -> JSON:
    """Return a heart-rate style vital-sign Observation."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2026-11-02T09:30:00Z",
        "valueQuantity": {
            "value": value,
            "unit": "/min",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def unit_bundle(
    national_id: str,
    *,
    observations: int = 10,
    bundle_id: str | None = None,
) -> JSON:
    """Return a unit transaction: conditional Patient + Encounter + Observations."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    encounter_url = f"urn:uuid:{uuid.uuid4()}"
    entries: list[JSON] = [
        {
            "fullUrl": patient_url,
            "resource": patient(national_id),
            "request": {
                "method": "POST",
                "url": "Patient",
                "ifNoneExist": f"identifier={NATIONAL_ID}|{national_id}",
            },
        },
        {
            "fullUrl": encounter_url,
            "resource": {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "FLD",
                },
                "subject": {"reference": patient_url},
                "period": {"start": "2026-11-02T09:00:00Z", "end": "2026-11-02T09:40:00Z"},
            },
            "request": {"method": "POST", "url": "Encounter"},
        },
    ]
    for position in range(observations):
        resource = observation(patient_url, 60.0 + position)
        resource["encounter"] = {"reference": encounter_url}
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": resource,
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "identifier": {"system": BUNDLE_ID_SYSTEM, "value": bundle_id or str(uuid.uuid4())},
        "entry": entries,
    }


def load_fixture(relative: str) -> JSON:
    """Load a JSON fixture file as a fresh dict."""
    return copy.deepcopy(orjson.loads((FIXTURES / relative).read_bytes()))
