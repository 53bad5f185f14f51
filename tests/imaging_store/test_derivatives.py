"""Previews, photo quality and DICOM studies made by the outbox handler from uploaded Binaries.

Uploads go through POST /fhir/Binary into the real local S3 server and
PostgreSQL; the handler runs on the real outbox rows through `outbox.drain`.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import ExifTags, Image, ImageDraw, ImageFilter
from pydicom.data import get_testdata_file
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from fhir_api.writes import WriteSettings
from hub import db, outbox
from hub.app import create_app
from hub.settings import Settings
from imaging_store.derivatives import service
from imaging_store.derivatives.dicom import INSTANCE_BINARY_URL, study_identifier_query
from imaging_store.derivatives.handlers import TOPIC, resource_changed_handler
from imaging_store.derivatives.router import router as derivatives_router
from tests.builders import patient
from tests.imaging_store import samples
from tests.imaging_store.conftest import free_port

PROBLEM_JSON = "application/problem+json"
# The ECG waveform sample is 285 KiB, over the imaging suite's 256 KiB limit.
DERIVATIVES_MAX_BINARY_BYTES = 1024 * 1024

Drain = Callable[[], int]


@pytest.fixture(scope="module")
def derivatives_settings(settings: Settings) -> Settings:
    """The imaging suite's settings with room for the DICOM samples."""
    return settings.model_copy(update={"max_binary_bytes": DERIVATIVES_MAX_BINARY_BYTES})


@pytest.fixture(scope="module")
def derivatives_app(derivatives_settings: Settings, db_engine: Engine) -> FastAPI:
    """The application with the preview routes mounted."""
    application = create_app(derivatives_settings)
    mounted = {getattr(route, "path", "") for route in application.routes}
    if "/imaging/binaries/{binary_id}/thumbnail" not in mounted:
        application.include_router(derivatives_router)
    db.session_factory.configure(bind=db_engine)
    outbox.set_notifier(None)
    return application


@pytest.fixture
def derivatives_client(
    derivatives_app: FastAPI, session: Session, auth_headers: Callable[[str], dict[str, str]]
) -> Iterator[TestClient]:
    """An admin's HTTP client whose requests join the test's rolled-back transaction."""
    with TestClient(
        derivatives_app, raise_server_exceptions=False, headers=auth_headers("admin")
    ) as test_client:
        yield test_client


@pytest.fixture
def write_settings(derivatives_settings: Settings) -> WriteSettings:
    """The write settings the handler uses."""
    return WriteSettings(base_url=derivatives_settings.fhir_base_url)


@pytest.fixture
def drain(derivatives_settings: Settings, session: Session) -> Iterator[Drain]:
    """Deliver every due outbox event to the derivatives handler (registered for the test)."""
    handler = resource_changed_handler(derivatives_settings)
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


def _scene(width: int, height: int, seed: int = 7) -> Image.Image:
    """Draw a sharp, well-lit picture: coloured discs crossed by dark lines."""
    rng = random.Random(seed)  # noqa: S311 - test pictures, not secrets
    image = Image.new("RGB", (width, height), (150, 120, 100))
    draw = ImageDraw.Draw(image)
    for _ in range(120):
        x, y, radius = rng.randrange(width), rng.randrange(height), rng.randrange(5, width // 10)
        colour = (rng.randrange(60, 255), rng.randrange(60, 255), rng.randrange(60, 255))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    for _ in range(60):
        start = (rng.randrange(width), rng.randrange(height))
        end = (rng.randrange(width), rng.randrange(height))
        draw.line((start, end), fill=(20, 20, 20), width=2)
    return image


def _encoded(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _upload(client: TestClient, content: bytes, content_type: str, **headers: str) -> str:
    response = client.post(
        "/fhir/Binary", content=content, headers={"Content-Type": content_type, **headers}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _create(client: TestClient, resource: dict[str, Any]) -> str:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _jpeg_of(response: Any) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"].startswith("private")
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG"
    return image


def _assert_problem(response: Any, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["type"] == f"https://waha.health/problems/{slug}"


def _derivative_rows(session: Session, binary_id: str) -> dict[str, tuple[Any, ...]]:
    rows = session.execute(
        text(
            "SELECT kind, status, quality_code, error, width, height, imaging_study_id"
            " FROM binary_derivative WHERE binary_id = :id"
        ),
        {"id": binary_id},
    ).all()
    return {row.kind: tuple(row)[1:] for row in rows}


def _studies(client: TestClient, study_uid: str) -> list[dict[str, Any]]:
    query = study_identifier_query(study_uid).removeprefix("identifier=")
    response = client.get("/fhir/ImagingStudy", params={"identifier": query})
    assert response.status_code == 200, response.text
    return [entry["resource"] for entry in response.json().get("entry", [])]


def _dicom_bytes(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's bundled {name} is missing"
    return Path(str(path)).read_bytes()


def _pending_events(session: Session) -> int:
    return int(
        session.execute(
            text("SELECT count(*) FROM outbox_event WHERE status <> 'done'")
        ).scalar_one()
    )


def test_previews_are_pending_until_the_handler_ran_then_bounded_jpegs(
    derivatives_client: TestClient, drain: Drain
) -> None:
    binary_id = _upload(
        derivatives_client, _encoded(_scene(2400, 1800), "JPEG", quality=90), "image/jpeg"
    )
    pending = derivatives_client.get(f"/imaging/binaries/{binary_id}/thumbnail")
    assert pending.status_code == 202
    assert pending.headers["retry-after"].isdigit()
    assert pending.json() == {
        "binary": f"Binary/{binary_id}",
        "kind": "thumbnail",
        "status": "pending",
    }
    assert derivatives_client.get(f"/imaging/binaries/{binary_id}/preview").status_code == 202

    assert drain() >= 1

    thumbnail = _jpeg_of(derivatives_client.get(f"/imaging/binaries/{binary_id}/thumbnail"))
    preview = _jpeg_of(derivatives_client.get(f"/imaging/binaries/{binary_id}/preview"))
    assert thumbnail.size == (256, 192)
    assert preview.size == (1600, 1200)


def test_exif_orientation_is_applied_and_location_stripped(
    derivatives_client: TestClient, drain: Drain
) -> None:
    # Stored sideways (red left, blue right) with Orientation 6: shown upright,
    # the red half is on top.
    sideways = Image.new("RGB", (1000, 600), (255, 0, 0))
    sideways.paste((0, 0, 255), (500, 0, 1000, 600))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (31.0, 37.0, 48.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "W"
    gps[ExifTags.GPS.GPSLongitude] = (8.0, 0.0, 31.0)
    source = _encoded(sideways, "JPEG", exif=exif)
    assert Image.open(io.BytesIO(source)).getexif().get_ifd(ExifTags.IFD.GPSInfo)
    binary_id = _upload(derivatives_client, source, "image/jpeg")

    drain()

    for kind in ("thumbnail", "preview"):
        response = derivatives_client.get(f"/imaging/binaries/{binary_id}/{kind}")
        image = _jpeg_of(response)
        assert image.height > image.width
        top, bottom = (
            image.getpixel((image.width // 2, 5)),
            image.getpixel((image.width // 2, image.height - 5)),
        )
        assert isinstance(top, tuple) and isinstance(bottom, tuple)
        assert top[0] > 200 and top[2] < 50
        assert bottom[2] > 200 and bottom[0] < 50
        assert len(image.getexif()) == 0
        assert b"Exif" not in response.content
    # The original keeps its metadata: only the derivatives are cleaned.
    assert derivatives_client.get(f"/fhir/Binary/{binary_id}").content == source


def test_heic_photos_get_previews(derivatives_client: TestClient, drain: Drain) -> None:
    heic = _encoded(_scene(1200, 900), "HEIF")
    response = derivatives_client.post(
        "/fhir/Binary", content=heic, headers={"Content-Type": "image/heic"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["contentType"] == "image/heic"
    binary_id = str(response.json()["id"])

    drain()

    assert _jpeg_of(derivatives_client.get(f"/imaging/binaries/{binary_id}/preview")).size == (
        1200,
        900,
    )
    assert _jpeg_of(derivatives_client.get(f"/imaging/binaries/{binary_id}/thumbnail")).size == (
        256,
        192,
    )


@pytest.mark.parametrize(
    ("make_photo", "expected"),
    [
        (lambda: _encoded(_scene(1200, 900), "PNG"), "ok"),
        (lambda: _encoded(_scene(1200, 900).point(lambda value: value // 8), "PNG"), "too-dark"),
        (
            lambda: _encoded(_scene(1200, 900).filter(ImageFilter.GaussianBlur(3)), "PNG"),
            "blurred",
        ),
        (lambda: _encoded(_scene(320, 240), "PNG"), "too-small"),
        (lambda: _encoded(_scene(1200, 900), "WEBP", quality=90), "ok"),
    ],
    ids=["ok", "too-dark", "blurred", "too-small", "webp-ok"],
)
def test_photo_quality_is_recorded(
    derivatives_client: TestClient,
    session: Session,
    drain: Drain,
    make_photo: Callable[[], bytes],
    expected: str,
) -> None:
    content = make_photo()
    content_type = "image/webp" if content[:4] == b"RIFF" else "image/png"
    binary_id = _upload(derivatives_client, content, content_type)
    assert service.quality_for_binary(session, binary_id) is None

    drain()

    assert service.quality_for_binary(session, binary_id) == expected
    assert service.quality_extension(expected) == {
        "url": "https://waha.health/fhir/StructureDefinition/image-quality",
        "valueCode": expected,
    }
    # A too-small photo still gets a thumbnail (never enlarged).
    thumbnail = _jpeg_of(derivatives_client.get(f"/imaging/binaries/{binary_id}/thumbnail"))
    assert max(thumbnail.size) <= 256


def test_non_images_have_no_previews(derivatives_client: TestClient, drain: Drain) -> None:
    pdf_id = _upload(derivatives_client, samples.pdf(), "application/pdf")
    text_id = _upload(derivatives_client, samples.TEXT, "text/plain")
    for binary_id in (pdf_id, text_id):
        _assert_problem(
            derivatives_client.get(f"/imaging/binaries/{binary_id}/thumbnail"),
            404,
            "preview-not-available",
        )

    drain()

    for binary_id in (pdf_id, text_id):
        _assert_problem(
            derivatives_client.get(f"/imaging/binaries/{binary_id}/preview"),
            404,
            "preview-not-available",
        )


def test_unknown_and_deleted_binaries_are_not_found(
    derivatives_client: TestClient, drain: Drain
) -> None:
    response = derivatives_client.get("/imaging/binaries/no-such-binary/thumbnail")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM_JSON

    binary_id = _upload(derivatives_client, _encoded(_scene(800, 600), "PNG"), "image/png")
    drain()
    assert derivatives_client.delete(f"/fhir/Binary/{binary_id}").status_code == 204
    gone = derivatives_client.get(f"/imaging/binaries/{binary_id}/preview")
    assert gone.status_code in (404, 410)
    assert gone.headers["content-type"] == PROBLEM_JSON


def test_previews_need_a_bearer_token(derivatives_app: FastAPI, session: Session) -> None:
    with TestClient(derivatives_app, raise_server_exceptions=False) as anonymous:
        response = anonymous.get("/imaging/binaries/any-binary/thumbnail")
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_corrupt_image_fails_once_without_a_retry_loop(
    derivatives_client: TestClient, session: Session, drain: Drain
) -> None:
    whole = _encoded(_scene(1200, 900), "JPEG", quality=90)
    binary_id = _upload(derivatives_client, whole[: len(whole) // 3], "image/jpeg")

    drain()

    assert _pending_events(session) == 0
    rows = _derivative_rows(session, binary_id)
    assert {kind: row[0] for kind, row in rows.items()} == {
        "thumbnail": "failed",
        "preview": "failed",
        "quality-check": "failed",
    }
    assert rows["preview"][2] == "undecodable"
    assert service.quality_for_binary(session, binary_id) is None
    _assert_problem(
        derivatives_client.get(f"/imaging/binaries/{binary_id}/preview"), 422, "preview-failed"
    )


def test_an_object_store_outage_is_retried_later_not_recorded(
    derivatives_client: TestClient, session: Session, derivatives_settings: Settings
) -> None:
    binary_id = _upload(derivatives_client, _encoded(_scene(800, 600), "PNG"), "image/png")
    unreachable = derivatives_settings.model_copy(
        update={"s3_endpoint": f"127.0.0.1:{free_port()}"}
    )
    handler = resource_changed_handler(unreachable)
    outbox.register_handler(TOPIC, handler)
    try:
        outbox.drain(session, batch_size=100, max_attempts=5)
    finally:
        outbox.unregister_handler(TOPIC, handler)

    retried = session.execute(
        text(
            "SELECT status, attempts, last_error FROM outbox_event"
            " WHERE payload->>'id' = :id AND topic = :topic"
        ),
        {"id": binary_id, "topic": TOPIC},
    ).one()
    assert (retried.status, retried.attempts) == ("pending", 1)
    assert "storage-unavailable" in retried.last_error
    assert _derivative_rows(session, binary_id) == {}
    assert derivatives_client.get(f"/imaging/binaries/{binary_id}/thumbnail").status_code == 202


def _png_header_only(width: int, height: int) -> bytes:
    """Return a PNG that declares a huge size but carries one row: a decompression bomb's head."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + bytes(3 * width)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row))
        + chunk(b"IEND", b"")
    )


def test_an_oversized_image_is_refused_before_decoding(
    derivatives_client: TestClient, session: Session, drain: Drain
) -> None:
    binary_id = _upload(derivatives_client, _png_header_only(9000, 8000), "image/png")

    drain()

    assert _derivative_rows(session, binary_id)["preview"][:3] == (
        "failed",
        None,
        "too-many-pixels",
    )


def test_a_rerun_changes_nothing(
    derivatives_client: TestClient, session: Session, drain: Drain, derivatives_settings: Settings
) -> None:
    binary_id = _upload(derivatives_client, _encoded(_scene(1200, 900), "PNG"), "image/png")
    drain()
    before = _derivative_rows(session, binary_id)
    updated_before = session.execute(
        text("SELECT max(updated_at) FROM binary_derivative WHERE binary_id = :id"),
        {"id": binary_id},
    ).scalar_one()

    # A redelivered event (acks_late): the same payload handled again.
    handler = resource_changed_handler(derivatives_settings)
    event = outbox.OutboxEvent(
        0, TOPIC, {"type": "Binary", "id": binary_id, "version": 1, "action": "create"}, None
    )
    handler(session, event)

    assert _derivative_rows(session, binary_id) == before
    assert (
        session.execute(
            text("SELECT max(updated_at) FROM binary_derivative WHERE binary_id = :id"),
            {"id": binary_id},
        ).scalar_one()
        == updated_before
    )


def test_ct_dicom_becomes_an_imaging_study_of_the_patient(
    derivatives_client: TestClient, session: Session, drain: Drain, derivatives_settings: Settings
) -> None:
    patient_id = _create(derivatives_client, patient("DC100001"))
    binary_id = _upload(
        derivatives_client,
        _dicom_bytes("CT_small.dcm"),
        "application/dicom",
        **{"X-Security-Context": f"Patient/{patient_id}"},
    )
    assert derivatives_client.get(f"/imaging/binaries/{binary_id}/preview").status_code == 202

    drain()

    study_uid = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
    [study] = _studies(derivatives_client, study_uid)
    assert study["subject"] == {"reference": f"Patient/{patient_id}"}
    assert study["status"] == "available"
    assert study["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}]
    assert study["modality"] == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
    ]
    # CT_small.dcm carries its UTC offset (-0500), so the time is kept.
    assert study["started"] == "2004-01-19T07:27:30-05:00"
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (1, 1)
    [series] = study["series"]
    assert series["uid"] == "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
    assert series["modality"]["code"] == "CT"
    [instance] = series["instance"]
    assert instance["uid"] == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert instance["sopClass"] == {
        "system": "urn:ietf:rfc:3986",
        "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2",
    }
    assert instance["extension"] == [
        {"url": INSTANCE_BINARY_URL, "valueReference": {"reference": f"Binary/{binary_id}"}}
    ]
    rows = _derivative_rows(session, binary_id)
    assert rows["imaging-study"][0] == "ready"
    assert rows["imaging-study"][5] == study["id"]
    # No numpy in Waha's dependencies, so pydicom cannot decode the pixels.
    assert rows["preview"][:3] == ("not-applicable", None, "no-pixel-decoder")
    _assert_problem(
        derivatives_client.get(f"/imaging/binaries/{binary_id}/preview"),
        404,
        "preview-not-available",
    )

    # A redelivered event, and a second file of the same study, one more instance.
    handler = resource_changed_handler(derivatives_settings)
    handler(
        session,
        outbox.OutboxEvent(
            0, TOPIC, {"type": "Binary", "id": binary_id, "version": 1, "action": "create"}, None
        ),
    )
    dataset = pydicom.dcmread(io.BytesIO(_dicom_bytes("CT_small.dcm")))
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    dataset.InstanceNumber = 2
    second = io.BytesIO()
    dataset.save_as(second)
    second_id = _upload(
        derivatives_client,
        second.getvalue(),
        "application/dicom",
        **{"X-Security-Context": f"Patient/{patient_id}"},
    )
    drain()

    [extended] = _studies(derivatives_client, study_uid)
    assert extended["id"] == study["id"]
    assert (extended["numberOfSeries"], extended["numberOfInstances"]) == (1, 2)
    assert [item["uid"] for item in extended["series"][0]["instance"]] == [
        instance["uid"],
        "1.2.826.0.1.3680043.8.498.1",
    ]
    assert _derivative_rows(session, second_id)["imaging-study"][5] == study["id"]


def test_ecg_waveform_gets_a_study_through_its_encounter_and_no_preview(
    derivatives_client: TestClient, session: Session, drain: Drain
) -> None:
    patient_id = _create(derivatives_client, patient("DC100002"))
    encounter_id = _create(
        derivatives_client,
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "FLD",
            },
            "subject": {"reference": f"Patient/{patient_id}"},
        },
    )
    binary_id = _upload(
        derivatives_client,
        _dicom_bytes("waveform_ecg.dcm"),
        "application/dicom",
        **{"X-Security-Context": f"Encounter/{encounter_id}"},
    )

    drain()

    [study] = _studies(derivatives_client, "1.3.76.13.65829.2.20130125082826.1072139.2")
    assert study["subject"] == {"reference": f"Patient/{patient_id}"}
    assert study["series"][0]["modality"]["code"] == "ECG"
    # No UTC offset in the file: a local time without zone is not a FHIR dateTime.
    assert study["started"] == "2013-01-25"
    assert _derivative_rows(session, binary_id)["thumbnail"][:3] == (
        "not-applicable",
        None,
        "no-pixel-data",
    )
    for kind in ("thumbnail", "preview"):
        _assert_problem(
            derivatives_client.get(f"/imaging/binaries/{binary_id}/{kind}"),
            404,
            "preview-not-available",
        )


def test_a_multiframe_study_without_patient_waits_for_one(
    derivatives_client: TestClient, session: Session, drain: Drain, write_settings: WriteSettings
) -> None:
    binary_id = _upload(derivatives_client, _dicom_bytes("rtdose.dcm"), "application/dicom")

    drain()

    study_uid = "1.2.999.999.99.9.9999.8888"
    assert _studies(derivatives_client, study_uid) == []
    assert _derivative_rows(session, binary_id)["imaging-study"][0] == "pending"

    patient_id = _create(derivatives_client, patient("DC100003"))
    study_id = service.create_imaging_study_for(
        session,
        binary_id=binary_id,
        patient_reference=f"Patient/{patient_id}",
        write_settings=write_settings,
    )
    assert study_id is not None
    assert (
        service.create_imaging_study_for(
            session,
            binary_id=binary_id,
            patient_reference=f"Patient/{patient_id}",
            write_settings=write_settings,
        )
        == study_id
    )
    [study] = _studies(derivatives_client, study_uid)
    assert study["id"] == study_id
    assert study["series"][0]["modality"]["code"] == "RTDOSE"
    assert _derivative_rows(session, binary_id)["imaging-study"][0] == "ready"


def test_unreadable_dicom_fails_without_a_retry_loop(
    derivatives_client: TestClient, session: Session, drain: Drain, write_settings: WriteSettings
) -> None:
    binary_id = _upload(derivatives_client, samples.dicom(), "application/dicom")

    drain()

    assert _pending_events(session) == 0
    rows = _derivative_rows(session, binary_id)
    assert rows["imaging-study"][0] == "failed"
    _assert_problem(
        derivatives_client.get(f"/imaging/binaries/{binary_id}/thumbnail"), 422, "preview-failed"
    )
    assert (
        service.create_imaging_study_for(
            session,
            binary_id=binary_id,
            patient_reference="Patient/anyone",
            write_settings=write_settings,
        )
        is None
    )
