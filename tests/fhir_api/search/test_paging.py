"""Keyset paging over real connections while others insert, and a standard client paging."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fhirpy import SyncFHIRClient
from sqlalchemy import Engine

from tests.builders import patient
from tests.fhir_api.search.helpers import FHIR_JSON

AuthHeaders = Callable[[str], dict[str, str]]


def _create_patients(http: httpx.Client, family: str, count: int) -> set[str]:
    created: set[str] = set()
    for number in range(count):
        response = http.post(
            "/fhir/Patient",
            json=patient(f"{family}-{number}", family=family, birthDate=f"19{40 + number}-01-01"),
            headers=FHIR_JSON,
        )
        assert response.status_code == 201, response.text
        created.add(response.json()["id"])
    return created


def _walk(http: httpx.Client, url: str) -> list[str]:
    seen: list[str] = []
    while url:
        response = http.get(url)
        assert response.status_code == 200, response.text
        bundle: dict[str, Any] = response.json()
        seen.extend(
            e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"
        )
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), "")
    return seen


@pytest.mark.parametrize("sort", ["", "&_sort=-_lastUpdated", "&_sort=birthdate", "&_sort=-name"])
def test_pages_have_no_gaps_or_repeats_while_others_insert(
    paging_server: str, committed: Engine, sort: str, auth_headers: AuthHeaders
) -> None:
    admin = auth_headers("admin")
    with httpx.Client(base_url=paging_server, timeout=30, headers=admin) as http:
        original = _create_patients(http, "Pager", 25)
        stop = threading.Event()

        def insert_more() -> None:
            with httpx.Client(base_url=paging_server, timeout=30, headers=admin) as writer:
                number = 0
                while not stop.is_set():
                    number += 1
                    writer.post(
                        "/fhir/Patient",
                        json=patient(f"Late-{number}", family="Pager", birthDate="1950-06-01"),
                        headers=FHIR_JSON,
                    )

        writer = threading.Thread(target=insert_more)
        writer.start()
        try:
            seen = _walk(http, f"/fhir/Patient?family=pager&_count=4{sort}")
        finally:
            stop.set()
            writer.join()
    assert len(seen) == len(set(seen)), "a resource appeared on two pages"
    assert original <= set(seen), "a resource present before the walk was skipped"


def test_fhirpy_pages_through_a_search(
    paging_server: str, committed: Engine, auth_headers: AuthHeaders
) -> None:
    admin = auth_headers("admin")
    with httpx.Client(base_url=paging_server, timeout=30, headers=admin) as http:
        created = _create_patients(http, "Fhirpy", 17)
    client = SyncFHIRClient(f"{paging_server}/fhir", authorization=admin["Authorization"])
    search = client.resources("Patient").search(family="fhirpy").limit(5)
    fetched = search.fetch_all()
    assert sorted(str(p.id) for p in fetched) == sorted(created)
    assert search.count() == 17
    ordered = client.resources("Patient").search(family="fhirpy").sort("-birthdate").limit(4)
    births = [str(p.birthDate) for p in ordered.fetch_all()]
    assert births == sorted(births, reverse=True)
    assert len(births) == 17
    first = client.resources("Patient").search(family="fhirpy", birthdate="1940-01-01").first()
    assert first is not None and first.id in created
