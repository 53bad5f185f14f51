"""POST and GET /fhir/Binary over HTTP, against the real local S3 server and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from minio import Minio
from sqlalchemy import text
from sqlalchemy.orm import Session

from hub.settings import Settings
from tests.builders import patient
from tests.imaging_store import samples
from tests.imaging_store.conftest import TEST_MAX_BINARY_BYTES, binary_rows, stored_keys

FHIR_JSON = "application/fhir+json"


def _upload(
    client: TestClient, content: bytes, content_type: str, **headers: str
) -> tuple[str, dict[str, object]]:
    response = client.post(
        "/fhir/Binary", content=content, headers={"Content-Type": content_type, **headers}
    )
    assert response.status_code == 201, response.text
    body = dict(response.json())
    return str(body["id"]), body


def _digest(content: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(content).digest()).decode()}:"


def _assert_outcome(response: object, status: int, code: str) -> None:
    assert getattr(response, "status_code") == status, getattr(response, "text")  # noqa: B009
    body = response.json()  # type: ignore[attr-defined]  # an httpx.Response
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code


def test_png_upload_and_download_round_trip(client: TestClient, settings: Settings) -> None:
    image = samples.png(8, 8)
    response = client.post("/fhir/Binary", content=image, headers={"Content-Type": "image/png"})
    assert response.status_code == 201, response.text
    body = response.json()
    binary_id = body["id"]
    assert response.headers["location"] == (
        f"{settings.fhir_base_url}/Binary/{binary_id}/_history/1"
    )
    assert response.headers["etag"] == 'W/"1"'
    assert body["resourceType"] == "Binary"
    assert body["contentType"] == "image/png"
    assert "data" not in body

    download = client.get(f"/fhir/Binary/{binary_id}")
    assert download.status_code == 200
    assert download.content == image
    assert download.headers["content-type"] == "image/png"
    assert download.headers["x-content-type-options"] == "nosniff"
    assert download.headers["etag"] == 'W/"1"'
    assert download.headers["content-length"] == str(len(image))
    assert "content-disposition" not in download.headers


def test_the_type_is_sniffed_not_taken_from_the_header(client: TestClient) -> None:
    binary_id, body = _upload(client, samples.jpeg(), "image/png")
    assert body["contentType"] == "image/jpeg"
    assert client.get(f"/fhir/Binary/{binary_id}").headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (samples.webp(), "image/webp"),
        (samples.heic(), "image/heic"),
        (samples.dicom(), "application/dicom"),
        (samples.TEXT, "text/plain; charset=utf-8"),
    ],
    ids=["webp", "heic", "dicom", "text"],
)
def test_every_allowed_type_is_stored_and_served(
    client: TestClient, content: bytes, expected: str
) -> None:
    binary_id, _ = _upload(client, content, "application/octet-stream")
    download = client.get(f"/fhir/Binary/{binary_id}")
    assert download.status_code == 200
    assert download.content == content
    assert download.headers["content-type"] == expected
    assert download.headers["x-content-type-options"] == "nosniff"


def test_a_pdf_is_served_as_an_attachment(client: TestClient) -> None:
    binary_id, body = _upload(client, samples.pdf(), "application/pdf")
    assert body["contentType"] == "application/pdf"
    download = client.get(f"/fhir/Binary/{binary_id}")
    assert download.headers["content-type"] == "application/pdf"
    assert download.headers["content-disposition"].startswith("attachment")
    assert download.content == samples.pdf()


def test_json_binary_upload_and_fhir_json_read(client: TestClient) -> None:
    image = samples.png(3, 5)
    encoded = base64.b64encode(image).decode()
    response = client.post(
        "/fhir/Binary",
        json={"resourceType": "Binary", "contentType": "image/jpeg", "data": encoded},
        headers={"Content-Type": FHIR_JSON},
    )
    assert response.status_code == 201, response.text
    binary_id = response.json()["id"]
    assert response.json()["contentType"] == "image/png"

    as_resource = client.get(f"/fhir/Binary/{binary_id}", headers={"Accept": FHIR_JSON})
    assert as_resource.status_code == 200
    assert as_resource.headers["content-type"].startswith(FHIR_JSON)
    resource = as_resource.json()
    assert resource["resourceType"] == "Binary"
    assert resource["id"] == binary_id
    assert resource["contentType"] == "image/png"
    assert resource["meta"]["versionId"] == "1"
    assert resource["data"] == encoded
    # Without the FHIR Accept header the same Binary answers its bytes.
    assert client.get(f"/fhir/Binary/{binary_id}").content == image


def test_fhir_json_read_encodes_every_length_exactly(client: TestClient) -> None:
    # 1, 2 and 3 leftover bytes exercise the piecewise base64 padding.
    for extra in (b"", b"a", b"ab"):
        content = samples.TEXT * 3000 + extra
        binary_id, _ = _upload(client, content, "text/plain")
        resource = client.get(f"/fhir/Binary/{binary_id}", headers={"Accept": FHIR_JSON}).json()
        assert base64.b64decode(resource["data"]) == content


def test_a_vread_serves_as_a_read_and_history_carries_no_data(client: TestClient) -> None:
    image = samples.png()
    binary_id, _ = _upload(client, image, "image/png")
    # The upload's Location: the bytes, or the resource with its data as asked.
    vread = client.get(f"/fhir/Binary/{binary_id}/_history/1")
    assert vread.status_code == 200
    assert vread.content == image
    as_resource = client.get(
        f"/fhir/Binary/{binary_id}/_history/1", headers={"Accept": "application/fhir+json"}
    )
    assert as_resource.json()["contentType"] == "image/png"
    assert base64.b64decode(as_resource.json()["data"]) == image
    history = client.get(f"/fhir/Binary/{binary_id}/_history").json()
    assert [entry["resource"]["meta"]["versionId"] for entry in history["entry"]] == ["1"]
    assert all("data" not in entry["resource"] for entry in history["entry"])


def test_matching_content_digest_is_accepted(client: TestClient) -> None:
    image = samples.png()
    _upload(client, image, "image/png", **{"Content-Digest": _digest(image)})


def test_content_digest_mismatch_is_422_and_nothing_is_kept(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    keys_before, rows_before = stored_keys(s3, settings), binary_rows(session)
    response = client.post(
        "/fhir/Binary",
        content=samples.png(),
        headers={"Content-Type": "image/png", "Content-Digest": _digest(b"something else")},
    )
    _assert_outcome(response, 422, "invalid")
    assert binary_rows(session) == rows_before
    assert stored_keys(s3, settings) == keys_before


def test_content_digest_of_a_json_upload_covers_the_json_body(client: TestClient) -> None:
    body = (
        b'{"resourceType":"Binary","contentType":"image/png","data":"'
        + base64.b64encode(samples.png())
        + b'"}'
    )
    ok = client.post(
        "/fhir/Binary",
        content=body,
        headers={"Content-Type": FHIR_JSON, "Content-Digest": _digest(body)},
    )
    assert ok.status_code == 201, ok.text
    wrong = client.post(
        "/fhir/Binary",
        content=body,
        headers={"Content-Type": FHIR_JSON, "Content-Digest": _digest(samples.png())},
    )
    _assert_outcome(wrong, 422, "invalid")


@pytest.mark.parametrize(
    "header", ["sha-256=abc", "sha-256=:not base64!:", "md5=:rL0Y20zC+Fzt72VPzMSk2A==:"]
)
def test_malformed_or_unverifiable_content_digest_is_400(client: TestClient, header: str) -> None:
    response = client.post(
        "/fhir/Binary",
        content=samples.png(),
        headers={"Content-Type": "image/png", "Content-Digest": header},
    )
    _assert_outcome(response, 400, "invalid")


@pytest.mark.parametrize(
    "content",
    [
        samples.HTML,
        samples.SVG,
        samples.XML_SVG,
        samples.SHELL_SCRIPT,
        samples.ELF,
        samples.WINDOWS_EXE,
        samples.GIF,
        b"plain start\x00then a NUL",
        b"\xff\xfe not UTF-8",
    ],
    ids=["html", "svg", "xml-svg", "script", "elf", "exe", "gif", "nul", "not-utf8"],
)
def test_disguised_or_active_content_is_415_and_nothing_is_kept(
    client: TestClient, session: Session, s3: Minio, settings: Settings, content: bytes
) -> None:
    keys_before, rows_before = stored_keys(s3, settings), binary_rows(session)
    response = client.post("/fhir/Binary", content=content, headers={"Content-Type": "image/png"})
    _assert_outcome(response, 415, "not-supported")
    assert binary_rows(session) == rows_before
    assert stored_keys(s3, settings) == keys_before


def test_html_disguised_inside_a_json_binary_is_415(client: TestClient) -> None:
    response = client.post(
        "/fhir/Binary",
        json={
            "resourceType": "Binary",
            "contentType": "image/png",
            "data": base64.b64encode(samples.HTML).decode(),
        },
        headers={"Content-Type": FHIR_JSON},
    )
    _assert_outcome(response, 415, "not-supported")


def test_over_the_size_limit_is_413(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    keys_before, rows_before = stored_keys(s3, settings), binary_rows(session)
    too_big = samples.png() + bytes(TEST_MAX_BINARY_BYTES)
    declared = client.post("/fhir/Binary", content=too_big, headers={"Content-Type": "image/png"})
    _assert_outcome(declared, 413, "too-costly")

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the limit must hold while streaming too.
        for start in range(0, len(too_big), 64 * 1024):
            yield too_big[start : start + 64 * 1024]

    streamed = client.post("/fhir/Binary", content=chunks(), headers={"Content-Type": "image/png"})
    _assert_outcome(streamed, 413, "too-costly")
    as_json = client.post(
        "/fhir/Binary",
        json={
            "resourceType": "Binary",
            "contentType": "image/png",
            "data": base64.b64encode(too_big).decode(),
        },
        headers={"Content-Type": FHIR_JSON},
    )
    _assert_outcome(as_json, 413, "too-costly")
    assert binary_rows(session) == rows_before
    assert stored_keys(s3, settings) == keys_before


def test_exactly_at_the_limit_is_accepted(client: TestClient) -> None:
    content = samples.png()
    content += bytes(TEST_MAX_BINARY_BYTES - len(content))
    _upload(client, content, "image/png")


def test_the_default_limit_is_25_mb() -> None:
    assert Settings().max_binary_bytes == 25 * 1024 * 1024


def test_invalid_json_binaries_are_refused(client: TestClient) -> None:
    cases = [
        ({"resourceType": "Patient"}, 422),
        ({"resourceType": "Binary", "contentType": "image/png"}, 422),
        ({"resourceType": "Binary", "contentType": "image/png", "data": "***"}, 422),
        (
            {
                "resourceType": "Binary",
                "contentType": "image/png",
                "data": base64.b64encode(samples.png()).decode(),
                "unknownElement": 1,
            },
            422,
        ),
    ]
    for document, status in cases:
        response = client.post("/fhir/Binary", json=document, headers={"Content-Type": FHIR_JSON})
        assert response.status_code == status, (document, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    empty = client.post("/fhir/Binary", content=b"", headers={"Content-Type": "image/png"})
    _assert_outcome(empty, 400, "invalid")


def test_s3_down_is_503_transient_and_nothing_is_kept(
    s3_down_client: TestClient, session: Session
) -> None:
    rows_before = binary_rows(session)
    response = s3_down_client.post(
        "/fhir/Binary", content=samples.png(), headers={"Content-Type": "image/png"}
    )
    _assert_outcome(response, 503, "transient")
    assert binary_rows(session) == rows_before
    # The rest of the API is unaffected by the store being down.
    assert s3_down_client.get("/fhir/metadata").status_code == 200


def test_s3_down_on_read_is_503(client: TestClient, s3_down_client: TestClient) -> None:
    binary_id, _ = _upload(client, samples.png(), "image/png")
    response = s3_down_client.get(f"/fhir/Binary/{binary_id}")
    _assert_outcome(response, 503, "transient")


def test_missing_binary_is_404(client: TestClient) -> None:
    _assert_outcome(client.get("/fhir/Binary/does-not-exist"), 404, "not-found")
    missing_json = client.get("/fhir/Binary/does-not-exist", headers={"Accept": FHIR_JSON})
    _assert_outcome(missing_json, 404, "not-found")


def test_bytes_never_reach_postgresql(client: TestClient, session: Session) -> None:
    content = samples.TEXT + b"unmistakable-marker-7f3a"
    encoded = base64.b64encode(content).decode()
    binary_id, _ = _upload(client, content, "text/plain")
    json_id = client.post(
        "/fhir/Binary",
        json={"resourceType": "Binary", "contentType": "text/plain", "data": encoded},
        headers={"Content-Type": FHIR_JSON},
    ).json()["id"]
    for table in ("fhir_resource", "fhir_resource_version"):
        documents = session.execute(
            text(f"SELECT resource::text FROM {table} WHERE id IN (:a, :b)"),  # noqa: S608
            {"a": binary_id, "b": json_id},
        ).scalars()
        for document in documents:
            assert '"data"' not in document
            assert encoded not in document
            assert "unmistakable-marker" not in document


def test_metadata_row_records_hashes_owner_and_security_context(
    client: TestClient, session: Session
) -> None:
    created = client.post(
        "/fhir/Patient", json=patient(), headers={"Content-Type": FHIR_JSON}
    ).json()
    image = samples.png(4, 4)
    binary_id, body = _upload(
        client, image, "image/png", **{"X-Security-Context": f"Patient/{created['id']}"}
    )
    assert body["securityContext"] == {"reference": f"Patient/{created['id']}"}
    row = session.execute(
        text(
            "SELECT size, sha256, sha1, object_key, owner_client_id, security_context, content_type"
            " FROM binary_object WHERE id = :id"
        ),
        {"id": binary_id},
    ).one()
    assert row.size == len(image)
    assert bytes(row.sha256) == hashlib.sha256(image).digest()
    assert bytes(row.sha1) == hashlib.sha1(image, usedforsecurity=False).digest()
    assert row.object_key == f"binaries/{binary_id}"
    assert row.owner_client_id == "user:admin"  # the person, not the CLI client they share
    assert row.security_context == f"Patient/{created['id']}"
    assert row.content_type == "image/png"


def test_security_context_naming_a_missing_patient_is_422_and_nothing_is_kept(
    client: TestClient, session: Session, s3: Minio, settings: Settings
) -> None:
    keys_before, rows_before = stored_keys(s3, settings), binary_rows(session)
    response = client.post(
        "/fhir/Binary",
        content=samples.png(),
        headers={"Content-Type": "image/png", "X-Security-Context": "Patient/nobody"},
    )
    assert response.status_code == 422, response.text
    assert binary_rows(session) == rows_before
    assert stored_keys(s3, settings) == keys_before


def test_object_keys_carry_no_patient_data(
    client: TestClient, s3: Minio, settings: Settings
) -> None:
    created = client.post(
        "/fhir/Patient", json=patient(), headers={"Content-Type": FHIR_JSON}
    ).json()
    binary_id, _ = _upload(
        client, samples.png(), "image/png", **{"X-Security-Context": f"Patient/{created['id']}"}
    )
    assert f"binaries/{binary_id}" in stored_keys(s3, settings)
    assert not any(created["id"] in key for key in stored_keys(s3, settings))


def test_binary_content_cannot_be_replaced(client: TestClient) -> None:
    binary_id, _ = _upload(client, samples.png(), "image/png")
    response = client.put(
        f"/fhir/Binary/{binary_id}",
        json={"resourceType": "Binary", "id": binary_id, "contentType": "image/png"},
        headers={"Content-Type": FHIR_JSON},
    )
    _assert_outcome(response, 405, "not-supported")
    conditional = client.put(
        "/fhir/Binary?_id=x",
        json={"resourceType": "Binary", "contentType": "text/plain", "data": "aGk="},
        headers={"Content-Type": FHIR_JSON},
    )
    _assert_outcome(conditional, 405, "not-supported")


def test_deleted_binary_is_gone(client: TestClient, session: Session) -> None:
    binary_id, _ = _upload(client, samples.png(), "image/png")
    assert client.delete(f"/fhir/Binary/{binary_id}").status_code == 204
    _assert_outcome(client.get(f"/fhir/Binary/{binary_id}"), 410, "deleted")
    deleted_at = session.execute(
        text("SELECT deleted_at FROM binary_object WHERE id = :id"), {"id": binary_id}
    ).scalar_one()
    assert deleted_at is not None


def test_every_version_of_a_binary_names_its_bytes(client: TestClient) -> None:
    image = samples.png()
    binary_id, _ = _upload(client, image, "image/png")
    # A metadata update (a securityContext) makes version 2 of the same bytes.
    client.put("/fhir/Patient/sc-1", json={"resourceType": "Patient", "id": "sc-1"})
    current = client.get(
        f"/fhir/Binary/{binary_id}", headers={"Accept": "application/fhir+json"}
    ).json()
    relabelled = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Binary",
                    "id": binary_id,
                    "contentType": "image/png",
                    "securityContext": {"reference": "Patient/sc-1"},
                    "data": current["data"],
                },
                "request": {"method": "PUT", "url": f"Binary/{binary_id}"},
            }
        ],
    }
    assert client.post("/fhir", json=relabelled).status_code == 200
    for version in ("1", "2"):
        served = client.get(f"/fhir/Binary/{binary_id}/_history/{version}")
        assert served.status_code == 200, (version, served.text)
        assert served.content == image
        assert served.headers["ETag"] == f'W/"{version}"'
    first = client.get(
        f"/fhir/Binary/{binary_id}/_history/1", headers={"Accept": "application/fhir+json"}
    ).json()
    assert "securityContext" not in first and first["meta"]["versionId"] == "1"
    assert client.get(f"/fhir/Binary/{binary_id}/_history/3").status_code == 404


def test_a_version_url_redirects_as_the_binary_does(redirect_client: TestClient) -> None:
    binary_id, _ = _upload(redirect_client, samples.png(), "image/png")
    for path in (f"/fhir/Binary/{binary_id}", f"/fhir/Binary/{binary_id}/_history/1"):
        answer = redirect_client.get(path, follow_redirects=False)
        assert answer.status_code == 307, (path, answer.text)
        assert "X-Amz-Signature=" in answer.headers["Location"]
