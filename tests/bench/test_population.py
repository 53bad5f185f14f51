"""Tests of the synthetic mobile-unit population generator."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from bench import population
from bench.population import (
    DEMO_SEED,
    SID_NATIONAL_ID,
    SID_UNIT_BUNDLE,
    SID_UNIT_RECORD_PREFIX,
    SPECIALTIES,
    demo_dataset,
    history_patient,
    make_units,
    patient_history_bundles,
    reference_resources,
    unit_bundle_12,
    visit_bundles,
    visit_plan,
)

EXAMPLE_BUNDLE = Path(__file__).resolve().parents[3] / "shared" / "examples" / "unit-bundle.json"

JSONObject = dict[str, Any]


def _references(node: object) -> Iterator[str]:
    """Yield every Reference.reference value anywhere in a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _canonical(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@pytest.fixture(scope="module")
def demo() -> tuple[list[JSONObject], list[JSONObject]]:
    """Build the demo dataset once for the module."""
    return demo_dataset()


def test_same_seed_gives_identical_json() -> None:
    assert _canonical(demo_dataset(7)) == _canonical(demo_dataset(7))
    first = [unit_bundle_12(7, i, shared_patients=50) for i in range(20)]
    second = [unit_bundle_12(7, i, shared_patients=50) for i in range(20)]
    assert _canonical(first) == _canonical(second)


def test_different_seeds_give_different_bundles() -> None:
    assert _canonical(demo_dataset(1)[1]) != _canonical(demo_dataset(2)[1])
    one = unit_bundle_12(1, 0, shared_patients=50)["identifier"]["value"]
    two = unit_bundle_12(2, 0, shared_patients=50)["identifier"]["value"]
    assert one != two


def test_every_bundle_and_reference_resource_validates(
    demo: tuple[list[JSONObject], list[JSONObject]],
) -> None:
    references, bundles = demo
    bundle_model = get_fhir_model_class("Bundle")
    for resource in references:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for bundle in bundles:
        bundle_model.model_validate(bundle)
    for i in range(30):
        bundle_model.model_validate(unit_bundle_12(3, i, shared_patients=40))


def test_bundles_follow_the_unit_profile(
    demo: tuple[list[JSONObject], list[JSONObject]],
) -> None:
    _, bundles = demo
    types: Counter[str] = Counter()
    for bundle in bundles:
        assert bundle["type"] == "transaction"
        assert bundle["identifier"]["system"] == SID_UNIT_BUNDLE
        patient_entry = bundle["entry"][0]
        assert patient_entry["resource"]["resourceType"] == "Patient"
        criteria = patient_entry["request"]["ifNoneExist"]
        identifiers = patient_entry["resource"]["identifier"]
        assert any(criteria == f"identifier={i['system']}|{i['value']}" for i in identifiers)
        encounter = bundle["entry"][1]["resource"]
        assert encounter["class"]["code"] in {"AMB", "FLD"}
        assert encounter["serviceProvider"]["reference"].startswith("Organization/unit-")
        for entry in bundle["entry"]:
            resource = entry["resource"]
            types[resource["resourceType"]] += 1
            assert entry["fullUrl"].startswith("urn:uuid:")
            assert entry["request"]["method"] == "POST"
            if resource["resourceType"] == "Observation":
                assert resource["category"][0]["coding"][0]["code"] == "vital-signs"
                assert resource["valueQuantity"]["system"] == "http://unitsofmeasure.org"
                assert "effectiveDateTime" in resource
            if resource["resourceType"] == "ServiceRequest":
                assert resource["category"][0]["coding"][0]["code"] == "tele-expertise"
                assert resource["performerType"]["coding"][0]["code"] in SPECIALTIES
            assert resource["resourceType"] not in {"Media", "Binary"}
    assert types["Condition"] > 0
    assert types["ServiceRequest"] > 0


def test_identifiers_and_full_urls_are_unique(
    demo: tuple[list[JSONObject], list[JSONObject]],
) -> None:
    _, bundles = demo
    bench = [unit_bundle_12(5, i, shared_patients=10) for i in range(200)]
    keys = [bundle["identifier"]["value"] for bundle in bundles + bench]
    assert len(keys) == len(set(keys))
    full_urls = [entry["fullUrl"] for bundle in bundles + bench for entry in bundle["entry"]]
    assert len(full_urls) == len(set(full_urls))


def test_national_ids_are_unique_per_person() -> None:
    plan = visit_plan(11, patients=2_000, visits_per_patient=1, units=4)
    owner: dict[str, int] = {}
    for visit in plan:
        national_id = visit.patient.national_id
        if national_id is not None:
            assert owner.setdefault(national_id, visit.patient.index) == visit.patient.index
    with_id = {visit.patient.index for visit in plan if visit.patient.national_id}
    assert 0 < len(with_id) < len({visit.patient.index for visit in plan})


def test_patients_without_national_id_use_the_unit_record_number(
    demo: tuple[list[JSONObject], list[JSONObject]],
) -> None:
    _, bundles = demo
    record_only = [
        bundle["entry"][0]
        for bundle in bundles
        if not any(
            i["system"] == SID_NATIONAL_ID for i in bundle["entry"][0]["resource"]["identifier"]
        )
    ]
    assert record_only
    for entry in record_only:
        assert entry["request"]["ifNoneExist"].startswith(
            f"identifier={SID_UNIT_RECORD_PREFIX}unit-0"
        )


def test_unit_bundle_12_shape_and_shared_pool() -> None:
    bundles = [unit_bundle_12(9, i, shared_patients=5) for i in range(40)]
    criteria: Counter[str] = Counter()
    for bundle in bundles:
        entries = bundle["entry"]
        assert len(entries) == 12
        assert [e["resource"]["resourceType"] for e in entries] == (
            ["Patient", "Encounter"] + ["Observation"] * 10
        )
        assert entries[0]["request"]["ifNoneExist"].startswith(f"identifier={SID_NATIONAL_ID}|")
        codes = {e["resource"]["code"]["coding"][0]["code"] for e in entries[2:]}
        assert len(codes) == 10
        criteria[entries[0]["request"]["ifNoneExist"]] += 1
    # A pool of 5 shared by 40 bundles: the same patients come back, so clients collide.
    assert len(criteria) <= 5
    assert max(criteria.values()) > 1


def test_references_resolve_in_bundle_or_reference_data(
    demo: tuple[list[JSONObject], list[JSONObject]],
) -> None:
    references, bundles = demo
    known = {f"{r['resourceType']}/{r['id']}" for r in references}
    for resource in references:
        for reference in _references(resource):
            assert reference in known, reference
    bench = [unit_bundle_12(4, i, shared_patients=100) for i in range(100)]
    for bundle in bundles + bench:
        local = {entry["fullUrl"] for entry in bundle["entry"]}
        for reference in _references(bundle):
            assert reference in local or reference in known, reference


def test_reference_resources_come_in_dependency_order() -> None:
    seen: set[str] = set()
    for resource in reference_resources(DEMO_SEED, units=4, months=1):
        for reference in _references(resource):
            assert reference in seen, reference
        seen.add(f"{resource['resourceType']}/{resource['id']}")


def test_demo_has_the_resources_the_example_bundle_references(
    demo: tuple[list[JSONObject], list[JSONObject]],
) -> None:
    references, bundles = demo
    # The shared example lives beside the repository in the workspace; a bare checkout
    # still checks the two ids it references.
    wanted = {"Location/stop-sidi-bouzid-2026-11-18", "Organization/unit-01"}
    if EXAMPLE_BUNDLE.exists():
        example = json.loads(EXAMPLE_BUNDLE.read_text(encoding="utf-8"))
        wanted |= {
            reference
            for reference in _references(example)
            if reference.startswith(("Location/", "Organization/"))
        }
    assert "Organization/unit-01" in wanted
    known = {f"{r['resourceType']}/{r['id']}" for r in references}
    assert wanted <= known
    for unit in ("unit-01", "unit-02"):
        assert f"Device/{unit}" in known
        assert f"Organization/{unit}" in known
    providers = {
        bundle["entry"][1]["resource"]["serviceProvider"]["reference"] for bundle in bundles
    }
    assert providers == {"Organization/unit-01", "Organization/unit-02"}


def test_reference_resources_shape() -> None:
    resources = {f"{r['resourceType']}/{r['id']}": r for r in reference_resources()}
    unit = resources["Organization/unit-01"]
    assert unit["partOf"] == {"reference": "Organization/region-marrakech-safi"}
    assert resources["Organization/unit-02"]["partOf"] == {
        "reference": "Organization/region-oriental"
    }
    device = resources["Device/unit-01"]
    assert device["status"] == "active"
    assert device["owner"] == {"reference": "Organization/unit-01"}
    assert device["identifier"] == [
        {"system": "https://waha.health/fhir/sid/unit", "value": "unit-01"}
    ]
    stop = resources["Location/stop-sidi-bouzid-2026-11-18"]
    assert stop["address"]["city"] == "Sidi Bouzid"
    assert stop["address"]["state"] == "Marrakech-Safi"
    assert stop["address"]["country"] == "MA"
    assert stop["managingOrganization"] == {"reference": "Organization/region-marrakech-safi"}
    assert {"latitude", "longitude"} <= stop["position"].keys()


def test_units_and_visits_cover_larger_populations() -> None:
    units = make_units(6)
    assert [u.id for u in units][:2] == ["unit-01", "unit-02"]
    assert units[0].region.slug == "marrakech-safi"
    assert units[1].region.slug == "oriental"
    communes = [c.slug for u in units for c in u.communes]
    assert len(communes) == len(set(communes))
    bundles = list(
        visit_bundles(3, patients=60, visits_per_patient=2, units=6, start=date(2027, 1, 1))
    )
    providers = {b["entry"][1]["resource"]["serviceProvider"]["reference"] for b in bundles}
    assert len(providers) == 6
    with pytest.raises(ValueError, match="units must be between"):
        make_units(0)


def test_patient_history_bundles_share_one_patient() -> None:
    bundles = patient_history_bundles(8, visits=50)
    assert len(bundles) == 50
    criteria = {bundle["entry"][0]["request"]["ifNoneExist"] for bundle in bundles}
    national_id = history_patient(8).national_id
    assert criteria == {f"identifier={SID_NATIONAL_ID}|{national_id}"}
    assert len({bundle["identifier"]["value"] for bundle in bundles}) == 50
    bundle_model = get_fhir_model_class("Bundle")
    for bundle in bundles[:5]:
        bundle_model.model_validate(bundle)


def test_reference_bundles_put_every_resource_in_order() -> None:
    from bench.loader import bundle_unit, reference_bundles  # noqa: PLC0415 - needs fhir_api

    resources = reference_resources()
    bundles = reference_bundles(resources, chunk=50)
    assert [len(b["entry"]) for b in bundles][:-1] == [50] * (len(bundles) - 1)
    flat = [entry for bundle in bundles for entry in bundle["entry"]]
    assert [entry["resource"] for entry in flat] == resources
    for entry in flat:
        resource = entry["resource"]
        assert entry["request"] == {
            "method": "PUT",
            "url": f"{resource['resourceType']}/{resource['id']}",
        }
    get_fhir_model_class("Bundle").model_validate(bundles[0])
    _, visits = demo_dataset()
    assert {bundle_unit(bundle) for bundle in visits} == {"unit-01", "unit-02"}


def test_record_numbers_of_two_populations_never_coincide() -> None:
    units = population.make_units(2)
    first = {
        population.patient_profile(1, n, units=units).record_number(units[0]) for n in range(200)
    }
    second = {
        population.patient_profile(2, n, units=units).record_number(units[0]) for n in range(200)
    }
    assert len(first) == len(second) == 200
    assert first.isdisjoint(second)
