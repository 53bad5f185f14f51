"""Helpers of the search tests: create resources over HTTP and read result ids."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from auth.policy import access_for
from auth.tokens import Principal
from fhir_api.scope import search_scope
from fhir_api.search import SearchScope

FHIR_JSON = {"Content-Type": "application/fhir+json"}
JSON = dict[str, Any]


def visit_encounter(subject: str, provider: str, start: str, end: str | None = None) -> JSON:
    """Return a finished field Encounter of `subject` at `provider` over a period."""
    period = {"start": start} if end is None else {"start": start, "end": end}
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "FLD"},
        "subject": {"reference": subject},
        "serviceProvider": {"reference": provider},
        "period": period,
    }


def create(client: TestClient, resource: JSON) -> str:
    """Create a resource and return its id."""
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def put(client: TestClient, resource: JSON) -> str:
    """Create a resource under its own id and return it."""
    url = f"/fhir/{resource['resourceType']}/{resource['id']}"
    response = client.put(url, json=resource, headers=FHIR_JSON)
    assert response.status_code in (200, 201), response.text
    return str(resource["id"])


def search(client: TestClient, url: str, **headers: str) -> JSON:
    """Run a GET search that must succeed and return the Bundle."""
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    body: JSON = response.json()
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "searchset"
    return body


def ids(bundle: JSON, mode: str = "match") -> set[str]:
    """Return the ids of the entries of one search mode."""
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


def found(client: TestClient, url: str) -> set[str]:
    """Return the ids a search matches."""
    return ids(search(client, url))


def caller_scope(
    unit: str, role: str = "unit", scopes: frozenset[str] = frozenset()
) -> SearchScope:
    """Return the search scope of a caller of `role` working for `unit`, as the API builds it."""
    principal = Principal(
        subject=f"service-account-{unit}",
        client_id=unit,
        username=None,
        roles=frozenset({role}),
        unit=unit,
        region=None,
        community=None,
        specialty=None,
        scopes=scopes,
        token_id=None,
        expires_at=4_000_000_000,
    )
    return search_scope(access_for(principal))
