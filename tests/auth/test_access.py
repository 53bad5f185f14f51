"""Access rules end to end: real tokens over the HTTP API, every role against one visit."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from jwcrypto import jwk
from sqlalchemy.orm import Session

from bench.population import reference_resources
from hub.app import create_app
from hub.settings import Settings
from tests.auth.conftest import decode_unverified, issuer_key, sign
from tests.builders import NATIONAL_ID, unit_bundle
from tests.servers import TokenSource

JSON = dict[str, Any]
Headers = Callable[[str], dict[str, str]]

FHIR_JSON = "application/fhir+json"
CALLERS = ("unit-01", "unit-02", "coordinator", "specialist.derm", "relay", "ministry", "admin")


# --- helpers ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Visit:
    """What unit-01 wrote in one visit: the ids of its Patient, Encounter and Observation."""

    national_id: str
    patient: str
    encounter: str
    observation: str


def b64url(raw: bytes) -> str:
    """Encode bytes as unpadded base64url, as JOSE does."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header carrying `token`."""
    return {"Authorization": f"Bearer {token}"}


def location_id(location: str) -> str:
    """Return the id in a `Type/id/_history/n` location."""
    return location.split("/")[1]


def transaction(client: TestClient, headers: dict[str, str], bundle: JSON) -> JSON:
    """Post a transaction Bundle and return its successful response Bundle."""
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 200, response.text
    body: JSON = response.json()
    return body


def put_reference_data(client: TestClient, headers: Headers) -> None:
    """Store the regions, unit Organizations and unit Devices of the demo data, as admin."""
    wanted = [r for r in reference_resources() if r["resourceType"] in ("Organization", "Device")]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in wanted
        ],
    }
    transaction(client, headers("admin"), bundle)


def visit_bundle(national_id: str, unit: str) -> JSON:
    """Return a unit's visit: conditional Patient, Encounter served by the unit, one Observation."""
    bundle = unit_bundle(national_id, observations=1)
    bundle["entry"][1]["resource"]["serviceProvider"] = {"reference": f"Organization/{unit}"}
    return bundle


def post_visit(client: TestClient, headers: Headers, unit: str, national_id: str) -> Visit:
    """Post a unit's visit bundle and return the ids it answered."""
    body = transaction(client, headers(unit), visit_bundle(national_id, unit))
    locations = [entry["response"]["location"] for entry in body["entry"]]
    patient, encounter, observation = (location_id(location) for location in locations)
    return Visit(national_id, patient, encounter, observation)


def fresh_national_id() -> str:
    """Return a national ID nobody else in the test database carries."""
    return f"ZT{uuid.uuid4().hex[:10].upper()}"


def entries(bundle: JSON, mode: str | None = None) -> list[str]:
    """Return `Type/id` of a Bundle's entries (only those of a search mode when given)."""
    return [
        f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
        for entry in bundle.get("entry", [])
        if "resource" in entry
        and (mode is None or entry.get("search", {}).get("mode") == mode)
        and entry["resource"]["resourceType"] != "OperationOutcome"
    ]


def history_ids(bundle: JSON) -> list[str]:
    """Return `Type/id` of a history Bundle's entries (deleted versions by their request URL)."""
    refs: list[str] = []
    for entry in bundle.get("entry", []):
        if "resource" in entry:
            refs.append(f"{entry['resource']['resourceType']}/{entry['resource']['id']}")
        else:
            refs.append("/".join(entry["request"]["url"].split("/")[:2]))
    return refs


def assert_outcome(response: httpx.Response, status: int, code: str) -> JSON:
    """Assert an OperationOutcome answer with this status and first issue code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body: JSON = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code, body
    return body


def assert_unauthenticated(response: httpx.Response) -> None:
    """Assert a 401 with a Bearer challenge and an OperationOutcome."""
    assert_outcome(response, 401, "login")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def api(app: FastAPI, session: Session) -> Iterator[TestClient]:
    """An HTTP client with no default credentials, joining the test's rolled-back transaction."""
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def visit(api: TestClient, auth_headers: Headers) -> Visit:
    """Reference data, then one visit of unit-01 (Encounter served by Organization/unit-01)."""
    put_reference_data(api, auth_headers)
    return post_visit(api, auth_headers, "unit-01", fresh_national_id())


@pytest.fixture
def claims(tokens: TokenSource) -> JSON:
    """The claims of a real, valid access token of the coordinator."""
    return decode_unverified(tokens.token("coordinator"))


@pytest.fixture
def signing_key(issuer_data_dir: Path) -> jwk.JWK:
    """The dev issuer's own private signing key."""
    return issuer_key(issuer_data_dir)


# --- 1. token faults ----------------------------------------------------------------------


def _shifted(claims: JSON, **changes: Any) -> JSON:
    return {**claims, "jti": str(uuid.uuid4()), **changes}


def _forge(fault: str, claims: JSON, key: jwk.JWK, real_token: str) -> str:
    now = int(time.time())
    match fault:
        case "expired":
            return sign(_shifted(claims, iat=now - 3600, exp=now - 600), key)
        case "not yet valid":
            return sign(_shifted(claims, nbf=now + 3600, exp=now + 7200), key)
        case "wrong issuer":
            return sign(_shifted(claims, iss="http://127.0.0.1:1/realms/waha"), key)
        case "wrong audience":
            return sign(_shifted(claims, aud=["account", "other-api"]), key)
        case "no exp":
            return sign({k: v for k, v in _shifted(claims).items() if k != "exp"}, key)
        case "id token":
            return sign(_shifted(claims, typ="ID"), key)
        case "alg none":
            header = b64url(orjson.dumps({"alg": "none", "typ": "JWT", "kid": key.get("kid")}))
            return f"{header}.{b64url(orjson.dumps(_shifted(claims)))}."
        case "HS256 with the public key":
            public_pem = key.export_to_pem(private_key=False)
            secret = jwk.JWK(kty="oct", k=b64url(public_pem))
            return sign(_shifted(claims), secret, alg="HS256", kid=key.get("kid"))
        case "tampered payload":
            header, _payload, signature = real_token.split(".")
            elevated = _shifted(claims, realm_access={"roles": ["admin"]})
            return f"{header}.{b64url(orjson.dumps(elevated))}.{signature}"
        case "stripped signature":
            header, payload, _signature = real_token.split(".")
            return f"{header}.{payload}."
        case "unknown kid":
            stranger = jwk.JWK.generate(kty="RSA", size=2048, kid="not-a-waha-key")
            return sign(_shifted(claims), stranger)
        case "foreign key with the issuer's kid":
            stranger = jwk.JWK.generate(kty="RSA", size=2048)
            return sign(_shifted(claims), stranger, kid=key.get("kid"))
        case "not a JWT":
            return "not-a-token"
    raise AssertionError(fault)


TOKEN_FAULTS = [
    "expired",
    "not yet valid",
    "wrong issuer",
    "wrong audience",
    "no exp",
    "id token",
    "alg none",
    "HS256 with the public key",
    "tampered payload",
    "stripped signature",
    "unknown kid",
    "foreign key with the issuer's kid",
    "not a JWT",
]


def test_a_re_signed_copy_of_a_real_token_is_accepted(
    api: TestClient, claims: JSON, signing_key: jwk.JWK
) -> None:
    # The control for the faults below: forging works, so their 401 is the fault's doing.
    response = api.get("/fhir/Patient", headers=bearer(sign(_shifted(claims), signing_key)))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("fault", TOKEN_FAULTS)
@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/Patient/some-id", "/fhir/_history"])
def test_a_faulty_token_is_refused(
    api: TestClient,
    tokens: TokenSource,
    claims: JSON,
    signing_key: jwk.JWK,
    fault: str,
    path: str,
) -> None:
    token = _forge(fault, claims, signing_key, tokens.token("coordinator"))
    response = api.get(path, headers=bearer(token))
    assert_unauthenticated(response)
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer   ", "Basic YWRtaW46d2FoYS1kZXY=", "Token abc"]
)
def test_a_missing_or_malformed_authorization_is_refused(
    api: TestClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_unauthenticated(api.get("/fhir/Patient", headers=headers))


def test_a_faulty_token_is_refused_on_writes_and_bundles(api: TestClient) -> None:
    bundle = visit_bundle(fresh_national_id(), "unit-01")
    assert_unauthenticated(api.post("/fhir", json=bundle))
    assert_unauthenticated(api.put("/fhir/Patient/x", json={"resourceType": "Patient", "id": "x"}))
    assert_unauthenticated(api.delete("/fhir/Patient/x", headers=bearer("a.b.c")))


@pytest.mark.parametrize("path", ["/fhir/metadata", "/fhir/.well-known/smart-configuration"])
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token"])
def test_the_discovery_documents_need_no_token(
    api: TestClient, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = api.get(path, headers=headers)
    assert response.status_code == 200, response.text
    if path == "/fhir/metadata":
        assert response.json()["resourceType"] == "CapabilityStatement"
    else:
        assert "token_endpoint" in response.json()


# --- 2. the role × interaction matrix -----------------------------------------------------

# What each caller may see of unit-01's visit (DESIGN.md "Access rules").
SEES, HIDDEN, FORBIDDEN = "sees", "hidden", "forbidden"
VISIBILITY = {
    "unit-01": SEES,  # wrote it
    "coordinator": SEES,  # Encounter served by a marrakech-safi unit
    "admin": SEES,
    "unit-02": HIDDEN,  # another unit, another region
    "specialist.derm": HIDDEN,  # no case routed to dermatology
    "relay": FORBIDDEN,
    "ministry": FORBIDDEN,
}


def _search(api: TestClient, headers: dict[str, str], query: str) -> JSON:
    response = api.get(query, headers=headers)
    assert response.status_code == 200, response.text
    body: JSON = response.json()
    assert body["type"] == "searchset"
    return body


INTERACTIONS: dict[str, tuple[str, str]] = {
    # name → (method-free path template, kind)
    "read Patient": ("/fhir/Patient/{patient}", "read"),
    "read Observation": ("/fhir/Observation/{observation}", "read"),
    "vread Observation": ("/fhir/Observation/{observation}/_history/1", "read"),
    "read Encounter": ("/fhir/Encounter/{encounter}", "read"),
    "search Observation by subject": (
        "/fhir/Observation?subject=Patient/{patient}&_total=accurate",
        "search",
    ),
    "search Patient by national ID": (
        "/fhir/Patient?identifier=" + NATIONAL_ID + "|{national_id}&_total=accurate",
        "search",
    ),
    "search with _include": (
        "/fhir/Observation?subject=Patient/{patient}&_include=Observation:subject"
        "&_include=Observation:encounter&_total=accurate",
        "search",
    ),
    "search with _revinclude": (
        "/fhir/Patient?_id={patient}&_revinclude=Observation:subject"
        "&_revinclude=Encounter:subject&_total=accurate",
        "search",
    ),
    "POST _search": ("/fhir/Observation/_search", "search"),
    "instance history": ("/fhir/Observation/{observation}/_history", "read"),
    "type history": ("/fhir/Observation/_history", "history"),
    "system history": ("/fhir/_history", "history"),
    "$everything": ("/fhir/Patient/{patient}/$everything", "everything"),
}
EXPECTED_MATCHES: dict[str, set[str]] = {
    "search Observation by subject": {"Observation/{observation}"},
    "search Patient by national ID": {"Patient/{patient}"},
    "search with _include": {"Observation/{observation}"},
    "search with _revinclude": {"Patient/{patient}"},
    "POST _search": {"Observation/{observation}"},
}
EXPECTED_INCLUDES: dict[str, set[str]] = {
    "search with _include": {"Patient/{patient}", "Encounter/{encounter}"},
    "search with _revinclude": {"Observation/{observation}", "Encounter/{encounter}"},
}


def _fill(templates: set[str], visit: Visit) -> set[str]:
    return {template.format(**vars_of(visit)) for template in templates}


def vars_of(visit: Visit) -> dict[str, str]:
    """Return the visit's ids by name, for path templates."""
    return {
        "patient": visit.patient,
        "encounter": visit.encounter,
        "observation": visit.observation,
        "national_id": visit.national_id,
    }


def _request(api: TestClient, headers: dict[str, str], name: str, visit: Visit) -> httpx.Response:
    template, _kind = INTERACTIONS[name]
    response: httpx.Response
    if name == "POST _search":
        form = {"subject": f"Patient/{visit.patient}", "_total": "accurate"}
        response = api.post(template, data=form, headers=headers)
    else:
        response = api.get(template.format(**vars_of(visit)), headers=headers)
    return response


def _visit_refs(visit: Visit) -> set[str]:
    return {
        f"Patient/{visit.patient}",
        f"Encounter/{visit.encounter}",
        f"Observation/{visit.observation}",
    }


@pytest.mark.parametrize("name", list(INTERACTIONS))
@pytest.mark.parametrize("caller", CALLERS)
def test_who_sees_a_units_visit(
    api: TestClient, auth_headers: Headers, visit: Visit, caller: str, name: str
) -> None:
    visibility = VISIBILITY[caller]
    response = _request(api, auth_headers(caller), name, visit)
    kind = INTERACTIONS[name][1]
    if visibility == FORBIDDEN:
        assert_outcome(response, 403, "forbidden")
        return
    if kind in ("read", "everything") and visibility == HIDDEN:
        assert_outcome(response, 404, "not-found")
        return
    assert response.status_code == 200, response.text
    body: JSON = response.json()
    if kind == "read":
        if body["resourceType"] == "Bundle":
            assert history_ids(body) == [f"Observation/{visit.observation}"]
        else:
            path = response.request.url.path
            assert path.split("/")[2:4] == [body["resourceType"], body["id"]]
    elif kind == "search":
        assert body["type"] == "searchset"
        matches = set(entries(body, "match"))
        includes = set(entries(body, "include"))
        if visibility == SEES:
            assert matches == _fill(EXPECTED_MATCHES[name], visit)
            assert includes == _fill(EXPECTED_INCLUDES.get(name, set()), visit)
            assert body["total"] == len(matches)
        else:
            assert matches == set()
            assert includes == set()
            assert body["total"] == 0
    elif kind == "history":
        assert body["type"] == "history"
        seen = set(history_ids(body)) & _visit_refs(visit)
        if name == "type history":
            wanted = {f"Observation/{visit.observation}"}
        else:
            wanted = _visit_refs(visit)
        assert seen == (wanted if visibility == SEES else set())
        if visibility == HIDDEN and "total" in body:
            assert body["total"] == len(body.get("entry", []))
    else:
        assert kind == "everything"
        assert _visit_refs(visit) <= set(entries(body))


@pytest.mark.parametrize("caller", ["unit-02", "specialist.derm", "coordinator"])
def test_shared_reference_data_is_visible_to_every_clinical_role(
    api: TestClient, auth_headers: Headers, visit: Visit, caller: str
) -> None:
    for path in ("/fhir/Organization/unit-01", "/fhir/Organization/region-marrakech-safi"):
        response = api.get(path, headers=auth_headers(caller))
        assert response.status_code == 200, response.text
    organizations = _search(api, auth_headers(caller), "/fhir/Organization?_count=50")
    assert {"Organization/unit-01", "Organization/unit-02"} <= set(entries(organizations))


def test_a_hidden_patient_is_absent_from_broad_searches(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # No search parameter that names the patient: rows are filtered, not the criteria.
    for query in (
        "/fhir/Patient?_count=100&_total=accurate",
        "/fhir/Observation?code=http://loinc.org|8867-4&_count=100&_total=accurate",
        "/fhir/Encounter?_count=100&_total=accurate",
        "/fhir?_type=Patient,Observation&_count=100&_total=accurate",
    ):
        hidden = _search(api, auth_headers("unit-02"), query)
        assert not (set(entries(hidden)) & _visit_refs(visit)), query
        assert hidden["total"] == len(entries(hidden, "match")), query
        seen = _search(api, auth_headers("unit-01"), query)
        assert set(entries(seen)) & _visit_refs(visit), query


def test_callers_sharing_a_statement_shape_keep_their_own_rows(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # Page statements are reused per shape and scope kind, with each caller's grantees
    # as parameters: alternating callers must never see the other one's rows.
    shapes = (
        f"/fhir/Patient?identifier={NATIONAL_ID}|{visit.national_id}",
        f"/fhir/Observation?subject=Patient/{visit.patient}&_count=7",
        f"/fhir/Patient?_id={visit.patient}&_count=3",
    )
    for query in shapes:
        for caller in ("unit-01", "unit-02", "unit-01", "unit-02"):
            found = set(entries(_search(api, auth_headers(caller), query)))
            if caller == "unit-01":
                assert found & _visit_refs(visit), (caller, query)
            else:
                assert not found, (caller, query)


def test_a_reference_to_a_hidden_patient_is_no_way_in(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # Chained and reverse-chained criteria must not reveal the hidden patient either.
    headers = auth_headers("unit-02")
    for query in (
        f"/fhir/Observation?subject:Patient.identifier={NATIONAL_ID}|{visit.national_id}",
        f"/fhir/Patient?_has:Observation:subject:_id={visit.observation}",
        f"/fhir/Observation?encounter=Encounter/{visit.encounter}",
    ):
        response = api.get(query, headers=headers)
        if response.status_code == 400:
            continue  # a search parameter the store does not support is no leak
        assert response.status_code == 200, response.text
        assert entries(response.json()) == [], query


# --- 3. a second unit meets the patient ----------------------------------------------------


def test_a_second_unit_gains_the_patient_by_a_conditional_create(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    unit_02 = auth_headers("unit-02")
    assert api.get(f"/fhir/Observation/{visit.observation}", headers=unit_02).status_code == 404

    second = post_visit(api, auth_headers, "unit-02", visit.national_id)

    assert second.patient == visit.patient  # one record per person
    earlier = api.get(f"/fhir/Observation/{visit.observation}", headers=unit_02)
    assert earlier.status_code == 200, earlier.text
    response = api.get(f"/fhir/Patient/{visit.patient}/$everything", headers=unit_02)
    assert response.status_code == 200, response.text
    assert _visit_refs(visit) | _visit_refs(second) <= set(entries(response.json()))
    found = _search(
        api, unit_02, f"/fhir/Observation?subject=Patient/{visit.patient}&_total=accurate"
    )
    assert set(entries(found, "match")) == {
        f"Observation/{visit.observation}",
        f"Observation/{second.observation}",
    }
    assert found["total"] == 2
    # unit-01 sees the other unit's visit too: the record is longitudinal.
    mine = api.get(f"/fhir/Observation/{second.observation}", headers=auth_headers("unit-01"))
    assert mine.status_code == 200, mine.text
    # The specialist is still outside the record.
    derm = auth_headers("specialist.derm")
    assert api.get(f"/fhir/Patient/{visit.patient}", headers=derm).status_code == 404


def test_the_second_units_visit_reaches_no_coordinator_of_another_region(
    api: TestClient, auth_headers: Headers
) -> None:
    # A patient seen only by unit-02 (oriental) is not the marrakech-safi coordinator's.
    put_reference_data(api, auth_headers)
    visit = post_visit(api, auth_headers, "unit-02", fresh_national_id())
    response = api.get(f"/fhir/Patient/{visit.patient}", headers=auth_headers("coordinator"))
    assert_outcome(response, 404, "not-found")
    assert api.get(f"/fhir/Patient/{visit.patient}", headers=auth_headers("unit-02")).is_success


# --- 4. writes to what one cannot see ------------------------------------------------------


def _current(api: TestClient, auth_headers: Headers, reference: str) -> JSON:
    response = api.get(f"/fhir/{reference}", headers=auth_headers("admin"))
    assert response.status_code == 200, response.text
    body: JSON = response.json()
    return body


def test_a_unit_cannot_update_or_delete_what_it_cannot_see(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    unit_02 = auth_headers("unit-02")
    observation_ref = f"Observation/{visit.observation}"
    patient_ref = f"Patient/{visit.patient}"
    before = {ref: _current(api, auth_headers, ref) for ref in (observation_ref, patient_ref)}

    changed = {**before[observation_ref], "status": "entered-in-error"}
    assert_outcome(
        api.put(f"/fhir/{observation_ref}", json=changed, headers=unit_02), 404, "not-found"
    )
    renamed = {**before[patient_ref], "name": [{"family": "Changed"}]}
    assert_outcome(api.put(f"/fhir/{patient_ref}", json=renamed, headers=unit_02), 404, "not-found")
    assert_outcome(api.delete(f"/fhir/{observation_ref}", headers=unit_02), 404, "not-found")
    assert_outcome(api.delete(f"/fhir/{patient_ref}", headers=unit_02), 404, "not-found")
    # The same through transactions: the bundle fails, nothing is written.
    for entry in (
        {"resource": changed, "request": {"method": "PUT", "url": observation_ref}},
        {"request": {"method": "DELETE", "url": observation_ref}},
        {"request": {"method": "DELETE", "url": patient_ref}},
    ):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        response = api.post("/fhir", json=bundle, headers=unit_02)
        assert_outcome(response, 404, "not-found")

    for ref, resource in before.items():
        after = _current(api, auth_headers, ref)
        assert after == resource, ref
        history = api.get(f"/fhir/{ref}/_history", headers=auth_headers("admin")).json()
        assert len(history["entry"]) == 1, ref
    # A refused write grants no care relationship.
    assert_outcome(api.get(f"/fhir/{patient_ref}", headers=unit_02), 404, "not-found")


def _conditional_writes(api: TestClient, headers: dict[str, str], patient: JSON) -> list[JSON]:
    """Conditionally delete and update a patient by its national ID; return both outcomes."""
    national_id = patient["identifier"][0]["value"]
    criteria = f"identifier={NATIONAL_ID}|{national_id}"
    body = {k: v for k, v in patient.items() if k not in ("id", "meta")}
    answers = [
        api.delete(f"/fhir/Patient?{criteria}", headers=headers),
        api.put(f"/fhir/Patient?{criteria}", json={**body, "gender": "male"}, headers=headers),
    ]
    return [assert_outcome(answer, 404, "not-found") for answer in answers]


def test_a_conditional_update_or_delete_does_not_reach_hidden_rows(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    unit_02 = auth_headers("unit-02")
    patient_ref = f"Patient/{visit.patient}"
    before = _current(api, auth_headers, patient_ref)
    _conditional_writes(api, unit_02, before)
    assert _current(api, auth_headers, patient_ref) == before
    search = _search(api, auth_headers("admin"), f"/fhir/Patient?identifier={visit.national_id}")
    assert entries(search, "match") == [patient_ref]  # no second record was made either
    assert_outcome(api.get(f"/fhir/{patient_ref}", headers=unit_02), 404, "not-found")


def test_a_conditional_write_does_not_reveal_a_hidden_id(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # The criteria are the caller's own; the id of the record they matched is not.
    before = _current(api, auth_headers, f"Patient/{visit.patient}")
    for outcome in _conditional_writes(api, auth_headers("unit-02"), before):
        assert visit.patient not in orjson.dumps(outcome).decode()


def _heart_rate(subject: JSON) -> JSON:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": subject,
        "valueQuantity": {"value": 99, "unit": "/min", "system": "http://unitsofmeasure.org"},
    }


def test_a_conditional_create_does_not_match_or_show_what_the_caller_cannot_see(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    unit_02 = auth_headers("unit-02")
    show = {**unit_02, "Prefer": "return=representation"}
    for criteria in (
        f"_id={visit.observation}",
        f"subject=Patient/{visit.patient}",
        f"code=http://loinc.org|8867-4&subject=Patient/{visit.patient}",
    ):
        answer = api.post(
            "/fhir/Observation",
            json=_heart_rate({"display": "walk-in"}),
            headers={**show, "If-None-Exist": criteria},
        )
        # No hidden match: a new resource of the caller's own.
        assert answer.status_code == 201, (criteria, answer.text)
        assert answer.json()["id"] != visit.observation
        assert visit.patient not in answer.text
    # A Patient named by anything but an identifier is not a person match either.
    answer = api.post(
        "/fhir/Patient",
        json={"resourceType": "Patient"},
        headers={**show, "If-None-Exist": f"_id={visit.patient}"},
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["id"] != visit.patient
    assert_outcome(api.get(f"/fhir/Patient/{visit.patient}", headers=unit_02), 404, "not-found")


def test_a_person_matched_by_identifier_is_told_but_not_shown(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # One record per person: the match stands, whichever unit made the record;
    # its content waits for a care relationship.
    unit_02 = {**auth_headers("unit-02"), "Prefer": "return=representation"}
    criteria = f"identifier={NATIONAL_ID}|{visit.national_id}"
    answer = api.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "identifier": [{"system": NATIONAL_ID, "value": "x"}]},
        headers={**unit_02, "If-None-Exist": criteria},
    )
    assert answer.status_code == 200, answer.text
    matched = answer.headers["Content-Location"].split("/fhir/")[1]
    assert matched.startswith(f"Patient/{visit.patient}/_history/")
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert "El Idrissi" not in answer.text and visit.national_id not in answer.text
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": criteria},
            }
        ],
    }
    answered = api.post("/fhir", json=batch, headers=unit_02)
    assert answered.status_code == 200, answered.text
    assert "resource" not in answered.json()["entry"][0]
    assert visit.national_id not in answered.text


def test_a_conditional_reference_reaches_only_what_the_caller_may_see(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    unit_02 = auth_headers("unit-02")
    for reference in (f"Patient?_id={visit.patient}", "Patient?family=El Idrissi"):
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": _heart_rate({"reference": reference}),
                    "request": {"method": "POST", "url": "Observation"},
                }
            ],
        }
        answer = api.post("/fhir", json=bundle, headers=unit_02)
        assert answer.status_code == 412, answer.text
        assert "matched 0 resources" in answer.text
    assert_outcome(api.get(f"/fhir/Patient/{visit.patient}", headers=unit_02), 404, "not-found")
    hidden = api.get(f"/fhir/Observation/{visit.observation}", headers=unit_02)
    assert_outcome(hidden, 404, "not-found")


def test_conditional_writes_count_no_hidden_matches(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # Whether a hidden patient has matching data must not show in the answer.
    unit_01, unit_02 = auth_headers("unit-01"), auth_headers("unit-02")
    api.post(
        "/fhir/Observation",
        json=_heart_rate({"reference": f"Patient/{visit.patient}"}),
        headers=unit_01,
    )
    for criteria in (f"subject=Patient/{visit.patient}", "subject=Patient/nobody"):
        deleted = api.delete(f"/fhir/Observation?{criteria}", headers=unit_02)
        assert deleted.status_code == 204, (criteria, deleted.text)
    answer = api.post(
        "/fhir/Observation",
        json=_heart_rate({"display": "walk-in"}),
        headers={**unit_02, "If-None-Exist": f"subject=Patient/{visit.patient}"},
    )
    assert answer.status_code == 201, answer.text
    seen = api.get(f"/fhir/Observation?subject=Patient/{visit.patient}", headers=unit_01)
    assert len(entries(seen.json(), "match")) == 2  # both still there


def test_a_deleted_resource_stays_its_patients(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    unit_01, unit_02 = auth_headers("unit-01"), auth_headers("unit-02")
    path = f"/fhir/Observation/{visit.observation}"
    assert api.delete(path, headers=unit_01).status_code == 204
    assert_outcome(api.get(path, headers=unit_01), 410, "deleted")
    for hidden in (path, f"{path}/_history", f"{path}/_history/1"):
        assert_outcome(api.get(hidden, headers=unit_02), 404, "not-found")
    for history in ("/fhir/Observation/_history?_count=100", "/fhir/_history?_count=100"):
        listed = history_ids(api.get(history, headers=unit_02).json())
        assert f"Observation/{visit.observation}" not in listed, history
    assert len(api.get(f"{path}/_history", headers=unit_01).json()["entry"]) == 2


def test_a_deleted_patient_cannot_be_taken_over_by_recreating_it(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    unit_01, unit_02 = auth_headers("unit-01"), auth_headers("unit-02")
    path = f"/fhir/Patient/{visit.patient}"
    assert api.delete(path, headers=unit_01).status_code == 204
    recreated = api.put(
        path, json={"resourceType": "Patient", "id": visit.patient}, headers=unit_02
    )
    assert_outcome(recreated, 404, "not-found")
    for hidden in (f"/fhir/Observation/{visit.observation}", f"/fhir/Encounter/{visit.encounter}"):
        assert_outcome(api.get(hidden, headers=unit_02), 404, "not-found")
    # Its own units may bring it back.
    restored = api.put(path, json={"resourceType": "Patient", "id": visit.patient}, headers=unit_01)
    assert restored.status_code == 201, restored.text


def test_each_version_is_shown_only_to_whoever_may_see_its_patients(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # An Observation filed under the wrong patient and moved: its first
    # version still names the first patient, whom the other unit may not see.
    unit_01, unit_02 = auth_headers("unit-01"), auth_headers("unit-02")
    shared = post_visit(api, auth_headers, "unit-02", fresh_national_id())
    post_visit(api, auth_headers, "unit-01", shared.national_id)
    path = f"/fhir/Observation/{visit.observation}"
    current = api.get(path, headers=unit_01).json()
    moved = {key: value for key, value in current.items() if key not in ("meta", "encounter")}
    moved["subject"] = {"reference": f"Patient/{shared.patient}"}
    assert api.put(path, json=moved, headers=unit_01).status_code == 200
    assert api.get(path, headers=unit_02).status_code == 200
    assert api.get(f"{path}/_history/2", headers=unit_02).status_code == 200
    assert_outcome(api.get(f"{path}/_history/1", headers=unit_02), 404, "not-found")
    versions = api.get(f"{path}/_history", headers=unit_02).json()
    assert [entry["response"]["etag"] for entry in versions["entry"]] == ['W/"2"']
    assert versions["total"] == 1
    assert visit.patient not in orjson.dumps(versions).decode()
    listed = api.get("/fhir/Observation/_history?_count=200", headers=unit_02).json()
    assert visit.patient not in orjson.dumps(listed).decode()
    assert len(api.get(f"{path}/_history", headers=unit_01).json()["entry"]) == 2


def test_a_bundle_replay_is_only_its_senders(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # People share the CLI client: the same identifier from another person is
    # their own bundle, processed under their own rights, not someone's replay.
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "identifier": {"system": "urn:waha:test", "value": f"report-{uuid.uuid4()}"},
        "entry": [{"request": {"method": "GET", "url": f"Patient/{visit.patient}"}}],
    }
    first = api.post("/fhir", json=bundle, headers=auth_headers("coordinator"))
    assert first.status_code == 200, first.text
    assert first.json()["entry"][0]["response"]["status"].startswith("200")
    other = api.post("/fhir", json=bundle, headers=auth_headers("specialist.derm"))
    assert other.status_code == 200, other.text
    assert other.json()["entry"][0]["response"]["status"].startswith("404")
    assert "El Idrissi" not in other.text


def test_a_patient_named_only_by_identifier_or_contained_is_refused_to_units(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # Such a resource would belong to no record, hence be every unit's to read.
    unit_01 = auth_headers("unit-01")
    by_identifier = _heart_rate({"identifier": {"system": NATIONAL_ID, "value": visit.national_id}})
    contained = {
        **_heart_rate({"reference": "#p"}),
        "contained": [{"resourceType": "Patient", "id": "p", "gender": "female"}],
    }
    for refused in (by_identifier, contained):
        answer = api.post("/fhir/Observation", json=refused, headers=unit_01)
        assert_outcome(answer, 422, "business-rule")
        assert "Patient?identifier=" in answer.text
    # Other references by identifier are fine once the patient is named.
    named = {
        **_heart_rate({"reference": f"Patient/{visit.patient}"}),
        "performer": [{"identifier": {"system": "urn:oid:2.16.840.1.113883.4.6", "value": "1"}}],
    }
    assert api.post("/fhir/Observation", json=named, headers=unit_01).status_code == 201
    # An administrator's import is stored as it comes.
    imported = api.post("/fhir/Observation", json=by_identifier, headers=auth_headers("admin"))
    assert imported.status_code == 201, imported.text


def test_a_device_assigned_to_a_patient_is_that_patients(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # R4's patient compartment leaves Device out; Waha's access rules do not.
    unit_01, unit_02 = auth_headers("unit-01"), auth_headers("unit-02")
    meter = {
        "resourceType": "Device",
        "status": "active",
        "deviceName": [{"name": "Glucometre", "type": "user-friendly-name"}],
        "patient": {"reference": f"Patient/{visit.patient}"},
    }
    created = api.post("/fhir/Device", json=meter, headers=auth_headers("coordinator"))
    assert created.status_code == 201, created.text
    path = f"/fhir/Device/{created.json()['id']}"
    assert api.get(path, headers=unit_01).status_code == 200
    assert_outcome(api.get(path, headers=unit_02), 404, "not-found")
    found = _search(api, unit_02, f"/fhir/Device?patient={visit.patient}")
    assert entries(found) == []
    # A unit's own Device names no patient: shared reference data, as before.
    assert api.get("/fhir/Device/unit-01", headers=unit_02).status_code == 200


def test_a_reference_to_a_hidden_patient_grants_nothing(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # Writing into a compartment grants a care relationship, so a reference by id to a
    # patient the unit cannot see must resolve as absent; else a known or guessed id
    # would open the whole record.
    unit_02 = auth_headers("unit-02")
    smuggled = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{visit.patient}"},
        "valueQuantity": {"value": 60, "unit": "/min", "system": "http://unitsofmeasure.org"},
    }
    response = api.post("/fhir/Observation", json=smuggled, headers=unit_02)
    assert response.status_code in (404, 422), response.text
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": smuggled, "request": {"method": "POST", "url": "Observation"}}],
    }
    response = api.post("/fhir", json=bundle, headers=unit_02)
    assert response.status_code in (404, 422), response.text
    assert_outcome(api.get(f"/fhir/Patient/{visit.patient}", headers=unit_02), 404, "not-found")
    everything = api.get(f"/fhir/Patient/{visit.patient}/$everything", headers=unit_02)
    assert_outcome(everything, 404, "not-found")


def test_a_reference_by_this_servers_absolute_url_is_the_patients_like_any_other(
    api: TestClient, auth_headers: Headers, visit: Visit, settings: Settings
) -> None:
    # An absolute URL of this server names the same patient as `Patient/id`: the
    # resource joins that record, and is hidden from whoever cannot see it.
    unit_01, unit_02 = auth_headers("unit-01"), auth_headers("unit-02")
    absolute = f"{settings.fhir_base_url}/Patient/{visit.patient}"
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": absolute},
        "encounter": {"reference": f"{settings.fhir_base_url}/Encounter/{visit.encounter}"},
        "valueQuantity": {"value": 61, "unit": "/min", "system": "http://unitsofmeasure.org"},
    }
    created = api.post("/fhir/Observation", json=observation, headers=unit_01)
    assert created.status_code == 201, created.text
    stored = created.json()
    assert stored["subject"]["reference"] == f"Patient/{visit.patient}"
    assert stored["encounter"]["reference"] == f"Encounter/{visit.encounter}"
    path = f"/fhir/Observation/{stored['id']}"
    assert api.get(path, headers=unit_01).status_code == 200
    assert_outcome(api.get(path, headers=unit_02), 404, "not-found")
    for query in (
        "/fhir/Observation?code=http://loinc.org|8867-4&_count=100",
        f"/fhir/Observation?subject={absolute}",
    ):
        assert f"Observation/{stored['id']}" not in entries(_search(api, unit_02, query))
    compartment = api.get(f"/fhir/Patient/{visit.patient}/Observation", headers=unit_02)
    assert compartment.status_code in (200, 404), compartment.text
    if compartment.status_code == 200:
        assert entries(compartment.json()) == []
    for query in (f"subject={absolute}", f"subject=Patient/{visit.patient}"):
        found = _search(api, unit_01, f"/fhir/Observation?{query}&_count=100")
        assert f"Observation/{stored['id']}" in entries(found), query
    everything = api.get(f"/fhir/Patient/{visit.patient}/$everything", headers=unit_01)
    assert f"Observation/{stored['id']}" in entries(everything.json())
    # Other spellings of this server's address name the same patient.
    host = settings.fhir_base_url.split("://", 1)[1]
    for alias in (f"https://{host}", f"HTTP://{host}", f"{settings.fhir_base_url}/"):
        spelled = {**observation, "subject": {"reference": f"{alias}/Patient/{visit.patient}"}}
        answer = api.post("/fhir/Observation", json=spelled, headers=unit_01)
        assert answer.status_code == 201, (alias, answer.text)
        assert answer.json()["subject"]["reference"] == f"Patient/{visit.patient}"
        assert_outcome(
            api.get(f"/fhir/Observation/{answer.json()['id']}", headers=unit_02), 404, "not-found"
        )
    # A URL of this server that names no resource is refused, not stored as foreign.
    odd = {**observation, "subject": {"reference": f"{absolute}/"}}
    assert_outcome(api.post("/fhir/Observation", json=odd, headers=unit_01), 422, "not-found")
    # Nor is the absolute form a way into a hidden record.
    smuggled = {key: value for key, value in observation.items() if key != "encounter"}
    refused = api.post("/fhir/Observation", json=smuggled, headers=unit_02)
    assert refused.status_code in (404, 422), refused.text


def test_a_specialist_may_not_delete_at_all(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    response = api.delete(
        f"/fhir/Observation/{visit.observation}", headers=auth_headers("specialist.derm")
    )
    assert_outcome(response, 403, "forbidden")
    assert _current(api, auth_headers, f"Observation/{visit.observation}")["status"] == "final"


@pytest.mark.parametrize("caller", ["relay", "ministry"])
def test_relay_and_ministry_may_write_nothing(
    api: TestClient, auth_headers: Headers, visit: Visit, caller: str
) -> None:
    headers = auth_headers(caller)
    observation = _current(api, auth_headers, f"Observation/{visit.observation}")
    assert_outcome(
        api.post("/fhir", json=visit_bundle(fresh_national_id(), "unit-01"), headers=headers),
        403,
        "forbidden",
    )
    assert_outcome(
        api.put(f"/fhir/Observation/{visit.observation}", json=observation, headers=headers),
        403,
        "forbidden",
    )
    assert_outcome(
        api.delete(f"/fhir/Observation/{visit.observation}", headers=headers), 403, "forbidden"
    )


# --- 5. unit revocation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_app(app: FastAPI, settings: Settings) -> FastAPI:
    """The app re-reading each unit's Device status on every request (no cache)."""
    # Depends on `app`, which binds the process-wide engine first.
    return create_app(settings.model_copy(update={"unit_status_cache_seconds": 0}))


@pytest.fixture
def strict(strict_app: FastAPI, session: Session) -> Iterator[TestClient]:
    """A client of the cache-less app, joining the test's rolled-back transaction."""
    with TestClient(strict_app, raise_server_exceptions=False) as test_client:
        yield test_client


def _set_device_status(client: TestClient, auth_headers: Headers, unit: str, status: str) -> None:
    device = _current(client, auth_headers, f"Device/{unit}")
    response = client.put(
        f"/fhir/Device/{unit}", json={**device, "status": status}, headers=auth_headers("admin")
    )
    assert response.status_code == 200, response.text


def _audit_search(client: TestClient, auth_headers: Headers, query: str) -> list[JSON]:
    response = client.get(f"/fhir/AuditEvent?{query}&_count=200", headers=auth_headers("admin"))
    assert response.status_code == 200, response.text
    return [
        entry["resource"]
        for entry in response.json().get("entry", [])
        if entry.get("search", {}).get("mode") == "match"
    ]


def _request_id_of(event: JSON) -> str | None:
    for entity in event.get("entity", []):
        if entity.get("type", {}).get("code") == "XrequestId":
            value = entity["what"]["identifier"]["value"]
            return str(value)
    return None


def _events_of(
    client: TestClient, auth_headers: Headers, request_id: str, query: str
) -> list[JSON]:
    return [
        e for e in _audit_search(client, auth_headers, query) if _request_id_of(e) == request_id
    ]


def _since() -> str:
    moment = datetime.now(UTC) - timedelta(minutes=5)
    return "ge" + moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_revoked_unit_is_refused_until_reactivated(
    strict: TestClient, auth_headers: Headers
) -> None:
    put_reference_data(strict, auth_headers)
    visit = post_visit(strict, auth_headers, "unit-02", fresh_national_id())
    path = f"/fhir/Patient/{visit.patient}"
    assert strict.get(path, headers=auth_headers("unit-02")).status_code == 200

    _set_device_status(strict, auth_headers, "unit-02", "inactive")
    refused_id = uuid.uuid4().hex
    response = strict.get(path, headers={**auth_headers("unit-02"), "X-Request-Id": refused_id})
    assert_unauthenticated(response)
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    # Writes too, and the other unit is unaffected.
    bundle = visit_bundle(visit.national_id, "unit-02")
    assert_unauthenticated(strict.post("/fhir", json=bundle, headers=auth_headers("unit-02")))
    assert strict.get("/fhir/Organization/unit-01", headers=auth_headers("unit-01")).is_success

    [event] = _events_of(
        strict, auth_headers, refused_id, f"subtype=login&outcome=4&date={_since()}"
    )
    assert event["action"] == "E"
    assert event["outcome"] == "4"

    _set_device_status(strict, auth_headers, "unit-02", "active")
    assert strict.get(path, headers=auth_headers("unit-02")).status_code == 200


def test_a_revoked_units_refusal_names_the_unit(strict: TestClient, auth_headers: Headers) -> None:
    put_reference_data(strict, auth_headers)
    _set_device_status(strict, auth_headers, "unit-02", "inactive")
    refused_id = uuid.uuid4().hex
    response = strict.get(
        "/fhir/Organization/unit-02",
        headers={**auth_headers("unit-02"), "X-Request-Id": refused_id},
    )
    assert response.status_code == 401
    [event] = _events_of(strict, auth_headers, refused_id, f"subtype=login&date={_since()}")
    assert event["agent"][0]["who"].get("reference") == "Device/unit-02"


def test_a_deleted_device_revokes_its_unit(strict: TestClient, auth_headers: Headers) -> None:
    put_reference_data(strict, auth_headers)
    response = strict.delete("/fhir/Device/unit-02", headers=auth_headers("admin"))
    assert response.status_code in (200, 204), response.text
    assert_unauthenticated(
        strict.get("/fhir/Organization/unit-02", headers=auth_headers("unit-02"))
    )


def test_any_status_but_active_revokes_the_unit(strict: TestClient, auth_headers: Headers) -> None:
    put_reference_data(strict, auth_headers)
    assert strict.get("/fhir/Organization/unit-02", headers=auth_headers("unit-02")).is_success
    _set_device_status(strict, auth_headers, "unit-02", "entered-in-error")
    assert_unauthenticated(
        strict.get("/fhir/Organization/unit-02", headers=auth_headers("unit-02"))
    )


# --- 6. denials leave audit events ---------------------------------------------------------


def test_denied_requests_are_audited(api: TestClient, auth_headers: Headers, visit: Visit) -> None:
    path = f"/fhir/Patient/{visit.patient}"
    ids = {name: uuid.uuid4().hex for name in ("forbidden", "hidden", "anonymous", "allowed")}
    forbidden = api.get(path, headers={**auth_headers("relay"), "X-Request-Id": ids["forbidden"]})
    assert forbidden.status_code == 403
    hidden = api.get(path, headers={**auth_headers("unit-02"), "X-Request-Id": ids["hidden"]})
    assert hidden.status_code == 404
    anonymous = api.get(path, headers={"X-Request-Id": ids["anonymous"]})
    assert anonymous.status_code == 401
    allowed = api.get(path, headers={**auth_headers("unit-01"), "X-Request-Id": ids["allowed"]})
    assert allowed.status_code == 200

    since = _since()
    [relay] = _events_of(api, auth_headers, ids["forbidden"], f"outcome=4&date={since}")
    assert relay["action"] == "R"
    assert relay["subtype"][0]["code"] == "read"
    assert relay["agent"][0]["who"]["display"] == "relay"
    assert relay["agent"][0]["requestor"] is True

    [unit] = _events_of(api, auth_headers, ids["hidden"], f"agent=Device/unit-02&date={since}")
    assert unit["outcome"] == "4"
    assert unit["agent"][0]["who"]["reference"] == "Device/unit-02"

    [login] = _events_of(
        api, auth_headers, ids["anonymous"], f"subtype=login&outcome=4&date={since}"
    )
    assert login["action"] == "E"
    assert login["agent"][0]["who"] == {"display": "anonymous"}

    [reader] = _events_of(api, auth_headers, ids["allowed"], f"outcome=0&date={since}")
    assert reader["agent"][0]["who"]["reference"] == "Device/unit-01"
    about_patient = _audit_search(
        api, auth_headers, f"patient=Patient/{visit.patient}&date={since}"
    )
    assert ids["allowed"] in {_request_id_of(event) for event in about_patient}


def test_a_refused_read_names_the_record_it_tried(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    # "Who tried to open this record?" must be answerable from the trail, refusals included.
    path = f"/fhir/Patient/{visit.patient}"
    ids = {caller: uuid.uuid4().hex for caller in ("relay", "unit-02")}
    for caller, request_id in ids.items():
        response = api.get(path, headers={**auth_headers(caller), "X-Request-Id": request_id})
        assert response.status_code in (403, 404)
    since = _since()
    for request_id in ids.values():
        [event] = _events_of(api, auth_headers, request_id, f"outcome=4&date={since}")
        targets = [entity["what"].get("reference") for entity in event["entity"]]
        assert f"Patient/{visit.patient}" in targets
    about_patient = _audit_search(
        api, auth_headers, f"patient=Patient/{visit.patient}&date={since}"
    )
    assert set(ids.values()) <= {_request_id_of(event) for event in about_patient}


def test_a_denied_search_is_audited_with_its_query(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    request_id = uuid.uuid4().hex
    response = api.get(
        f"/fhir/Observation?subject=Patient/{visit.patient}",
        headers={**auth_headers("ministry"), "X-Request-Id": request_id},
    )
    assert_outcome(response, 403, "forbidden")
    [event] = _events_of(api, auth_headers, request_id, f"outcome=4&action=R&date={_since()}")
    assert event["subtype"][0]["code"] == "search-type"
    queries = [e for e in event["entity"] if e.get("role", {}).get("code") == "24"]
    assert (
        base64.b64decode(queries[0]["query"]).decode().endswith(f"subject=Patient/{visit.patient}")
    )


# --- 7. SMART scopes ----------------------------------------------------------------------


def _scoped(tokens: TokenSource, key: jwk.JWK, name: str, scope: str) -> dict[str, str]:
    claims = decode_unverified(tokens.token(name))
    return bearer(sign(_shifted(claims, scope=scope), key))


@pytest.mark.parametrize("caller", ["unit-01", "coordinator", "admin"])
def test_a_patient_only_scope_narrows_every_interaction(
    api: TestClient,
    auth_headers: Headers,
    tokens: TokenSource,
    signing_key: jwk.JWK,
    visit: Visit,
    caller: str,
) -> None:
    headers = _scoped(tokens, signing_key, caller, "openid user/Patient.rs")
    assert api.get(f"/fhir/Patient/{visit.patient}", headers=headers).status_code == 200
    patients = _search(api, headers, f"/fhir/Patient?_id={visit.patient}")
    assert entries(patients, "match") == [f"Patient/{visit.patient}"]

    for path in (
        f"/fhir/Observation/{visit.observation}",
        f"/fhir/Observation?subject=Patient/{visit.patient}",
        "/fhir/Observation/_history",
        f"/fhir/Encounter/{visit.encounter}",
    ):
        assert_outcome(api.get(path, headers=headers), 403, "forbidden")
    # Includes of other types come back empty, not as a way around the scope.
    included = _search(
        api,
        headers,
        f"/fhir/Patient?_id={visit.patient}&_revinclude=Observation:subject"
        "&_revinclude=Encounter:subject",
    )
    assert entries(included) == [f"Patient/{visit.patient}"]
    # Writes need c/u/d scopes.
    patient = _current(api, auth_headers, f"Patient/{visit.patient}")
    assert_outcome(
        api.put(f"/fhir/Patient/{visit.patient}", json=patient, headers=headers), 403, "forbidden"
    )


def test_everything_with_a_patient_only_scope_returns_only_patients(
    api: TestClient, tokens: TokenSource, signing_key: jwk.JWK, visit: Visit
) -> None:
    headers = _scoped(tokens, signing_key, "unit-01", "user/Patient.read")
    response = api.get(f"/fhir/Patient/{visit.patient}/$everything", headers=headers)
    if response.status_code == 403:
        return  # refusing the operation outright is as good as narrowing it
    assert response.status_code == 200, response.text
    assert {ref.split("/")[0] for ref in entries(response.json())} == {"Patient"}


@pytest.mark.parametrize(
    ("scope", "observation_status"),
    [
        ("user/Observation.rs", 200),
        ("system/*.cruds", 200),
        ("user/*.read", 200),
        ("user/Observation.s", 403),  # search without read
        ("user/Observation.write", 403),  # SMART v1: write is c, u and d only
        ("user/Encounter.rs", 403),
        ("openid profile", 200),  # no SMART resource scope: the role decides
    ],
)
def test_scopes_decide_an_observation_read(
    api: TestClient,
    tokens: TokenSource,
    signing_key: jwk.JWK,
    visit: Visit,
    scope: str,
    observation_status: int,
) -> None:
    headers = _scoped(tokens, signing_key, "unit-01", scope)
    response = api.get(f"/fhir/Observation/{visit.observation}", headers=headers)
    assert response.status_code == observation_status, response.text


def test_includes_of_types_outside_the_scopes_come_back_empty(
    api: TestClient, tokens: TokenSource, signing_key: jwk.JWK, visit: Visit
) -> None:
    headers = _scoped(tokens, signing_key, "unit-01", "user/Observation.rs")
    bundle = _search(
        api,
        headers,
        f"/fhir/Observation?subject=Patient/{visit.patient}&_include=Observation:subject"
        "&_include=Observation:encounter&_total=accurate",
    )
    assert entries(bundle, "match") == [f"Observation/{visit.observation}"]
    assert entries(bundle, "include") == []
    assert_outcome(api.get(f"/fhir/Patient/{visit.patient}", headers=headers), 403, "forbidden")


def test_a_scope_never_widens_the_role(
    api: TestClient, tokens: TokenSource, signing_key: jwk.JWK, visit: Visit
) -> None:
    # Scopes narrow the role's rights; they never add rows or interactions.
    hidden = _scoped(tokens, signing_key, "unit-02", "system/*.cruds")
    assert_outcome(api.get(f"/fhir/Patient/{visit.patient}", headers=hidden), 404, "not-found")
    relay = _scoped(tokens, signing_key, "relay", "system/*.cruds")
    assert_outcome(api.get(f"/fhir/Patient/{visit.patient}", headers=relay), 403, "forbidden")
    specialist = _scoped(tokens, signing_key, "specialist.derm", "system/*.cruds")
    response = api.delete(f"/fhir/Observation/{visit.observation}", headers=specialist)
    assert_outcome(response, 403, "forbidden")


@pytest.mark.parametrize("caller", ["unit-01", "specialist.derm"])
def test_units_and_specialists_may_not_change_shared_reference_data(
    api: TestClient, auth_headers: Headers, visit: Visit, caller: str
) -> None:
    # Were a unit allowed to, it could revoke (or revive) any unit's Device.
    device = _current(api, auth_headers, "Device/unit-02")
    changed = {**device, "status": "inactive"}
    headers = {**auth_headers(caller), "Content-Type": FHIR_JSON}
    response = api.put("/fhir/Device/unit-02", json=changed, headers=headers)
    assert_outcome(response, 403, "forbidden")
    deletion = api.delete("/fhir/Organization/unit-02", headers=auth_headers(caller))
    assert_outcome(deletion, 403, "forbidden")
    assert _current(api, auth_headers, "Device/unit-02")["status"] == "active"


def test_units_may_add_shared_resources_and_coordinators_change_them(
    api: TestClient, auth_headers: Headers, visit: Visit
) -> None:
    location = {"resourceType": "Location", "name": "Stop added by a unit", "status": "active"}
    unit = {**auth_headers("unit-01"), "Content-Type": FHIR_JSON}
    created = api.post("/fhir/Location", json=location, headers=unit)
    assert created.status_code == 201, created.text
    stored = created.json()
    renamed = {**stored, "name": "Stop renamed by the coordinator"}
    coordinator = {**auth_headers("coordinator"), "Content-Type": FHIR_JSON}
    response = api.put(f"/fhir/Location/{stored['id']}", json=renamed, headers=coordinator)
    assert response.status_code == 200, response.text
    again = api.put(f"/fhir/Location/{stored['id']}", json=stored, headers=unit)
    assert_outcome(again, 403, "forbidden")


def _patch_as(
    client: TestClient, auth_headers: Headers, who: str, url: str, operations: list[JSON]
) -> httpx.Response:
    headers = {**auth_headers(who), "Content-Type": "application/json-patch+json"}
    response: httpx.Response = client.patch(url, content=orjson.dumps(operations), headers=headers)
    return response


def test_a_patch_of_the_devices_status_revokes_the_unit(
    strict: TestClient, auth_headers: Headers
) -> None:
    """DESIGN.md: an admin sets the unit's Device.status to inactive by update or patch."""
    put_reference_data(strict, auth_headers)
    assert strict.get("/fhir/Organization/unit-02", headers=auth_headers("unit-02")).is_success
    inactive = [{"op": "replace", "path": "/status", "value": "inactive"}]
    # Only an admin may: a unit may not patch its own Device.
    refused = _patch_as(strict, auth_headers, "unit-02", "/fhir/Device/unit-02", inactive)
    assert refused.status_code in (403, 404), refused.text
    response = _patch_as(strict, auth_headers, "admin", "/fhir/Device/unit-02", inactive)
    assert response.status_code == 200, response.text
    assert_unauthenticated(
        strict.get("/fhir/Organization/unit-02", headers=auth_headers("unit-02"))
    )


def test_a_unit_patches_only_the_records_it_may_update(
    strict: TestClient, auth_headers: Headers
) -> None:
    put_reference_data(strict, auth_headers)
    visit = post_visit(strict, auth_headers, "unit-01", fresh_national_id())
    path = f"/fhir/Patient/{visit.patient}"
    phone = [{"op": "add", "path": "/telecom", "value": [{"system": "phone", "value": "0611"}]}]
    assert _patch_as(strict, auth_headers, "unit-02", path, phone).status_code == 404
    assert _patch_as(strict, auth_headers, "relay", path, phone).status_code == 403
    own = _patch_as(strict, auth_headers, "unit-01", path, phone)
    assert own.status_code == 200, own.text
    assert own.json()["telecom"][0]["value"] == "0611"
    # Conditionally: nothing learnt of what the caller may not read.
    query = f"/fhir/Patient?identifier={NATIONAL_ID}|{visit.national_id}"
    other = [{"op": "replace", "path": "/gender", "value": "other"}]
    hidden = _patch_as(strict, auth_headers, "unit-02", query, other)
    assert hidden.status_code == 404, hidden.text
    assert visit.patient not in hidden.text
    assert "you may see" in hidden.text
    # A relay may not patch at all, whether or not the identifier is known.
    unknown = f"/fhir/Patient?identifier={NATIONAL_ID}|{fresh_national_id()}"
    for probe in (query, unknown):
        assert _patch_as(strict, auth_headers, "relay", probe, other).status_code == 403


def test_a_compartment_search_shows_only_what_the_caller_may_see(
    strict: TestClient, auth_headers: Headers
) -> None:
    put_reference_data(strict, auth_headers)
    visit = post_visit(strict, auth_headers, "unit-01", fresh_national_id())
    path = f"/fhir/Patient/{visit.patient}/Observation"
    own = strict.get(path, headers=auth_headers("unit-01"))
    assert own.status_code == 200, own.text
    assert own.json().get("entry")
    other = strict.get(path, headers=auth_headers("unit-02"))
    assert other.status_code == 200, other.text
    assert not other.json().get("entry")
    assert strict.get(path, headers=auth_headers("relay")).status_code == 403
