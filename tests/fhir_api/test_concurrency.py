"""Concurrent ingest over real connections: race-safe conditional create and replays."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import Engine, text

from fhir_api.repository import lock_key
from tests.builders import NATIONAL_ID, patient, unit_bundle

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def _post_all(
    base: str, bundles: list[dict[str, object]], headers: dict[str, str]
) -> list[httpx.Response]:
    def post(bundle: dict[str, object]) -> httpx.Response:
        with httpx.Client(base_url=base, timeout=60, headers=headers) as http:
            return http.post("/fhir", json=bundle, headers=FHIR_JSON)

    with ThreadPoolExecutor(max_workers=len(bundles)) as pool:
        return list(pool.map(post, bundles))


def _patient_ids(responses: list[httpx.Response]) -> set[str]:
    return {r.json()["entry"][0]["fullUrl"].rsplit("/", 1)[1] for r in responses}


@pytest.mark.parametrize("observations", [10, 300])
def test_twenty_concurrent_conditional_creates_make_one_patient(
    live_server: str,
    committed: Engine,
    observations: int,
    auth_headers: Callable[[str], dict[str, str]],
) -> None:
    national_id = f"RACE-{uuid.uuid4().hex[:8]}"
    bundles = [unit_bundle(national_id, observations=observations) for _ in range(20)]
    responses = _post_all(live_server, bundles, auth_headers("unit-01"))
    assert [r.status_code for r in responses] == [200] * 20, [r.text[:300] for r in responses]
    assert len(_patient_ids(responses)) == 1
    with committed.connect() as connection:
        patients = connection.execute(
            text("SELECT count(*) FROM fhir_resource WHERE resource_type = 'Patient'")
        ).scalar_one()
        encounters_pointing = connection.execute(
            text(
                "SELECT count(DISTINCT resource->'subject'->>'reference') FROM fhir_resource "
                "WHERE resource_type = 'Encounter'"
            )
        ).scalar_one()
    assert patients == 1
    assert encounters_pointing == 1


def test_in_flight_duplicates_wait_and_return_the_first_answer(
    live_server: str, committed: Engine, auth_headers: Callable[[str], dict[str, str]]
) -> None:
    bundle = unit_bundle(f"DUP-{uuid.uuid4().hex[:8]}", observations=200)
    responses = _post_all(
        live_server, [copy.deepcopy(bundle) for _ in range(8)], auth_headers("unit-01")
    )
    assert [r.status_code for r in responses] == [200] * 8
    bodies = [r.json() for r in responses]
    assert all(body == bodies[0] for body in bodies)
    with committed.connect() as connection:
        versions = connection.execute(
            text("SELECT count(*) FROM fhir_resource_version")
        ).scalar_one()
    assert versions == 202 + 1  # one bundle's entries, and its Provenance


def test_a_conditional_update_waits_for_the_lock_of_the_resource_it_found(
    live_server: str, committed: Engine, auth_headers: Callable[[str], dict[str, str]]
) -> None:
    """Writers by id (a patch, an update) hold it: they must not both write one next version."""
    admin = auth_headers("admin")
    national_id = f"LOCK-{uuid.uuid4().hex[:8]}"
    resource = patient(national_id)
    with httpx.Client(base_url=live_server, timeout=30, headers=admin) as http:
        created = http.post("/fhir/Patient", json=resource, headers=FHIR_JSON)
        assert created.status_code == 201, created.text
        patient_id = created.json()["id"]
    key = lock_key(f"res:Patient/{patient_id}")
    with committed.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        with ThreadPoolExecutor(max_workers=1) as pool:
            updated = pool.submit(
                lambda: httpx.put(
                    f"{live_server}/fhir/Patient?identifier={NATIONAL_ID}|{national_id}",
                    json={**resource, "gender": "male"},
                    headers={**admin, **FHIR_JSON},
                    timeout=30,
                )
            )
            # Not a timing assertion: the update cannot finish while the lock is held.
            with pytest.raises(TimeoutError):
                updated.result(timeout=1.0)
            holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            response = updated.result(timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["meta"]["versionId"] == "2"


def test_batches_writing_the_same_resources_in_opposite_orders_queue_without_deadlock(
    live_server: str, committed: Engine, auth_headers: Callable[[str], dict[str, str]]
) -> None:
    # Each batch entry keeps its locks to the batch's end: taken one by one in
    # entry order, two such batches deadlocked (a 503 for one of them).
    ids = [f"order-{uuid.uuid4().hex[:8]}" for _ in range(2)]

    def batch(order: list[str], gender: str) -> dict[str, object]:
        return {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {
                    "resource": {**patient(id=pid), "gender": gender},
                    "request": {"method": "PUT", "url": f"Patient/{pid}"},
                }
                for pid in order
            ],
        }

    bundles = [
        batch(ids if n % 2 == 0 else ids[::-1], "female" if n % 4 < 2 else "male")
        for n in range(16)
    ]
    responses = _post_all(live_server, bundles, auth_headers("admin"))
    assert [r.status_code for r in responses] == [200] * 16, [r.text[:300] for r in responses]
    for response in responses:
        statuses = [entry["response"]["status"][:3] for entry in response.json()["entry"]]
        assert set(statuses) <= {"200", "201"}, statuses


def test_a_batch_may_update_then_delete_one_resource(
    live_server: str, committed: Engine, auth_headers: Callable[[str], dict[str, str]]
) -> None:
    pid = f"upd-del-{uuid.uuid4().hex[:8]}"
    admin = auth_headers("admin")
    with httpx.Client(base_url=live_server, timeout=60, headers=admin) as http:
        assert http.put(f"/fhir/Patient/{pid}", json=patient(id=pid), headers=FHIR_JSON).is_success
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {
                    "resource": {**patient(id=pid), "gender": "male"},
                    "request": {"method": "PUT", "url": f"Patient/{pid}"},
                },
                {"request": {"method": "DELETE", "url": f"Patient/{pid}"}},
            ],
        }
        answer = http.post("/fhir", json=bundle, headers=FHIR_JSON)
        assert answer.status_code == 200, answer.text
        assert [e["response"]["status"][:3] for e in answer.json()["entry"]] == ["200", "204"]
        # Its Provenance names the update, a version that stays in history.
        provenance = http.get("/fhir/Provenance", params={"target": f"Patient/{pid}"}).json()
        targets = [t["reference"] for e in provenance["entry"] for t in e["resource"]["target"]]
        assert f"Patient/{pid}/_history/2" in targets
