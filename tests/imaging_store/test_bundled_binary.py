"""Binary with base64 `data` inside a Bundle: bytes to the object store, never to PostgreSQL.

Bundles go through POST /fhir with real tokens; objects land on the real local
S3 server; rows in the real PostgreSQL of the test.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from minio import Minio
from sqlalchemy import text
from sqlalchemy.orm import Session

from bench.population import reference_resources
from fhir_api import writes
from fhir_api.writes import ResourcePreparer
from hub.settings import Settings
from imaging_store import bundled, media, repository
from tests.imaging_store import samples
from tests.imaging_store.conftest import TEST_MAX_BINARY_BYTES, free_port, stored_keys
from tests.imaging_store.test_media import (
    assert_refused,
    fresh_national_id,
    photo_media,
    sha1_base64,
    visit_bundle,
)

JSON = dict[str, Any]
Headers = Callable[[str], dict[str, str]]


# --- helpers ------------------------------------------------------------------------------


def binary_entry(content: bytes, *, content_type: str = "image/jpeg", **extra: Any) -> JSON:
    """Return a POST entry of a Binary carrying `content` as base64, with a urn:uuid fullUrl."""
    resource: JSON = {
        "resourceType": "Binary",
        "contentType": content_type,
        "data": base64.b64encode(content).decode(),
        **extra,
    }
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": resource,
        "request": {"method": "POST", "url": "Binary"},
    }


def put_binary_entry(binary_id: str, content: bytes, **request: str) -> JSON:
    """Return a PUT entry of `Binary/<binary_id>` carrying `content`."""
    return {
        "fullUrl": f"Binary/{binary_id}",
        "resource": {
            "resourceType": "Binary",
            "id": binary_id,
            "contentType": "image/jpeg",
            "data": base64.b64encode(content).decode(),
        },
        "request": {"method": "PUT", "url": f"Binary/{binary_id}", **request},
    }


def bundle_of(*entries: JSON, kind: str = "transaction") -> JSON:
    """Return a Bundle of these entries."""
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def located(response: Any) -> list[str]:
    """Return `Type/id` of each entry of a 200 transaction response."""
    assert response.status_code == 200, response.text
    return [
        "/".join(entry["response"]["location"].split("/")[:2]) for entry in response.json()["entry"]
    ]


def stored_document(session: Session, binary_id: str) -> JSON:
    """Return the current Binary resource as PostgreSQL holds it."""
    document: JSON = session.execute(
        text("SELECT resource FROM fhir_resource WHERE resource_type = 'Binary' AND id = :id"),
        {"id": binary_id},
    ).scalar_one()
    return document


def binary_documents_with_data(session: Session) -> int:
    """Count Binary documents (current or history) that kept their bytes in PostgreSQL."""
    return int(
        session.execute(
            text(
                "SELECT (SELECT count(*) FROM fhir_resource"
                "        WHERE resource_type = 'Binary' AND resource ? 'data')"
                " + (SELECT count(*) FROM fhir_resource_version"
                "    WHERE resource_type = 'Binary' AND resource ? 'data')"
            )
        ).scalar_one()
    )


def binary_count(session: Session) -> int:
    """Count binary_object rows and Binary resources visible to the test."""
    return int(
        session.execute(
            text(
                "SELECT (SELECT count(*) FROM binary_object)"
                " + (SELECT count(*) FROM fhir_resource WHERE resource_type = 'Binary')"
            )
        ).scalar_one()
    )


def object_bytes(s3: Minio, settings: Settings, binary_id: str) -> bytes:
    """Return the stored object of a Binary."""
    response = s3.get_object(settings.s3_bucket, f"binaries/{binary_id}")
    try:
        return bytes(response.read())
    finally:
        response.close()
        response.release_conn()


def media_entry(binary_url: str) -> JSON:
    """Return a POST entry of a photo Media citing `binary_url`, about the bundle's patient."""
    resource = photo_media(binary_url, patient_url="{patient}")
    resource["encounter"] = {"reference": "{encounter}"}
    return resource


# --- fixtures -----------------------------------------------------------------------------


@contextmanager
def _only_preparer(resource_type: str, preparer: ResourcePreparer) -> Iterator[None]:
    # Only this preparer, whatever an app built earlier registered: the
    # registry is per process, and the test decides which object store is used.
    before = list(writes._preparers.get(resource_type, []))  # noqa: SLF001
    for registered in before:
        writes.unregister_preparer(resource_type, registered)
    writes.register_preparer(resource_type, preparer)
    try:
        yield
    finally:
        writes.unregister_preparer(resource_type, preparer)
        for registered in before:
            writes.register_preparer(resource_type, registered)


@pytest.fixture
def binary_store(settings: Settings) -> Iterator[bundled.BundledBinaryStore]:
    """Register the Binary preparer on the test's S3 server (as create_app will)."""
    preparer = bundled.store_for(settings)
    with _only_preparer("Binary", preparer):
        yield preparer


@pytest.fixture
def down_binary_store(settings: Settings) -> Iterator[bundled.BundledBinaryStore]:
    """Register a Binary preparer whose object store is a closed port."""
    preparer = bundled.store_for(
        settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{free_port()}"})
    )
    with _only_preparer("Binary", preparer):
        yield preparer


@pytest.fixture
def linker(settings: Settings) -> Iterator[None]:
    """Register the Media/DocumentReference preparer for the test."""
    preparer = media.linker_for(settings.fhir_base_url)
    registered_before = {
        resource_type: preparer in writes._preparers.get(resource_type, [])  # noqa: SLF001
        for resource_type in media.LINKED_TYPES
    }
    for resource_type in media.LINKED_TYPES:
        writes.register_preparer(resource_type, preparer)
    try:
        yield
    finally:
        for resource_type in media.LINKED_TYPES:
            if not registered_before[resource_type]:
                writes.unregister_preparer(resource_type, preparer)


@pytest.fixture
def reference_data(client: TestClient) -> None:
    """Store the unit Organizations and Devices of the demo data, as admin."""
    wanted = [r for r in reference_resources() if r["resourceType"] in ("Organization", "Device")]
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in wanted
    ]
    assert client.post("/fhir", json=bundle_of(*entries)).status_code == 200


@pytest.fixture
def unit_01(auth_headers: Headers) -> dict[str, str]:
    """The Authorization header of unit-01."""
    return auth_headers("unit-01")


# --- the happy path -----------------------------------------------------------------------


@pytest.mark.usefixtures("binary_store", "linker", "reference_data")
def test_a_units_bundle_stores_the_photo_in_s3_and_links_its_media(
    client: TestClient,
    session: Session,
    s3: Minio,
    settings: Settings,
    unit_01: dict[str, str],
) -> None:
    content = samples.jpeg()
    photo = binary_entry(content, content_type="application/octet-stream")
    bundle = visit_bundle(fresh_national_id(), "unit-01", media_entry(photo["fullUrl"]))
    # Patient, Encounter, then the Binary, then the Media citing it by urn:uuid.
    bundle["entry"].insert(2, photo)

    locations = located(client.post("/fhir", json=bundle, headers=unit_01))

    binary_ref, media_ref = locations[2], locations[3]
    binary_id = binary_ref.split("/")[1]
    # PostgreSQL keeps a data-less Binary, typed from the bytes, as after an upload.
    document = stored_document(session, binary_id)
    assert "data" not in document
    assert document["contentType"] == "image/jpeg"
    assert binary_documents_with_data(session) == 0
    row = repository.get_binary_object(session, binary_id)
    assert row is not None
    assert row.owner_client_id == "unit-01"
    assert row.size == len(content)
    assert row.sha256 == hashlib.sha256(content).digest()
    assert row.object_key == f"binaries/{binary_id}"
    assert object_bytes(s3, settings, binary_id) == content
    # The Media cites the Binary by its final id and carries its size and hash.
    media_resource = client.get(f"/fhir/{media_ref}", headers=unit_01).json()
    assert media_resource["content"]["url"] == binary_ref
    assert media_resource["content"]["size"] == len(content)
    assert media_resource["content"]["hash"] == sha1_base64(content)
    assert [link.binary_id for link in repository.list_binary_links(session, binary_id)] == [
        binary_id
    ]
    # GET streams the bytes from the object store.
    response = client.get(f"/fhir/Binary/{binary_id}", headers=unit_01)
    assert response.status_code == 200, response.text
    assert response.content == content
    assert response.headers["content-type"] == "image/jpeg"


@pytest.mark.usefixtures("binary_store")
def test_the_security_context_names_the_owner_record(client: TestClient, session: Session) -> None:
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    photo = binary_entry(samples.png(), securityContext={"reference": patient_url})
    bundle = bundle_of(
        {
            "fullUrl": patient_url,
            "resource": {"resourceType": "Patient", "gender": "female"},
            "request": {"method": "POST", "url": "Patient"},
        },
        photo,
    )

    patient_ref, binary_ref = located(client.post("/fhir", json=bundle))

    row = repository.get_binary_object(session, binary_ref.split("/")[1])
    assert row is not None
    assert row.security_context == patient_ref
    assert row.content_type == "image/png"
    assert row.owner_client_id == "user:admin"  # the person, not the CLI client they share


@pytest.mark.usefixtures("binary_store")
def test_a_batch_entry_stores_its_binary_too(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    content = samples.pdf()

    response = client.post("/fhir", json=bundle_of(binary_entry(content), kind="batch"))

    binary_id = located(response)[0].split("/")[1]
    assert "data" not in stored_document(session, binary_id)
    assert object_bytes(s3, settings, binary_id) == content


@pytest.mark.usefixtures("binary_store")
def test_the_same_bytes_put_again_are_a_no_op_and_other_bytes_are_refused(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    binary_id = f"photo-{uuid.uuid4().hex[:12]}"
    content = samples.jpeg()
    first = client.post("/fhir", json=bundle_of(put_binary_entry(binary_id, content)))
    assert first.status_code == 200, first.text

    again = client.post("/fhir", json=bundle_of(put_binary_entry(binary_id, content)))
    assert again.status_code == 200, again.text
    assert again.json()["entry"][0]["response"]["etag"] == 'W/"1"'

    other = client.post("/fhir", json=bundle_of(put_binary_entry(binary_id, samples.png())))
    assert_refused(other, 405, "not-supported", "Bundle.entry[0].resource.data")
    assert object_bytes(s3, settings, binary_id) == content
    assert binary_documents_with_data(session) == 0


# --- unhappy paths: nothing stored --------------------------------------------------------


@pytest.mark.usefixtures("binary_store")
def test_mime_wrapped_base64_is_accepted(client: TestClient, s3: Minio, settings: Settings) -> None:
    content = samples.png(64, 64)
    entry = binary_entry(b"")
    entry["resource"]["data"] = base64.encodebytes(content).decode()
    assert "\n" in entry["resource"]["data"]

    binary_id = located(client.post("/fhir", json=bundle_of(entry)))[0].split("/")[1]

    assert object_bytes(s3, settings, binary_id) == content


@pytest.mark.usefixtures("binary_store")
# The first is refused by the resource validator, the second (which it lets
# through, dropping the `*`) by the preparer's strict decoder.
@pytest.mark.parametrize(
    ("data", "diagnostics"),
    [
        ("not base64 at all!", "Base64 decoding error"),
        ("aGVs*bG8h", "Binary.data is not valid base64"),
    ],
)
def test_bad_base64_is_422_at_binary_data(
    client: TestClient, session: Session, data: str, diagnostics: str
) -> None:
    entry = binary_entry(b"")
    entry["resource"]["data"] = data
    before = binary_count(session)

    response = client.post("/fhir", json=bundle_of(entry))

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["expression"] == ["Bundle.entry[0].resource.data"]
    assert diagnostics in body["issue"][0]["diagnostics"]
    assert binary_count(session) == before


@pytest.mark.usefixtures("binary_store")
def test_a_binary_without_data_is_422(client: TestClient, session: Session) -> None:
    entry = binary_entry(b"")
    del entry["resource"]["data"]
    before = binary_count(session)

    response = client.post("/fhir", json=bundle_of(entry))

    assert_refused(response, 422, "required", "Bundle.entry[0].resource.data")
    assert binary_count(session) == before


@pytest.mark.usefixtures("binary_store")
def test_content_over_the_limit_is_413(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    before, keys = binary_count(session), stored_keys(s3, settings)

    response = client.post(
        "/fhir", json=bundle_of(binary_entry(b"a" * (TEST_MAX_BINARY_BYTES + 1)))
    )

    assert_refused(response, 413, "too-costly", "Bundle.entry[0].resource.data")
    assert binary_count(session) == before
    assert stored_keys(s3, settings) == keys


@pytest.mark.usefixtures("binary_store")
@pytest.mark.parametrize("active", [samples.HTML, samples.SVG, samples.SHELL_SCRIPT, samples.ELF])
def test_active_content_declared_as_an_image_is_415(
    client: TestClient, session: Session, s3: Minio, settings: Settings, active: bytes
) -> None:
    before, keys = binary_count(session), stored_keys(s3, settings)

    response = client.post("/fhir", json=bundle_of(binary_entry(active, content_type="image/png")))

    assert_refused(response, 415, "not-supported", "Bundle.entry[0].resource.data")
    assert binary_count(session) == before
    assert stored_keys(s3, settings) == keys


@pytest.mark.usefixtures("down_binary_store")
def test_an_object_store_outage_is_503_and_the_transaction_writes_nothing(
    s3_down_client: TestClient, session: Session
) -> None:
    before = binary_count(session)
    bundle = bundle_of(
        {
            "resource": {"resourceType": "Patient", "gender": "male"},
            "request": {"method": "POST", "url": "Patient"},
        },
        binary_entry(samples.jpeg()),
    )
    patients = session.execute(
        text("SELECT count(*) FROM fhir_resource WHERE resource_type = 'Patient'")
    ).scalar_one()

    response = s3_down_client.post("/fhir", json=bundle)

    assert_refused(response, 503, "transient", "Bundle.entry[1]")
    assert binary_count(session) == before
    assert (
        session.execute(
            text("SELECT count(*) FROM fhir_resource WHERE resource_type = 'Patient'")
        ).scalar_one()
        == patients
    )


@pytest.mark.usefixtures("binary_store", "linker")
def test_a_later_entry_failing_leaves_no_object_and_no_row(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    before, keys = binary_count(session), stored_keys(s3, settings)
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    missing = photo_media(f"Binary/{uuid.uuid4()}", patient_url=patient_url)
    bundle = bundle_of(
        {
            "fullUrl": patient_url,
            "resource": {"resourceType": "Patient", "gender": "female"},
            "request": {"method": "POST", "url": "Patient"},
        },
        binary_entry(samples.jpeg()),
        {"resource": missing, "request": {"method": "POST", "url": "Media"}},
    )

    response = client.post("/fhir", json=bundle)

    assert_refused(response, 422, "not-found", "Bundle.entry[2].resource.content.url")
    assert binary_count(session) == before
    assert stored_keys(s3, settings) == keys


@pytest.mark.usefixtures("binary_store")
def test_a_failure_after_every_preparer_ran_leaves_no_object(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    binary_id = f"photo-{uuid.uuid4().hex[:12]}"
    # If-Match is checked while writing, after the Binary's object was put.
    entry = put_binary_entry(binary_id, samples.jpeg(), ifMatch='W/"3"')

    response = client.post("/fhir", json=bundle_of(binary_entry(samples.png()), entry))

    assert response.status_code == 412, response.text
    assert repository.get_binary_object(session, binary_id) is None
    assert f"binaries/{binary_id}" not in stored_keys(s3, settings)
    assert binary_documents_with_data(session) == 0


@pytest.mark.usefixtures("binary_store")
def test_a_failed_batch_entry_loses_its_object_and_the_others_keep_theirs(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    kept_id, lost_id = (f"photo-{uuid.uuid4().hex[:12]}" for _ in range(2))
    bundle = bundle_of(
        put_binary_entry(kept_id, samples.jpeg()),
        put_binary_entry(lost_id, samples.png(), ifMatch='W/"3"'),
        kind="batch",
    )

    response = client.post("/fhir", json=bundle)

    assert response.status_code == 200, response.text
    statuses = [entry["response"]["status"] for entry in response.json()["entry"]]
    assert statuses[0].startswith("201") and statuses[1].startswith("412"), statuses
    keys = stored_keys(s3, settings)
    assert f"binaries/{kept_id}" in keys
    assert f"binaries/{lost_id}" not in keys
    assert repository.get_binary_object(session, kept_id) is not None
    assert repository.get_binary_object(session, lost_id) is None


@pytest.mark.usefixtures("binary_store", "linker", "reference_data")
def test_a_media_listed_before_its_binary_still_links(
    client: TestClient, unit_01: dict[str, str]
) -> None:
    content = samples.jpeg()
    photo = binary_entry(content)
    bundle = visit_bundle(fresh_national_id(), "unit-01", media_entry(photo["fullUrl"]))
    bundle["entry"].append(photo)

    locations = located(client.post("/fhir", json=bundle, headers=unit_01))

    media_resource = client.get(f"/fhir/{locations[2]}", headers=unit_01).json()
    assert media_resource["content"]["url"] == locations[3]
    assert media_resource["content"]["hash"] == sha1_base64(content)


@pytest.mark.usefixtures("binary_store")
def test_uploads_and_their_data_less_binary_pass_the_preparer_unchanged(
    client: TestClient, unit_01: dict[str, str]
) -> None:
    content = samples.png()
    # POST /fhir/Binary writes the row first, then a Binary without data
    # through the same write engine: the preparer must let it through.
    response = client.post(
        "/fhir/Binary",
        content=content,
        headers={**unit_01, "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text

    downloaded = client.get(f"/fhir/Binary/{response.json()['id']}", headers=unit_01)
    assert downloaded.content == content
