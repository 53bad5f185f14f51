"""Media and DocumentReference linking: units cite their uploads, Waha checks and fills them.

Uploads go through POST /fhir/Binary into the real local S3 server, bundles
through POST /fhir with real tokens; the derivatives handler runs on the real
outbox rows.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file
from sqlalchemy import text
from sqlalchemy.orm import Session

from auth.errors import Forbidden
from auth.policy import access_for
from auth.tokens import Principal, TokenValidator
from bench.population import reference_resources
from fhir_api import writes
from fhir_api.errors import InvalidResource
from fhir_api.writes import WriteSettings
from hub import outbox
from hub.settings import Settings
from imaging_store import media, repository
from imaging_store.derivatives import repository as derivatives_repository
from imaging_store.derivatives import service as derivatives_service
from imaging_store.derivatives.handlers import TOPIC, resource_changed_handler
from imaging_store.service import (
    BinaryContent,
    Caller,
    StoredBinary,
    binary_storage,
    record_upload,
)
from tests.builders import BUNDLE_ID_SYSTEM, NATIONAL_ID, patient
from tests.imaging_store import samples
from tests.servers import TokenSource

JSON = dict[str, Any]
Headers = Callable[[str], dict[str, str]]
QUALITY_URL = "https://waha.health/fhir/StructureDefinition/image-quality"


# --- helpers ------------------------------------------------------------------------------


def sha1_base64(content: bytes) -> str:
    """Return R4's Attachment.hash of some bytes."""
    return base64.b64encode(hashlib.sha1(content, usedforsecurity=False).digest()).decode()


def upload(client: TestClient, headers: dict[str, str], content: bytes, **extra: str) -> str:
    """Upload bytes through POST /fhir/Binary and return the Binary's id."""
    response = client.post(
        "/fhir/Binary",
        content=content,
        headers={**headers, "Content-Type": "application/octet-stream", **extra},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def json_text(value: object) -> str:
    """Serialize for comparison, keys sorted."""
    return json.dumps(value, sort_keys=True)


def fresh_national_id() -> str:
    """Return a national ID nobody else in the test database carries."""
    return f"MD{uuid.uuid4().hex[:10].upper()}"


def photo_media(binary_url: str, *, patient_url: str, encounter_url: str | None = None) -> JSON:
    """Return a Media citing an uploaded photo, as a unit sends it."""
    resource: JSON = {
        "resourceType": "Media",
        "status": "completed",
        "subject": {"reference": patient_url},
        "createdDateTime": "2026-11-18T10:15:00+01:00",
        "content": {"contentType": "image/jpeg", "url": binary_url, "title": "lesion.jpg"},
    }
    if encounter_url is not None:
        resource["encounter"] = {"reference": encounter_url}
    return resource


def pdf_document(binary_url: str, *, patient_url: str) -> JSON:
    """Return a DocumentReference citing an uploaded PDF."""
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": patient_url},
        "content": [{"attachment": {"url": binary_url, "title": "ecg-report.pdf"}}],
    }


def visit_bundle(national_id: str, unit: str, *cited: JSON) -> JSON:
    """Return a unit's transaction: conditional Patient, its Encounter, then `cited` resources.

    A cited resource's subject and encounter may be the placeholders
    `{patient}` and `{encounter}`, replaced by the bundle's own entries.
    """
    patient_url, encounter_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
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
                "serviceProvider": {"reference": f"Organization/{unit}"},
            },
            "request": {"method": "POST", "url": "Encounter"},
        },
    ]
    placeholders = {"{patient}": patient_url, "{encounter}": encounter_url}
    for resource in cited:
        for key in ("subject", "encounter"):
            reference = (resource.get(key) or {}).get("reference")
            if reference in placeholders:
                resource[key] = {"reference": placeholders[reference]}
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
        )
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "identifier": {"system": BUNDLE_ID_SYSTEM, "value": str(uuid.uuid4())},
        "entry": entries,
    }


def post_bundle(client: TestClient, headers: dict[str, str], bundle: JSON) -> list[str]:
    """Post a transaction and return `Type/id` of each entry."""
    response = client.post("/fhir", json=bundle, headers=headers)
    assert response.status_code == 200, response.text
    return [
        "/".join(entry["response"]["location"].split("/")[:2]) for entry in response.json()["entry"]
    ]


def media_of(binary_id: str, patient_url: str = "{patient}", **content: Any) -> JSON:
    """Return a photo Media of the visit citing `Binary/<binary_id>`, with extra content."""
    resource = photo_media(f"Binary/{binary_id}", patient_url=patient_url)
    resource["encounter"] = {"reference": "{encounter}"}
    resource["content"].update(content)
    return resource


def assert_refused(response: Any, status: int, code: str, expression: str) -> JSON:
    """Assert an OperationOutcome with this status, first issue code and element path."""
    assert response.status_code == status, response.text
    body: JSON = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["code"] == code, body
    assert issue["expression"] == [expression], body
    return body


def read(client: TestClient, reference: str, headers: dict[str, str]) -> JSON:
    """Read one resource and return it."""
    response = client.get(f"/fhir/{reference}", headers=headers)
    assert response.status_code == 200, response.text
    body: JSON = response.json()
    return body


def count_media(session: Session) -> int:
    """Count the stored Media."""
    return int(
        session.execute(
            text("SELECT count(*) FROM fhir_resource WHERE resource_type = 'Media'")
        ).scalar_one()
    )


def small_photo() -> bytes:
    """Return a real, decodable JPEG the quality check judges too small."""
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (150, 120, 100)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def dicom_bytes(name: str) -> bytes:
    """Return one of pydicom's bundled sample files."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's bundled {name} is missing"
    with open(path, "rb") as handle:
        return handle.read()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def linker(settings: Settings) -> Iterator[media.AttachmentLinker]:
    """Register the Media/DocumentReference preparer for the test (as create_app will)."""
    preparer = media.linker_for(settings.fhir_base_url)
    # An app that already registers it keeps it after the test.
    registered_before = {
        resource_type: preparer in writes._preparers.get(resource_type, [])  # noqa: SLF001
        for resource_type in media.LINKED_TYPES
    }
    for resource_type in media.LINKED_TYPES:
        writes.register_preparer(resource_type, preparer)
    try:
        yield preparer
    finally:
        for resource_type in media.LINKED_TYPES:
            if not registered_before[resource_type]:
                writes.unregister_preparer(resource_type, preparer)


@pytest.fixture
def reference_data(client: TestClient) -> None:
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
    assert client.post("/fhir", json=bundle).status_code == 200


@pytest.fixture
def unit_01(auth_headers: Headers) -> dict[str, str]:
    """The Authorization header of unit-01."""
    return auth_headers("unit-01")


@pytest.fixture
def write_settings(settings: Settings) -> WriteSettings:
    """The write settings the derivatives handler uses."""
    return WriteSettings(base_url=settings.fhir_base_url)


@pytest.fixture
def drain(settings: Settings, session: Session) -> Iterator[Callable[[], int]]:
    """Deliver every due outbox event to the derivatives handler (registered for the test)."""
    handler = resource_changed_handler(settings)
    outbox.register_handler(TOPIC, handler)

    def run() -> int:
        handled = 0
        while count := outbox.drain(session, batch_size=100, max_attempts=5):
            handled += count
        return handled

    try:
        yield run
    finally:
        outbox.unregister_handler(TOPIC, handler)


def caller_of(settings: Settings, tokens: TokenSource, name: str) -> Caller:
    """Describe a real caller as the upload routes do, from a real token."""
    access = access_for(TokenValidator.from_settings(settings).validate(tokens.token(name)))
    return Caller(
        client_id=access.client_id,
        author=access.author,
        request_id="test",
        access=access,
        unit=access.unit,
    )


# --- Media in a unit's bundle -------------------------------------------------------------


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_units_media_gets_size_and_hash_of_its_upload(
    client: TestClient, session: Session, unit_01: dict[str, str]
) -> None:
    content = samples.jpeg()
    binary_id = upload(client, unit_01, content)

    refs = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01", media_of(binary_id))
    )

    patient_ref, encounter_ref, media_ref = refs
    stored = read(client, media_ref, unit_01)
    assert stored["content"] == {
        "contentType": "image/jpeg",
        "url": f"Binary/{binary_id}",
        "title": "lesion.jpg",
        "size": len(content),
        "hash": sha1_base64(content),
    }
    assert stored["subject"] == {"reference": patient_ref}
    assert stored["encounter"] == {"reference": encounter_ref}
    [link] = repository.list_binary_links(session, binary_id)
    assert (link.resource_type, link.resource_id, link.patient_id) == (
        "Media",
        media_ref.split("/")[1],
        patient_ref.split("/")[1],
    )


@pytest.mark.usefixtures("linker", "reference_data")
def test_given_values_that_agree_and_an_absolute_url_are_accepted(
    client: TestClient, settings: Settings, unit_01: dict[str, str]
) -> None:
    content = samples.jpeg()
    binary_id = upload(client, unit_01, content)
    resource = media_of(binary_id, size=len(content), hash=sha1_base64(content))
    resource["content"]["url"] = f"{settings.fhir_base_url}/Binary/{binary_id}"

    *_, media_ref = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01", resource)
    )

    stored = read(client, media_ref, unit_01)
    assert stored["content"]["url"] == f"{settings.fhir_base_url}/Binary/{binary_id}"
    assert stored["content"]["size"] == len(content)


@pytest.mark.usefixtures("linker", "reference_data")
@pytest.mark.parametrize(
    ("content", "element", "code"),
    [
        ({"size": 12}, "size", "value"),
        ({"hash": sha1_base64(b"other bytes")}, "hash", "value"),
        ({"hash": "not base64!"}, "hash", "value"),
        ({"contentType": "image/png"}, "contentType", "value"),
        ({"data": base64.b64encode(samples.jpeg()).decode()}, "data", "invalid"),
    ],
    ids=["size", "hash", "hash-not-base64", "content-type", "data-and-url"],
)
def test_disagreeing_values_are_422_naming_the_element_and_nothing_is_stored(
    client: TestClient,
    session: Session,
    unit_01: dict[str, str],
    content: JSON,
    element: str,
    code: str,
) -> None:
    binary_id = upload(client, unit_01, samples.jpeg())
    before = count_media(session)

    response = client.post(
        "/fhir",
        json=visit_bundle(fresh_national_id(), "unit-01", media_of(binary_id, **content)),
        headers=unit_01,
    )

    assert_refused(response, 422, code, f"Bundle.entry[2].resource.content.{element}")
    assert count_media(session) == before
    assert repository.list_binary_links(session, binary_id) == []


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_missing_or_deleted_binary_is_422(client: TestClient, unit_01: dict[str, str]) -> None:
    response = client.post(
        "/fhir",
        json=visit_bundle(fresh_national_id(), "unit-01", media_of("no-such-binary")),
        headers=unit_01,
    )
    body = assert_refused(response, 422, "not-found", "Bundle.entry[2].resource.content.url")
    assert "Binary/no-such-binary does not exist" in body["issue"][0]["diagnostics"]

    deleted = upload(client, unit_01, samples.jpeg())
    assert client.delete(f"/fhir/Binary/{deleted}", headers=unit_01).status_code == 204
    response = client.post(
        "/fhir",
        json=visit_bundle(fresh_national_id(), "unit-01", media_of(deleted)),
        headers=unit_01,
    )
    assert_refused(response, 422, "not-found", "Bundle.entry[2].resource.content.url")


@pytest.mark.usefixtures("linker", "reference_data")
def test_another_units_unlinked_binary_is_as_missing(
    client: TestClient, session: Session, auth_headers: Headers, unit_01: dict[str, str]
) -> None:
    binary_id = upload(client, unit_01, samples.jpeg())

    response = client.post(
        "/fhir",
        json=visit_bundle(fresh_national_id(), "unit-02", media_of(binary_id)),
        headers=auth_headers("unit-02"),
    )

    body = assert_refused(response, 422, "not-found", "Bundle.entry[2].resource.content.url")
    assert f"Binary/{binary_id} does not exist" in body["issue"][0]["diagnostics"]
    assert repository.list_binary_links(session, binary_id) == []


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_linked_binary_follows_the_patients_record(
    client: TestClient, auth_headers: Headers, unit_01: dict[str, str]
) -> None:
    content = samples.jpeg()
    binary_id = upload(client, unit_01, content)
    national_id = fresh_national_id()
    coordinator, derm, unit_02 = (
        auth_headers(name) for name in ("coordinator", "specialist.derm", "unit-02")
    )
    # Before the link: the uploading unit's alone.
    for headers in (coordinator, unit_02):
        assert client.get(f"/fhir/Binary/{binary_id}", headers=headers).status_code == 404

    post_bundle(client, unit_01, visit_bundle(national_id, "unit-01", media_of(binary_id)))

    # The coordinator of the unit's region sees the patient, hence the photo.
    response = client.get(f"/fhir/Binary/{binary_id}", headers=coordinator)
    assert response.status_code == 200, response.text
    assert response.content == content
    # A stranger to the record does not, nor does another unit yet.
    assert client.get(f"/fhir/Binary/{binary_id}", headers=derm).status_code == 404
    assert client.get(f"/fhir/Binary/{binary_id}", headers=unit_02).status_code == 404

    # unit-02 meets the same person (conditional create): the record, photo included.
    post_bundle(client, unit_02, visit_bundle(national_id, "unit-02"))
    response = client.get(f"/fhir/Binary/{binary_id}", headers=unit_02)
    assert response.status_code == 200, response.text
    assert response.content == content
    assert client.get(f"/fhir/Binary/{binary_id}", headers=derm).status_code == 404


def _audit_events(client: TestClient, admin: dict[str, str], request_id: str) -> list[JSON]:
    since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    response = client.get(f"/fhir/AuditEvent?date=ge{since}&_count=500", headers=admin)
    assert response.status_code == 200, response.text
    return [
        entry["resource"]
        for entry in response.json().get("entry", [])
        if any(
            entity.get("what", {}).get("identifier", {}).get("value") == request_id
            for entity in entry["resource"].get("entity", [])
        )
    ]


def _entity_references(event: JSON) -> set[str]:
    return {str(e["what"]["reference"]) for e in event["entity"] if "reference" in e["what"]}


@pytest.mark.usefixtures("linker", "reference_data")
def test_downloads_of_a_patients_photo_are_audited_with_the_patient(
    client: TestClient, auth_headers: Headers, unit_01: dict[str, str]
) -> None:
    admin, coordinator, stranger = (
        auth_headers(name) for name in ("admin", "coordinator", "specialist.derm")
    )
    upload_request = uuid.uuid4().hex
    binary_id = upload(client, unit_01, samples.jpeg(), **{"X-Request-Id": upload_request})
    [uploaded] = _audit_events(client, admin, upload_request)
    assert _entity_references(uploaded) == {f"Binary/{binary_id}"}
    refs = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01", media_of(binary_id))
    )
    patient_ref = refs[0]
    paths = (
        f"/fhir/Binary/{binary_id}",
        f"/imaging/binaries/{binary_id}/thumbnail",
    )
    for path in paths:
        request_id = uuid.uuid4().hex
        response = client.get(path, headers={**coordinator, "X-Request-Id": request_id})
        assert response.status_code in (200, 202), response.text
        [event] = _audit_events(client, admin, request_id)
        # The patient's access report lists who saw their photo.
        assert f"Binary/{binary_id}" in _entity_references(event)
        assert patient_ref in _entity_references(event)
    # A refused download names the Binary that was tried, and no patient.
    request_id = uuid.uuid4().hex
    response = client.get(paths[0], headers={**stranger, "X-Request-Id": request_id})
    assert response.status_code == 404
    [event] = _audit_events(client, admin, request_id)
    assert _entity_references(event) == {f"Binary/{binary_id}"}
    assert event["outcome"] != "0"


@pytest.mark.usefixtures("linker", "reference_data")
def test_the_same_binary_cannot_be_cited_for_another_patient(
    client: TestClient, session: Session, unit_01: dict[str, str]
) -> None:
    binary_id = upload(client, unit_01, samples.jpeg())
    post_bundle(client, unit_01, visit_bundle(fresh_national_id(), "unit-01", media_of(binary_id)))
    # The same patient may cite it again (a second Media, a re-sent bundle).
    first_patient = repository.list_linked_patient_ids(session, binary_id)

    response = client.post(
        "/fhir",
        json=visit_bundle(fresh_national_id(), "unit-01", media_of(binary_id)),
        headers=unit_01,
    )

    body = assert_refused(response, 422, "business-rule", "Bundle.entry[2].resource.content.url")
    assert "another patient" in body["issue"][0]["diagnostics"]
    assert repository.list_linked_patient_ids(session, binary_id) == first_patient


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_second_media_of_the_same_patient_is_accepted(
    client: TestClient, session: Session, unit_01: dict[str, str]
) -> None:
    binary_id = upload(client, unit_01, samples.jpeg())
    national_id = fresh_national_id()
    post_bundle(client, unit_01, visit_bundle(national_id, "unit-01", media_of(binary_id)))

    post_bundle(client, unit_01, visit_bundle(national_id, "unit-01", media_of(binary_id)))

    links = repository.list_binary_links(session, binary_id)
    assert len(links) == 2
    assert len({link.patient_id for link in links}) == 1


@pytest.mark.usefixtures("linker", "reference_data")
def test_an_upload_naming_a_patient_cannot_be_cited_for_another(
    client: TestClient, unit_01: dict[str, str]
) -> None:
    refs = post_bundle(client, unit_01, visit_bundle(fresh_national_id(), "unit-01"))
    binary_id = upload(client, unit_01, samples.jpeg(), **{"X-Security-Context": refs[0]})

    response = client.post(
        "/fhir",
        json=visit_bundle(fresh_national_id(), "unit-01", media_of(binary_id)),
        headers=unit_01,
    )

    assert_refused(response, 422, "business-rule", "Bundle.entry[2].resource.content.url")


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_media_update_that_cites_another_binary_moves_its_link(
    client: TestClient, session: Session, unit_01: dict[str, str]
) -> None:
    first, second = (upload(client, unit_01, samples.jpeg()) for _ in range(2))
    *_, media_ref = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01", media_of(first))
    )
    stored = read(client, media_ref, unit_01)
    stored["content"] = {"url": f"Binary/{second}"}

    response = client.put(f"/fhir/{media_ref}", json=stored, headers=unit_01)

    assert response.status_code == 200, response.text
    assert response.json()["content"]["size"] == len(samples.jpeg())
    assert repository.list_binary_links(session, first) == []
    assert [link.resource_id for link in repository.list_binary_links(session, second)] == [
        media_ref.split("/")[1]
    ]


# --- DocumentReference --------------------------------------------------------------------


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_document_reference_cites_a_pdf(
    client: TestClient, session: Session, unit_01: dict[str, str]
) -> None:
    content = samples.pdf()
    binary_id = upload(client, unit_01, content)

    *_, document_ref = post_bundle(
        client,
        unit_01,
        visit_bundle(
            fresh_national_id(),
            "unit-01",
            pdf_document(f"Binary/{binary_id}", patient_url="{patient}"),
        ),
    )

    stored = read(client, document_ref, unit_01)
    assert stored["content"][0]["attachment"] == {
        "url": f"Binary/{binary_id}",
        "title": "ecg-report.pdf",
        "contentType": "application/pdf",
        "size": len(content),
        "hash": sha1_base64(content),
    }
    [link] = repository.list_binary_links(session, binary_id)
    assert link.resource_type == "DocumentReference"


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_document_reference_with_a_wrong_size_names_its_attachment(
    client: TestClient, unit_01: dict[str, str]
) -> None:
    binary_id = upload(client, unit_01, samples.pdf())
    document = pdf_document(f"Binary/{binary_id}", patient_url="{patient}")
    document["content"][0]["attachment"]["size"] = 1

    response = client.post(
        "/fhir", json=visit_bundle(fresh_national_id(), "unit-01", document), headers=unit_01
    )

    assert_refused(response, 422, "value", "Bundle.entry[2].resource.content[0].attachment.size")


# --- quality ------------------------------------------------------------------------------


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_media_gets_the_quality_verdict_already_made(
    client: TestClient, session: Session, unit_01: dict[str, str], drain: Callable[[], int]
) -> None:
    binary_id = upload(client, unit_01, small_photo())
    drain()
    assert derivatives_service.quality_for_binary(session, binary_id) == "too-small"
    resource = media_of(binary_id)
    # A unit's own (stale) verdict is replaced, not duplicated.
    resource["extension"] = [{"url": QUALITY_URL, "valueCode": "ok"}]

    *_, media_ref = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01", resource)
    )

    stored = read(client, media_ref, unit_01)
    assert stored["extension"] == [{"url": QUALITY_URL, "valueCode": "too-small"}]


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_verdict_made_after_the_link_reaches_the_media(
    client: TestClient,
    session: Session,
    unit_01: dict[str, str],
    drain: Callable[[], int],
    write_settings: WriteSettings,
) -> None:
    binary_id = upload(client, unit_01, small_photo())
    *_, media_ref = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01", media_of(binary_id))
    )
    assert "extension" not in read(client, media_ref, unit_01)

    # The Binary's outbox event: previews, the verdict, and the verdict onto the Media.
    drain()

    stored = read(client, media_ref, unit_01)
    assert stored["extension"] == [{"url": QUALITY_URL, "valueCode": "too-small"}]
    assert stored["meta"]["versionId"] == "2"
    assert stored["content"]["size"] == len(small_photo())
    # Run again (a redelivered event): nothing changes.
    assert (
        media.apply_quality_to_linked_media(session, binary_id, write_settings=write_settings) == []
    )
    assert read(client, media_ref, unit_01)["meta"]["versionId"] == "2"


def test_no_verdict_no_media_change(
    client: TestClient, session: Session, unit_01: dict[str, str], write_settings: WriteSettings
) -> None:
    binary_id = upload(client, unit_01, samples.pdf())
    assert (
        media.apply_quality_to_linked_media(session, binary_id, write_settings=write_settings) == []
    )
    assert (
        media.apply_quality_to_linked_media(session, "no-such", write_settings=write_settings) == []
    )


# --- DICOM --------------------------------------------------------------------------------


def _studies(client: TestClient, study_uid: str) -> list[JSON]:
    response = client.get(f"/fhir/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study_uid}")
    assert response.status_code == 200, response.text
    return [entry["resource"] for entry in response.json().get("entry", [])]


CT_STUDY_UID = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_media_naming_a_known_patient_writes_the_waiting_dicom_study_at_once(
    client: TestClient, session: Session, unit_01: dict[str, str], drain: Callable[[], int]
) -> None:
    national_id = fresh_national_id()
    patient_ref, _ = post_bundle(client, unit_01, visit_bundle(national_id, "unit-01"))
    binary_id = upload(client, unit_01, dicom_bytes("CT_small.dcm"))
    drain()
    assert _studies(client, CT_STUDY_UID) == []
    resource = media_of(binary_id)
    del resource["content"]["contentType"]

    # The next visit's bundle matches the known patient: the preparer writes
    # the study through a nested engine run, in the bundle's transaction.
    refs = post_bundle(client, unit_01, visit_bundle(national_id, "unit-01", resource))

    assert refs[0] == patient_ref
    [study] = _studies(client, CT_STUDY_UID)
    assert study["subject"] == {"reference": patient_ref}
    assert _study_state(session, binary_id) == ("ready", study["id"])


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_dicom_study_of_a_patient_new_in_the_bundle_is_written_after_it(
    client: TestClient,
    session: Session,
    unit_01: dict[str, str],
    drain: Callable[[], int],
    write_settings: WriteSettings,
) -> None:
    binary_id = upload(client, unit_01, dicom_bytes("CT_small.dcm"))
    drain()
    resource = media_of(binary_id)
    del resource["content"]["contentType"]

    patient_ref, _, media_ref = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01", resource)
    )

    # Not refused for good: still waiting, until the Media's event is handled.
    assert _studies(client, CT_STUDY_UID) == []
    assert _study_state(session, binary_id) == ("pending", None)
    media.complete_links_of(
        session, "Media", media_ref.split("/")[1], write_settings=write_settings
    )
    [study] = _studies(client, CT_STUDY_UID)
    assert study["subject"] == {"reference": patient_ref}
    assert _study_state(session, binary_id) == ("ready", study["id"])
    # A redelivered event changes nothing.
    media.complete_links_of(
        session, "Media", media_ref.split("/")[1], write_settings=write_settings
    )
    assert [s["meta"]["versionId"] for s in _studies(client, CT_STUDY_UID)] == ["1"]


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_dicom_study_made_after_the_link_finds_its_patient(
    client: TestClient,
    session: Session,
    unit_01: dict[str, str],
    drain: Callable[[], int],
    write_settings: WriteSettings,
) -> None:
    binary_id = upload(client, unit_01, dicom_bytes("CT_small.dcm"))
    resource = media_of(binary_id)
    del resource["content"]["contentType"]
    patient_ref, *_ = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01", resource)
    )
    # The Binary's outbox event makes the study and, the Media naming the
    # patient already, writes it for that patient.
    drain()

    [study] = _studies(client, CT_STUDY_UID)
    assert study["subject"] == {"reference": patient_ref}
    again = media.create_linked_imaging_study(session, binary_id, write_settings=write_settings)
    assert again in (None, study["id"])
    assert len(_studies(client, CT_STUDY_UID)) == 1
    # Photos and unknown Binaries have no study to write.
    photo = upload(client, unit_01, samples.jpeg())
    assert media.create_linked_imaging_study(session, photo, write_settings=write_settings) is None
    assert media.create_linked_imaging_study(session, "nope", write_settings=write_settings) is None


def _study_state(session: Session, binary_id: str) -> tuple[str, str | None]:
    row = derivatives_repository.get_derivative(session, binary_id, "imaging-study")
    assert row is not None
    session.refresh(row)
    return row.status, row.imaging_study_id


# --- the Media Waha records for an upload naming its patient ------------------------------


@pytest.mark.usefixtures("linker", "reference_data")
def test_an_upload_naming_its_patient_gets_its_media(
    client: TestClient,
    session: Session,
    settings: Settings,
    tokens: TokenSource,
    unit_01: dict[str, str],
    auth_headers: Headers,
) -> None:
    patient_ref, encounter_ref = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01")
    )
    content = samples.jpeg()
    response = client.post(
        "/fhir/Binary",
        content=content,
        headers={**unit_01, "Content-Type": "image/jpeg", "X-Security-Context": patient_ref},
    )
    assert response.status_code == 201, response.text
    binary_id = response.json()["id"]
    media_id = response.headers["Waha-Media"].removeprefix("Media/")

    stored = read(client, f"Media/{media_id}", unit_01)
    assert stored["status"] == "completed"
    assert stored["subject"] == {"reference": patient_ref}
    assert stored["device"] == {"reference": "Device/unit-01"}
    assert "createdDateTime" in stored
    assert stored["content"] == {
        "contentType": "image/jpeg",
        "url": f"Binary/{binary_id}",
        "size": len(content),
        "hash": sha1_base64(content),
    }
    assert stored["meta"]["versionId"] == "1"
    [link] = repository.list_binary_links(session, binary_id)
    assert (link.resource_id, link.patient_id) == (media_id, patient_ref.split("/")[1])
    coordinator = auth_headers("coordinator")
    assert client.get(f"/fhir/Binary/{binary_id}", headers=coordinator).status_code == 200
    # A unit's bundle may cite the same Binary for the same patient.
    assert encounter_ref.startswith("Encounter/")


@pytest.mark.usefixtures("linker", "reference_data")
def test_an_upload_naming_its_encounter_gets_a_media_of_that_visit(
    client: TestClient,
    session: Session,
    settings: Settings,
    tokens: TokenSource,
    unit_01: dict[str, str],
) -> None:
    patient_ref, encounter_ref = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01")
    )
    binary_id = upload(client, unit_01, samples.pdf(), **{"X-Security-Context": encounter_ref})
    row = repository.get_binary_object(session, binary_id)
    assert row is not None

    media_id = media.record_media_for_upload(
        session, row, caller_of(settings, tokens, "unit-01"), settings.fhir_base_url
    )

    stored = read(client, f"Media/{media_id}", unit_01)
    assert stored["subject"] == {"reference": patient_ref}
    assert stored["encounter"] == {"reference": encounter_ref}
    assert stored["content"]["contentType"] == "application/pdf"


@pytest.mark.usefixtures("linker", "reference_data")
def test_a_tus_upload_naming_patient_and_encounter_gets_both(
    client: TestClient,
    session: Session,
    settings: Settings,
    tokens: TokenSource,
    unit_01: dict[str, str],
) -> None:
    patient_ref, encounter_ref = post_bundle(
        client, unit_01, visit_bundle(fresh_national_id(), "unit-01")
    )
    _, other_encounter = post_bundle(client, unit_01, visit_bundle(fresh_national_id(), "unit-01"))
    binary_id = upload(client, unit_01, samples.jpeg(), **{"X-Security-Context": patient_ref})
    caller = caller_of(settings, tokens, "unit-01")

    with pytest.raises(InvalidResource) as refused:
        media.record_media_for_binary(
            session,
            binary_id=binary_id,
            caller=caller,
            base_url=settings.fhir_base_url,
            encounter_id=other_encounter.split("/")[1],
        )
    assert refused.value.issues[0].expression == "Media.encounter"

    media_id = media.record_media_for_binary(
        session,
        binary_id=binary_id,
        caller=caller,
        base_url=settings.fhir_base_url,
        encounter_id=encounter_ref.split("/")[1],
    )

    stored = read(client, f"Media/{media_id}", unit_01)
    assert stored["subject"] == {"reference": patient_ref}
    assert stored["encounter"] == {"reference": encounter_ref}


@pytest.mark.usefixtures("linker", "reference_data")
def test_an_upload_naming_a_patient_the_unit_cannot_see_gets_no_media(
    client: TestClient,
    session: Session,
    settings: Settings,
    tokens: TokenSource,
    auth_headers: Headers,
    unit_01: dict[str, str],
) -> None:
    patient_ref, _ = post_bundle(client, unit_01, visit_bundle(fresh_national_id(), "unit-01"))
    before = count_media(session)
    response = client.post(
        "/fhir/Binary",
        content=samples.jpeg(),
        headers={
            **auth_headers("unit-02"),
            "Content-Type": "image/jpeg",
            "X-Security-Context": patient_ref,
        },
    )
    # Naming a record the unit cannot see is naming nothing that exists.
    assert response.status_code == 422, response.text
    assert count_media(session) == before


def test_an_upload_naming_nothing_gets_no_media(
    client: TestClient, session: Session, settings: Settings, tokens: TokenSource
) -> None:
    binary_id = upload(client, {}, samples.jpeg())
    row = repository.get_binary_object(session, binary_id)
    assert row is not None
    before = count_media(session)

    caller = caller_of(settings, tokens, "admin")
    assert media.record_media_for_upload(session, row, caller, settings.fhir_base_url) is None
    assert (
        media.record_media_for_binary(
            session, binary_id="no-such", caller=caller, base_url=settings.fhir_base_url
        )
        is None
    )
    assert count_media(session) == before


# --- pure helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("Binary/abc-1", "abc-1"),
        ("Binary/abc-1/_history/2", "abc-1"),
        ("http://base/fhir/Binary/abc-1", "abc-1"),
        ("http://elsewhere/fhir/Binary/abc-1", None),
        ("Binary/", None),
        ("Media/abc", None),
        ("urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e", None),
        (None, None),
    ],
)
def test_binary_id_of(url: str | None, expected: str | None) -> None:
    assert media.binary_id_of(url, base_url="http://base/fhir") == expected


# --- who may upload, delete and name a context ------------------------------------------


@pytest.mark.usefixtures("reference_data")
def test_only_roles_that_write_may_upload_and_only_owners_may_delete(
    client: TestClient, auth_headers: Headers, unit_01: dict[str, str]
) -> None:
    binary_id = upload(client, unit_01, samples.jpeg())
    for role in ("relay", "ministry"):
        refused = client.post(
            "/fhir/Binary",
            content=samples.jpeg(),
            headers={**auth_headers(role), "Content-Type": "image/jpeg"},
        )
        assert refused.status_code == 403, (role, refused.text)
        gone = client.delete(f"/fhir/Binary/{binary_id}", headers=auth_headers(role))
        assert gone.status_code == 403, (role, gone.text)
    assert (
        client.delete(f"/fhir/Binary/{binary_id}", headers=auth_headers("unit-02")).status_code
        == 404
    )
    assert client.get(f"/fhir/Binary/{binary_id}", headers=unit_01).status_code == 200
    assert client.delete(f"/fhir/Binary/{binary_id}", headers=unit_01).status_code == 204
    # Deleted: its owner learns so; another unit learns nothing at all.
    assert client.get(f"/fhir/Binary/{binary_id}", headers=unit_01).status_code == 410
    for path in (f"/fhir/Binary/{binary_id}", f"/imaging/binaries/{binary_id}/thumbnail"):
        assert client.get(path, headers=auth_headers("unit-02")).status_code == 404, path


@pytest.mark.usefixtures("reference_data")
def test_people_own_their_uploads_not_the_client_they_share(
    client: TestClient, auth_headers: Headers
) -> None:
    # Every person logs in through the same CLI or browser client.
    coordinator = auth_headers("coordinator")
    binary_id = upload(client, coordinator, samples.jpeg())
    assert client.get(f"/fhir/Binary/{binary_id}", headers=coordinator).status_code == 200
    for other in ("specialist.derm", "specialist.cardio"):
        answer = client.get(f"/fhir/Binary/{binary_id}", headers=auth_headers(other))
        assert answer.status_code == 404, (other, answer.text)


@pytest.mark.usefixtures("linker", "reference_data")
def test_an_upload_naming_a_hidden_record_is_refused_as_one_naming_nothing(
    client: TestClient, auth_headers: Headers, unit_01: dict[str, str], settings: Settings
) -> None:
    hidden = post_bundle(client, unit_01, visit_bundle(fresh_national_id(), "unit-01"))
    patient_id = next(ref for ref in hidden if ref.startswith("Patient/")).split("/")[1]
    encounter_id = next(ref for ref in hidden if ref.startswith("Encounter/")).split("/")[1]
    unit_02 = {**auth_headers("unit-02"), "Content-Type": "image/jpeg"}
    answers = {}
    for context in (
        f"Encounter/{encounter_id}",
        f"Patient/{patient_id}",
        f"{settings.fhir_base_url}/Patient/{patient_id}",
        "Patient/nobody-at-all",
    ):
        answer = client.post(
            "/fhir/Binary",
            content=samples.jpeg(),
            headers={**unit_02, "X-Security-Context": context},
        )
        assert answer.status_code == 422, (context, answer.text)
        if context.startswith("Encounter/"):
            # The encounter's patient is not for this caller to learn.
            assert patient_id not in answer.text
        answers[context] = answer.json()["issue"][0]["code"]
    assert set(answers.values()) == {"not-found"}
    # The owner's own upload naming the record by this server's URL is stored locally.
    own = client.post(
        "/fhir/Binary",
        content=samples.jpeg(),
        headers={
            **unit_01,
            "Content-Type": "image/jpeg",
            "X-Security-Context": f"{settings.fhir_base_url}/Patient/{patient_id}",
        },
    )
    assert own.status_code == 201, own.text
    assert own.json()["securityContext"] == {"reference": f"Patient/{patient_id}"}
    assert "Waha-Media" in own.headers


@pytest.mark.usefixtures("reference_data")
def test_another_units_image_answers_as_no_image_at_all(
    client: TestClient, auth_headers: Headers, unit_01: dict[str, str]
) -> None:
    binary_id = upload(client, unit_01, samples.jpeg())
    unit_02 = auth_headers("unit-02")
    made_up = str(uuid.uuid4())
    for path in (
        "/fhir/Binary/{}",
        "/imaging/binaries/{}/thumbnail",
        "/imaging/binaries/{}/preview",
    ):
        theirs = client.get(path.format(binary_id), headers=unit_02)
        nothing = client.get(path.format(made_up), headers=unit_02)
        assert theirs.status_code == nothing.status_code == 404, path
        shown = [
            {key: value for key, value in answer.json().items() if key != "instance"}
            for answer in (theirs, nothing)
        ]
        assert json_text(shown[0]).replace(binary_id, "<id>") == json_text(shown[1]).replace(
            made_up, "<id>"
        ), path


@pytest.mark.usefixtures("linker", "reference_data")
@pytest.mark.parametrize("url", ["Binary/Binary/{id}", "Binary/", "Binary/{id}/extra"])
def test_a_malformed_binary_url_is_refused_not_kept_unchecked(
    client: TestClient, unit_01: dict[str, str], url: str
) -> None:
    binary_id = upload(client, unit_01, samples.jpeg())
    cited = media_of(binary_id)
    cited["content"]["url"] = url.format(id=binary_id)
    response = client.post(
        "/fhir", json=visit_bundle(fresh_national_id(), "unit-01", cited), headers=unit_01
    )
    body = assert_refused(response, 422, "not-found", "Bundle.entry[2].resource.content.url")
    assert "names no stored Binary" in body["issue"][0]["diagnostics"]


@pytest.mark.usefixtures("reference_data")
def test_the_uploads_location_serves_its_bytes_to_whoever_may_read_them(
    client: TestClient, auth_headers: Headers, unit_01: dict[str, str]
) -> None:
    content = samples.jpeg()
    uploaded = client.post(
        "/fhir/Binary", content=content, headers={**unit_01, "Content-Type": "image/jpeg"}
    )
    assert uploaded.status_code == 201, uploaded.text
    location = "/fhir/" + uploaded.headers["Location"].split("/fhir/", 1)[1]
    assert location.endswith("/_history/1")
    served = client.get(location, headers=unit_01)
    assert served.status_code == 200, served.text
    assert served.content == content
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    resource = client.get(location, headers={**unit_01, "Accept": "application/fhir+json"})
    assert base64.b64decode(resource.json()["data"]) == content
    binary_id = uploaded.json()["id"]
    assert client.get(f"/fhir/Binary/{binary_id}/_history/2", headers=unit_01).status_code == 404
    assert client.get(location, headers=auth_headers("unit-02")).status_code == 404
    assert client.delete(f"/fhir/Binary/{binary_id}", headers=unit_01).status_code == 204
    assert client.get(location, headers=unit_01).status_code == 410


def _unit_with_scopes(*scopes: str) -> Caller:
    principal = Principal(
        subject="unit-01",
        client_id="unit-01",
        username=None,
        roles=frozenset({"unit"}),
        unit="unit-01",
        region="marrakech-safi",
        community=None,
        specialty=None,
        scopes=frozenset(scopes),
        token_id=None,
        expires_at=4_000_000_000,
    )
    access = access_for(principal)
    return Caller(
        client_id="unit-01",
        author=access.author,
        request_id="test",
        access=access,
        unit="unit-01",
    )


def _upload_as(session: Session, settings: Settings, caller: Caller) -> StoredBinary:
    content = BinaryContent(limit=1024)
    try:
        content.feed(b"note de visite")
        return record_upload(
            session,
            storage=binary_storage(settings),
            content=content,
            caller=caller,
            base_url=settings.fhir_base_url,
            enforce_referential_integrity=True,
        )
    finally:
        content.close()


def test_an_upload_needs_create_not_update(session: Session, settings: Settings) -> None:
    # The Binary is written under an id the server chose: a create, whatever the method.
    stored = _upload_as(session, settings, _unit_with_scopes("system/Binary.cr"))
    assert stored.content_type == "text/plain"
    with pytest.raises(Forbidden):
        _upload_as(session, settings, _unit_with_scopes("system/Binary.r"))
