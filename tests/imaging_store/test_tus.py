"""Resumable uploads (tus 1.0.0) over real HTTP with tuspy, on real S3 and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from minio import Minio
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from hub.settings import Settings
from imaging_store.errors import StorageUnavailable
from imaging_store.service import Caller, ContentDigests, binary_storage
from imaging_store.sniffing import HEAD_BYTES
from imaging_store.storage import BinaryStorage
from imaging_store.uploads import service as uploads_service
from imaging_store.uploads.errors import UploadBusy
from imaging_store.uploads.models import TusUploadRow
from imaging_store.uploads.router import router as uploads_router
from imaging_store.uploads.service import PART_BYTES, sweep_expired_uploads
from tests.imaging_store import samples
from tests.imaging_store.conftest import stored_keys
from tests.servers import serve

TUS = {"Tus-Resumable": "1.0.0"}
Headers = Callable[[str], dict[str, str]]


def _with_uploads(application: FastAPI) -> FastAPI:
    # hub/app.py mounts the router once the lead wires it; until then the tests do.
    if not any(
        getattr(route, "path", "").startswith("/imaging/uploads") for route in application.routes
    ):
        application.include_router(uploads_router)
    return application


@pytest.fixture(scope="session")
def imaging_server(app: FastAPI) -> Iterator[str]:
    """This module's own live server of the imaging app.

    Not the suite's `live_server`: that one may already serve an app built
    before the local S3 server's settings applied.
    """
    with serve(_with_uploads(app)) as base:
        yield base


@pytest.fixture
def uploads_url(imaging_server: str, committed: Engine, settings: Settings) -> Iterator[str]:
    """The tus endpoint of the live server; uploads and Binaries are removed afterwards."""
    yield f"{imaging_server}/imaging/uploads"
    # Every upload a test left open goes, with its S3 parts, as if long expired.
    with Session(committed) as session, session.begin():
        sweep_expired_uploads(
            session, storage=binary_storage(settings), now=datetime.now(UTC) + timedelta(days=365)
        )
    owner = create_engine(str(settings.migration_database_url))
    with owner.begin() as connection:
        connection.execute(text("TRUNCATE tus_upload"))
    owner.dispose()


@pytest.fixture(scope="session")
def s3_down_uploads_url(s3_down_app: FastAPI) -> Iterator[str]:
    """The tus endpoint of a live app whose object store is a closed port."""
    with serve(_with_uploads(s3_down_app)) as base:
        yield f"{base}/imaging/uploads"


def _content(size: int, head: bytes = b"") -> bytes:
    """Return `size` deterministic bytes starting with `head` (a JPEG header by default)."""
    head = head or samples.jpeg()[:64]
    return head + random.Random(size).randbytes(size - len(head))  # noqa: S311 - test data


def _metadata(**values: str) -> str:
    return ",".join(f"{key} {base64.b64encode(v.encode()).decode()}" for key, v in values.items())


def _create(url: str, length: int, headers: dict[str, str], **extra: str) -> str:
    response = httpx.post(url, headers={**TUS, **headers, "Upload-Length": str(length), **extra})
    assert response.status_code == 201, response.text
    assert response.headers["Tus-Resumable"] == "1.0.0"
    return str(httpx.URL(url).join(response.headers["Location"]))


def _create_with(
    url: str, body: bytes, length: int, headers: dict[str, str], **extra: str
) -> httpx.Response:
    """POST a creation that carries `body` as the upload's first bytes (creation-with-upload)."""
    return httpx.post(
        url,
        content=body,
        headers={
            **TUS,
            **headers,
            "Upload-Length": str(length),
            "Content-Type": "application/offset+octet-stream",
            **extra,
        },
        timeout=60,
    )


def _patch(
    upload_url: str, body: bytes, offset: int, headers: dict[str, str], **extra: str
) -> httpx.Response:
    return httpx.patch(
        upload_url,
        content=body,
        headers={
            **TUS,
            **headers,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
            **extra,
        },
        timeout=60,
    )


def _head(upload_url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.head(upload_url, headers={**TUS, **headers})


def _sha256(content: bytes) -> str:
    return "sha256 " + base64.b64encode(hashlib.sha256(content).digest()).decode()


def _assert_problem(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["Tus-Resumable"] == "1.0.0"
    if response.request.method != "HEAD":  # a HEAD answer has no body to read
        assert response.json()["type"].endswith(f"/{slug}")


def _upload_row(engine: Engine, upload_url: str) -> dict[str, Any] | None:
    upload_id = upload_url.rsplit("/", 1)[1]
    with engine.connect() as connection:
        row = (
            connection.execute(text("SELECT * FROM tus_upload WHERE id = :id"), {"id": upload_id})
            .mappings()
            .one_or_none()
        )
    return dict(row) if row is not None else None


def _assembling_keys(s3: Minio, settings: Settings) -> set[str]:
    """Return the object keys of the multipart uploads still open in the bucket."""
    result = s3._list_multipart_uploads(settings.s3_bucket)
    return {str(upload.object_name) for upload in result.uploads}


def _binary_key(engine: Engine, upload_url: str) -> str:
    row = _upload_row(engine, upload_url)
    assert row is not None
    return f"binaries/{row['binary_id']}"


def _staged_keys(s3: Minio, settings: Settings, upload_url: str) -> set[str]:
    prefix = f"uploads/{upload_url.rsplit('/', 1)[1]}/"
    return {
        str(item.object_name)
        for item in s3.list_objects(settings.s3_bucket, prefix=prefix, recursive=True)
    }


def _expire_and_sweep(committed: Engine, settings: Settings, *upload_urls: str) -> int:
    """Put these uploads past their expiry, run the sweep, and return how many it swept."""
    with committed.begin() as connection:
        connection.execute(
            text("UPDATE tus_upload SET expires_at = now() - interval '1 minute' WHERE id = :id"),
            [{"id": url.rsplit("/", 1)[1]} for url in upload_urls],
        )
    with Session(committed) as session, session.begin():
        return sweep_expired_uploads(
            session, storage=binary_storage(settings), now=datetime.now(UTC)
        )


def _stored_bytes(base: str, binary: str, headers: dict[str, str]) -> bytes:
    response = httpx.get(f"{base}/fhir/{binary}", headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.content


def test_options_describes_the_server(
    uploads_url: str, auth_headers: Headers, settings: Settings
) -> None:
    response = httpx.options(uploads_url, headers=auth_headers("unit-01"))
    assert response.status_code == 204
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "termination",
        "checksum",
        "expiration",
    }
    assert response.headers["Tus-Max-Size"] == str(settings.max_tus_upload_bytes)
    assert "sha256" in response.headers["Tus-Checksum-Algorithm"].split(",")


def test_tuspy_uploads_in_chunks_into_a_binary(
    uploads_url: str,
    auth_headers: Headers,
    tmp_path: Path,
    s3: Minio,
    settings: Settings,
    committed: Engine,
) -> None:
    # Over two S3 parts, in chunks that do not line up with them, each checksummed.
    content = _content(2 * PART_BYTES + 1234)
    source = tmp_path / "lesion.jpg"
    source.write_bytes(content)
    headers = auth_headers("unit-01")
    uploader = tus_client.TusClient(uploads_url, headers=headers).uploader(
        str(source),
        chunk_size=3 * 1024 * 1024,
        metadata={"filename": "lesion.jpg", "filetype": "image/jpeg"},
        upload_checksum=True,
    )
    uploader.upload()

    assert uploader.request is not None
    binary = uploader.request.response_headers["waha-binary"]
    assert binary.startswith("Binary/")
    head = _head(uploader.url, headers)
    assert head.status_code == 200
    assert head.headers["Waha-Binary"] == binary
    assert head.headers["Upload-Offset"] == head.headers["Upload-Length"] == str(len(content))
    assert head.headers["Cache-Control"] == "no-store"
    assert head.headers["Upload-Metadata"] == _metadata(
        filename="lesion.jpg", filetype="image/jpeg"
    )

    base = uploads_url.removesuffix("/imaging/uploads")
    assert _stored_bytes(base, binary, headers) == content
    with committed.connect() as connection:
        row = connection.execute(
            text("SELECT content_type, size, sha256, sha1 FROM binary_object WHERE id = :id"),
            {"id": binary.removeprefix("Binary/")},
        ).one()
    assert row.content_type == "image/jpeg"
    assert row.size == len(content)
    assert bytes(row.sha256) == hashlib.sha256(content).digest()
    assert bytes(row.sha1) == hashlib.sha1(content, usedforsecurity=False).digest()
    # Nothing staged or half-assembled is left behind.
    assert _staged_keys(s3, settings, uploader.url) == set()
    assert f"binaries/{binary.removeprefix('Binary/')}" not in _assembling_keys(s3, settings)


def test_a_photo_sent_with_its_creation_becomes_a_binary_in_one_request(
    uploads_url: str, auth_headers: Headers, committed: Engine
) -> None:
    content = _content(300_000)
    headers = auth_headers("unit-01")

    created = _create_with(
        uploads_url, content, len(content), headers, **{"Upload-Checksum": _sha256(content)}
    )

    assert created.status_code == 201, created.text
    assert created.headers["Tus-Resumable"] == "1.0.0"
    assert created.headers["Upload-Offset"] == str(len(content))
    binary = created.headers["Waha-Binary"]
    upload_url = str(httpx.URL(uploads_url).join(created.headers["Location"]))
    head = _head(upload_url, headers)
    assert head.headers["Upload-Offset"] == head.headers["Upload-Length"] == str(len(content))
    assert head.headers["Waha-Binary"] == binary
    base = uploads_url.removesuffix("/imaging/uploads")
    assert _stored_bytes(base, binary, headers) == content


def test_a_creation_with_the_first_bytes_is_resumed_by_patch(
    uploads_url: str, auth_headers: Headers
) -> None:
    content = _content(120_000)
    headers = auth_headers("unit-01")

    created = _create_with(uploads_url, content[:50_000], len(content), headers)

    assert created.status_code == 201, created.text
    assert created.headers["Upload-Offset"] == "50000"
    assert "Waha-Binary" not in created.headers
    upload_url = str(httpx.URL(uploads_url).join(created.headers["Location"]))
    finished = _patch(upload_url, content[50_000:], 50_000, headers)
    assert finished.status_code == 204, finished.text
    base = uploads_url.removesuffix("/imaging/uploads")
    assert _stored_bytes(base, finished.headers["Waha-Binary"], headers) == content


def test_a_chunked_creation_takes_its_body_only_when_typed_as_upload_data(
    uploads_url: str, auth_headers: Headers
) -> None:
    content = _content(40_000)
    headers = {**TUS, **auth_headers("unit-01"), "Upload-Length": str(len(content))}

    plain = httpx.post(uploads_url, content=iter([b""]), headers=headers)
    typed = httpx.post(
        uploads_url,
        content=iter([content[:10_000], content[10_000:]]),
        headers={**headers, "Content-Type": "application/offset+octet-stream"},
    )

    assert plain.status_code == 201, plain.text
    assert plain.headers["Upload-Offset"] == "0"
    assert typed.status_code == 201, typed.text
    assert typed.headers["Upload-Offset"] == str(len(content))
    assert typed.headers["Waha-Binary"].startswith("Binary/")


def test_a_creation_whose_bytes_fail_their_checksum_keeps_the_upload_at_zero(
    uploads_url: str, auth_headers: Headers
) -> None:
    content = _content(30_000)
    headers = auth_headers("unit-01")

    wrong = _create_with(
        uploads_url, content, len(content), headers, **{"Upload-Checksum": _sha256(b"other")}
    )

    _assert_problem(wrong, 460, "checksum-mismatch")
    upload_url = str(httpx.URL(uploads_url).join(wrong.headers["Location"]))
    assert _head(upload_url, headers).headers["Upload-Offset"] == "0"
    assert _patch(upload_url, content, 0, headers).status_code == 204


def test_creations_whose_bytes_cannot_be_taken_record_nothing(
    uploads_url: str, auth_headers: Headers, committed: Engine, s3: Minio, settings: Settings
) -> None:
    headers = auth_headers("unit-01")
    content = _content(1000)
    keys_before = stored_keys(s3, settings)

    too_long = _create_with(uploads_url, content, 500, headers)
    _assert_problem(too_long, 413, "upload-too-large")
    unknown = _create_with(uploads_url, content, 1000, headers, **{"Upload-Checksum": "md5 AAAA"})
    _assert_problem(unknown, 400, "checksum-algorithm-unsupported")
    not_tus = httpx.post(
        uploads_url,
        content=content,
        headers={**TUS, **headers, "Upload-Length": "1000", "Content-Type": "image/jpeg"},
    )
    _assert_problem(not_tus, 415, "not-offset-octet-stream")
    with committed.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM tus_upload")).scalar_one() == 0

    disguised = samples.HTML + b" " * 1000
    refused = _create_with(uploads_url, disguised, len(disguised), headers)
    _assert_problem(refused, 415, "content-type-not-allowed")
    upload_url = str(httpx.URL(uploads_url).join(refused.headers["Location"]))
    _assert_problem(_head(upload_url, headers), 404, "upload-not-found")
    with committed.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM binary_object")).scalar_one() == 0
    assert stored_keys(s3, settings) == keys_before


def test_a_new_client_resumes_from_the_server_offset(
    uploads_url: str, auth_headers: Headers, tmp_path: Path
) -> None:
    content = _content(PART_BYTES + 4321)
    source = tmp_path / "fundus.jpg"
    source.write_bytes(content)
    headers = auth_headers("unit-01")
    first = tus_client.TusClient(uploads_url, headers=headers).uploader(
        str(source), chunk_size=2 * 1024 * 1024
    )
    # tuspy leaves upload_chunk unannotated.
    first.upload_chunk()  # type: ignore[no-untyped-call]
    first.upload_chunk()  # type: ignore[no-untyped-call]  # the unit loses its network here

    resumed = tus_client.TusClient(uploads_url, headers=headers).uploader(
        str(source), url=first.url, chunk_size=2 * 1024 * 1024
    )
    assert resumed.offset == 4 * 1024 * 1024
    resumed.upload()

    assert resumed.request is not None
    binary = resumed.request.response_headers["waha-binary"]
    base = uploads_url.removesuffix("/imaging/uploads")
    assert _stored_bytes(base, binary, headers) == content


def test_a_dropped_connection_keeps_the_bytes_received(
    uploads_url: str, auth_headers: Headers, committed: Engine
) -> None:
    content = _content(300_000)
    headers = auth_headers("unit-01")
    upload_url = _create(uploads_url, len(content), headers)
    target = urlsplit(upload_url)
    sent = 100_000
    request_head = "".join(
        f"{name}: {value}\r\n"
        for name, value in {
            **TUS,
            **headers,
            "Host": target.netloc,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": "0",
            "Content-Length": str(len(content)),
        }.items()
    )
    with socket.create_connection((target.hostname, target.port)) as connection:
        connection.sendall(f"PATCH {target.path} HTTP/1.1\r\n{request_head}\r\n".encode())
        connection.sendall(content[:sent])
    # The server records what it received once it notices the disconnect.
    offset = 0
    for _ in range(400):
        offset = int(_head(upload_url, headers).headers["Upload-Offset"])
        if offset:
            break
        time.sleep(0.05)
    assert offset == sent

    finished = _patch(upload_url, content[sent:], sent, headers)
    assert finished.status_code == 204, finished.text
    base = uploads_url.removesuffix("/imaging/uploads")
    assert _stored_bytes(base, finished.headers["Waha-Binary"], headers) == content
    # Hashed across the drop: the digests went on from the bytes recorded.
    stored = _binary_object(committed, finished.headers["Waha-Binary"])
    assert bytes(stored.sha256) == hashlib.sha256(content).digest()
    assert bytes(stored.sha1) == hashlib.sha1(content).digest()  # noqa: S324 - R4 Attachment.hash
    assert (stored.size, stored.content_type) == (len(content), "image/jpeg")


def test_checksum_mismatch_discards_the_chunk(uploads_url: str, auth_headers: Headers) -> None:
    content = _content(50_000)
    headers = auth_headers("unit-01")
    upload_url = _create(uploads_url, len(content), headers)
    first = content[:20_000]

    wrong = _patch(upload_url, first, 0, headers, **{"Upload-Checksum": _sha256(b"other")})
    _assert_problem(wrong, 460, "checksum-mismatch")
    assert _head(upload_url, headers).headers["Upload-Offset"] == "0"

    unknown = _patch(upload_url, first, 0, headers, **{"Upload-Checksum": "md5 AAAA"})
    _assert_problem(unknown, 400, "checksum-algorithm-unsupported")

    right = _patch(upload_url, first, 0, headers, **{"Upload-Checksum": _sha256(first)})
    assert right.status_code == 204
    assert right.headers["Upload-Offset"] == str(len(first))
    assert "Upload-Expires" in right.headers


def test_wrong_offset_is_a_conflict(uploads_url: str, auth_headers: Headers) -> None:
    headers = auth_headers("unit-01")
    upload_url = _create(uploads_url, 1000, headers)
    assert _patch(upload_url, _content(100), 0, headers).status_code == 204

    _assert_problem(_patch(upload_url, b"x" * 10, 0, headers), 409, "upload-offset-mismatch")
    _assert_problem(_patch(upload_url, b"x" * 10, 500, headers), 409, "upload-offset-mismatch")
    assert _head(upload_url, headers).headers["Upload-Offset"] == "100"


def test_a_patch_while_another_is_writing_is_refused(
    uploads_url: str, auth_headers: Headers, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    upload_url = _create(uploads_url, 1000, headers)
    # What a PATCH streaming its body holds: the row's lease.
    with committed.begin() as connection:
        connection.execute(
            text(
                "UPDATE tus_upload SET lease_token = gen_random_uuid(),"
                " lease_expires_at = now() + interval '5 minutes' WHERE id = :id"
            ),
            {"id": upload_url.rsplit("/", 1)[1]},
        )
    _assert_problem(_patch(upload_url, _content(100), 0, headers), 423, "upload-busy")
    _assert_problem(httpx.delete(upload_url, headers={**TUS, **headers}), 423, "upload-busy")
    assert _head(upload_url, headers).headers["Upload-Offset"] == "0"


def test_too_large_uploads_and_bodies_are_refused(
    uploads_url: str, auth_headers: Headers, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    too_large = httpx.post(
        uploads_url,
        headers={**TUS, **headers, "Upload-Length": str(settings.max_tus_upload_bytes + 1)},
    )
    _assert_problem(too_large, 413, "upload-too-large")

    upload_url = _create(uploads_url, 100, headers)
    _assert_problem(_patch(upload_url, _content(101), 0, headers), 413, "upload-too-large")
    assert _head(upload_url, headers).headers["Upload-Offset"] == "0"
    with committed.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM tus_upload")).scalar_one() == 1


@pytest.mark.parametrize(
    ("extra", "status", "slug"),
    [
        ({}, 400, "invalid-upload-request"),
        ({"Upload-Defer-Length": "1"}, 400, "invalid-upload-request"),
        ({"Upload-Length": "-5"}, 400, "invalid-upload-request"),
        ({"Upload-Length": "0"}, 400, "invalid-upload-request"),
        ({"Upload-Length": "10", "Upload-Metadata": "filename ***"}, 400, "invalid-upload-request"),
        (
            {"Upload-Length": "10", "Upload-Metadata": "a YQ==,a YQ=="},
            400,
            "invalid-upload-request",
        ),
        (
            {"Upload-Length": "10", "Upload-Metadata": _metadata(patient="no-such-patient")},
            400,
            "invalid-upload-request",
        ),
        ({"Upload-Length": "10", "Tus-Resumable": "0.2.2"}, 412, "tus-version-unsupported"),
    ],
)
def test_bad_creation_requests_store_nothing(
    uploads_url: str,
    auth_headers: Headers,
    committed: Engine,
    extra: dict[str, str],
    status: int,
    slug: str,
) -> None:
    response = httpx.post(uploads_url, headers={**TUS, **auth_headers("unit-01"), **extra})
    _assert_problem(response, status, slug)
    if status == 412:
        assert response.headers["Tus-Version"] == "1.0.0"
    with committed.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM tus_upload")).scalar_one() == 0


def test_bad_patch_requests_are_refused(uploads_url: str, auth_headers: Headers) -> None:
    headers = auth_headers("unit-01")
    upload_url = _create(uploads_url, 100, headers)
    wrong_type = httpx.patch(
        upload_url,
        content=b"abc",
        headers={
            **TUS,
            **headers,
            "Content-Type": "application/octet-stream",
            "Upload-Offset": "0",
        },
    )
    _assert_problem(wrong_type, 415, "not-offset-octet-stream")
    no_version = httpx.patch(
        upload_url,
        content=b"abc",
        headers={
            **headers,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": "0",
        },
    )
    _assert_problem(no_version, 412, "tus-version-unsupported")
    no_offset = httpx.patch(
        upload_url,
        content=b"abc",
        headers={**TUS, **headers, "Content-Type": "application/offset+octet-stream"},
    )
    _assert_problem(no_offset, 400, "invalid-upload-request")
    _assert_problem(_head(f"{uploads_url}/nope", headers), 404, "upload-not-found")
    assert _head(upload_url, headers).headers["Upload-Offset"] == "0"


def test_termination_removes_the_upload_and_its_parts(
    uploads_url: str, auth_headers: Headers, s3: Minio, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    # One part (the first PATCH brings over 5 MiB), then a staged tail (the second fewer).
    content = _content(PART_BYTES + 2 * 1024 * 1024)
    upload_url = _create(uploads_url, len(content) + 1, headers)
    first = PART_BYTES + 1024 * 1024
    assert _patch(upload_url, content[:first], 0, headers).status_code == 204
    assert _patch(upload_url, content[first:], first, headers).status_code == 204
    binary_key = _binary_key(committed, upload_url)
    assert _staged_keys(s3, settings, upload_url)
    assert binary_key in _assembling_keys(s3, settings)

    deleted = httpx.delete(upload_url, headers={**TUS, **headers})
    assert deleted.status_code == 204
    assert deleted.headers["Tus-Resumable"] == "1.0.0"
    _assert_problem(_head(upload_url, headers), 404, "upload-not-found")
    _assert_problem(_patch(upload_url, b"x", len(content), headers), 404, "upload-not-found")
    _assert_problem(httpx.delete(upload_url, headers={**TUS, **headers}), 404, "upload-not-found")
    assert _staged_keys(s3, settings, upload_url) == set()
    assert binary_key not in _assembling_keys(s3, settings)


def test_another_client_sees_no_upload(uploads_url: str, auth_headers: Headers) -> None:
    owner, other = auth_headers("unit-01"), auth_headers("unit-02")
    upload_url = _create(uploads_url, 100, owner)

    _assert_problem(_head(upload_url, other), 404, "upload-not-found")
    _assert_problem(_patch(upload_url, _content(100), 0, other), 404, "upload-not-found")
    _assert_problem(httpx.delete(upload_url, headers={**TUS, **other}), 404, "upload-not-found")
    assert _head(upload_url, owner).headers["Upload-Offset"] == "0"


def test_roles_that_may_not_write_start_no_upload(uploads_url: str, auth_headers: Headers) -> None:
    for role in ("relay", "ministry"):
        answer = httpx.post(
            uploads_url, headers={**TUS, **auth_headers(role), "Upload-Length": "100"}
        )
        assert answer.status_code == 403, (role, answer.text)


def test_a_persons_upload_is_theirs_not_their_clients(
    uploads_url: str, auth_headers: Headers
) -> None:
    owner, other = auth_headers("coordinator"), auth_headers("specialist.derm")
    upload_url = _create(uploads_url, 100, owner)
    _assert_problem(_head(upload_url, other), 404, "upload-not-found")
    _assert_problem(_patch(upload_url, _content(100), 0, other), 404, "upload-not-found")
    assert _head(upload_url, owner).headers["Upload-Offset"] == "0"


def test_refused_content_is_purged_only_under_the_patchs_own_lease(
    uploads_url: str, auth_headers: Headers, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    upload_url = _create(uploads_url, 2000, headers)
    upload_id = upload_url.rsplit("/", 1)[1]
    refused = ContentDigests()
    refused.feed(samples.HTML)
    # A PATCH that stalled past its lease: a retry may own the upload by now.
    row = _upload_row(committed, upload_url)
    assert row is not None
    claim = uploads_service._Claim(  # noqa: SLF001 - the step under test
        id=upload_id,
        state=row["state"],
        length=row["length"],
        offset=row["upload_offset"],
        binary_id=row["binary_id"],
        multipart_upload_id=None,
        parts=[],
        tail_key=None,
        tail_size=0,
        digest_state=None,
    )
    with pytest.raises(UploadBusy):
        uploads_service._sniff_or_purge(
            binary_storage(settings),
            claim,
            refused,
            Caller(
                client_id="unit-01", author="Device/unit-01", request_id="stalled", unit="unit-01"
            ),
            token=uuid.uuid4(),
        )
    assert _upload_row(committed, upload_url) is not None


def test_disguised_html_is_refused_at_completion_and_purged(
    uploads_url: str, auth_headers: Headers, s3: Minio, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    content = samples.HTML + b" " * 1000
    upload_url = _create(
        uploads_url, len(content), headers, **{"Upload-Metadata": _metadata(filetype="image/jpeg")}
    )
    assert _patch(upload_url, content[:500], 0, headers).status_code == 204
    binary_key = _binary_key(committed, upload_url)

    refused = _patch(upload_url, content[500:], 500, headers)
    _assert_problem(refused, 415, "content-type-not-allowed")
    _assert_problem(_head(upload_url, headers), 404, "upload-not-found")
    assert binary_key not in stored_keys(s3, settings)
    assert binary_key not in _assembling_keys(s3, settings)
    assert _staged_keys(s3, settings, upload_url) == set()
    with committed.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM binary_object")).scalar_one() == 0


def test_object_store_down_answers_503_and_keeps_the_offset(
    uploads_url: str, s3_down_uploads_url: str, auth_headers: Headers
) -> None:
    headers = auth_headers("unit-01")
    content = _content(40_000)
    upload_url = _create(uploads_url, len(content), headers)
    assert _patch(upload_url, content[:10_000], 0, headers).status_code == 204
    upload_id = upload_url.rsplit("/", 1)[1]

    # The same upload reached through an API process whose object store is down.
    down = f"{s3_down_uploads_url}/{upload_id}"
    _assert_problem(_patch(down, content[10_000:], 10_000, headers), 503, "storage-unavailable")
    # Creation touches no object store; the first PATCH is what meets the outage.
    created_while_down = _create(s3_down_uploads_url, 10, headers)
    _assert_problem(
        _patch(created_while_down, b"0123456789", 0, headers), 503, "storage-unavailable"
    )
    assert _head(created_while_down, headers).headers["Upload-Offset"] == "0"
    assert _head(upload_url, headers).headers["Upload-Offset"] == "10000"

    finished = _patch(upload_url, content[10_000:], 10_000, headers)
    assert finished.status_code == 204, finished.text
    base = uploads_url.removesuffix("/imaging/uploads")
    assert _stored_bytes(base, finished.headers["Waha-Binary"], headers) == content


def test_expired_uploads_answer_410_and_are_swept(
    uploads_url: str, auth_headers: Headers, s3: Minio, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    expiring = _create(uploads_url, 10_000, headers)
    assert _patch(expiring, _content(3_000), 0, headers).status_code == 204
    expiring_key = _binary_key(committed, expiring)
    # Past 10 MiB a part goes out: this one has an open multipart upload to abort.
    big = _create(uploads_url, 3 * PART_BYTES, headers)
    assert _patch(big, _content(2 * PART_BYTES), 0, headers).status_code == 204
    big_key = _binary_key(committed, big)
    assert big_key in _assembling_keys(s3, settings)
    kept = _create(uploads_url, 10_000, headers)
    with committed.begin() as connection:
        connection.execute(
            text(
                "UPDATE tus_upload SET expires_at = now() - interval '1 minute' "
                "WHERE id IN (:expiring, :big)"
            ),
            {"expiring": expiring.rsplit("/", 1)[1], "big": big.rsplit("/", 1)[1]},
        )
    _assert_problem(_head(expiring, headers), 410, "upload-expired")
    _assert_problem(_patch(expiring, b"x", 3_000, headers), 410, "upload-expired")
    assert _staged_keys(s3, settings, expiring)

    with Session(committed) as session, session.begin():
        swept = sweep_expired_uploads(
            session, storage=binary_storage(settings), now=datetime.now(UTC)
        )
    assert swept == 2
    assert _upload_row(committed, expiring) is None
    assert _upload_row(committed, big) is None
    assert _upload_row(committed, kept) is not None
    assert _staged_keys(s3, settings, expiring) == set()
    assert expiring_key not in _assembling_keys(s3, settings)
    assert big_key not in _assembling_keys(s3, settings)
    _assert_problem(_head(expiring, headers), 404, "upload-not-found")


def test_tuspy_reports_refusals(uploads_url: str, auth_headers: Headers, tmp_path: Path) -> None:
    source = tmp_path / "page.html"
    source.write_bytes(samples.HTML)
    uploader = tus_client.TusClient(uploads_url, headers=auth_headers("unit-01")).uploader(
        str(source), chunk_size=1024
    )
    with pytest.raises(TusCommunicationError) as refused:
        uploader.upload()
    assert refused.value.status_code == 415


def test_metadata_naming_a_patient_sets_the_binary_security_context(
    uploads_url: str, auth_headers: Headers
) -> None:
    headers = auth_headers("unit-01")
    base = uploads_url.removesuffix("/imaging/uploads")
    created = httpx.post(
        f"{base}/fhir/Patient",
        json={"resourceType": "Patient", "gender": "female"},
        headers={**headers, "Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    content = samples.png()
    upload_url = _create(
        uploads_url,
        len(content),
        headers,
        **{"Upload-Metadata": _metadata(filename="wound.png", patient=f"Patient/{patient_id}")},
    )
    finished = _patch(upload_url, content, 0, headers)
    assert finished.status_code == 204, finished.text

    binary = httpx.get(
        f"{base}/fhir/{finished.headers['Waha-Binary']}",
        headers={**headers, "Accept": "application/fhir+json"},
    )
    assert binary.status_code == 200, binary.text
    assert binary.json()["contentType"] == "image/png"
    assert binary.json()["securityContext"] == {"reference": f"Patient/{patient_id}"}
    # A repeated last PATCH (its answer lost) gets the same answer, nothing more.
    again = _patch(upload_url, b"", len(content), headers)
    assert again.status_code == 204
    assert again.headers["Waha-Binary"] == finished.headers["Waha-Binary"]


def test_an_upload_put_whole_but_not_recorded_stays_at_its_offset_for_the_retry(
    uploads_url: str, auth_headers: Headers, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    fhir_headers = {**headers, "Content-Type": "application/fhir+json"}
    base = uploads_url.removesuffix("/imaging/uploads")
    created = httpx.post(
        f"{base}/fhir/Patient", json={"resourceType": "Patient", "gender": "male"}, headers=headers
    )
    assert created.status_code == 201, created.text
    patient = created.json()
    content = samples.png()
    upload_url = _create(
        uploads_url,
        len(content),
        headers,
        **{"Upload-Metadata": _metadata(patient=f"Patient/{patient['id']}")},
    )
    binary_id = _binary_key(committed, upload_url).removeprefix("binaries/")
    # The patient goes between creation and the PATCH: the Binary cannot be recorded.
    assert httpx.delete(f"{base}/fhir/Patient/{patient['id']}", headers=headers).is_success

    refused = _patch(upload_url, content, 0, headers)
    _assert_problem(refused, 422, "dangling-reference")
    # Not at its full length without a Binary: a client that looks finds the
    # bytes still to send, rather than a finished upload with nothing behind it.
    assert _head(upload_url, headers).headers["Upload-Offset"] == "0"
    with committed.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM binary_object WHERE id = :id"), {"id": binary_id}
            ).scalar_one()
            == 0
        )

    restored = httpx.put(f"{base}/fhir/Patient/{patient['id']}", json=patient, headers=fhir_headers)
    assert restored.is_success, restored.text
    finished = _patch(upload_url, content, 0, headers)
    assert finished.status_code == 204, finished.text
    assert finished.headers["Waha-Binary"] == f"Binary/{binary_id}"
    assert _stored_bytes(base, finished.headers["Waha-Binary"], headers) == content


def _binary_object(engine: Engine, binary: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            text("SELECT sha256, sha1, size, content_type FROM binary_object WHERE id = :id"),
            {"id": binary.removeprefix("Binary/")},
        ).one()


@pytest.fixture
def object_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record every object read: (key, length asked, 0 for all of it)."""
    reads: list[tuple[str, int]] = []
    original_open = BinaryStorage.open

    def recording_open(storage: BinaryStorage, key: str, *, length: int = 0) -> Iterator[bytes]:
        reads.append((key, length))
        return original_open(storage, key, length=length)

    monkeypatch.setattr(BinaryStorage, "open", recording_open)
    return reads


def _read_back(reads: list[tuple[str, int]]) -> list[str]:
    """Return the Binary objects read whole (a head read for sniffing is not one)."""
    return [key for key, length in reads if key.startswith("binaries/") and length == 0]


def test_an_upload_sent_in_one_patch_is_hashed_as_it_streams(
    uploads_url: str, auth_headers: Headers, committed: Engine, object_reads: list[tuple[str, int]]
) -> None:
    reads = object_reads
    headers = auth_headers("unit-01")
    whole = _content(300_000)
    upload_url = _create(uploads_url, len(whole), headers)
    finished = _patch(upload_url, whole, 0, headers)
    assert finished.status_code == 204, finished.text
    # Completion read nothing back: the one PATCH saw every byte.
    assert not [key for key, _ in reads if key.startswith("binaries/")]
    stored = _binary_object(committed, finished.headers["Waha-Binary"])
    assert bytes(stored.sha256) == hashlib.sha256(whole).digest()
    assert bytes(stored.sha1) == hashlib.sha1(whole).digest()  # noqa: S324 - R4 Attachment.hash
    assert (stored.size, stored.content_type) == (len(whole), "image/jpeg")

    # In two PATCHes to the same process the digests go on from one to the next.
    upload_url = _create(uploads_url, len(whole), headers)
    assert _patch(upload_url, whole[:100_000], 0, headers).status_code == 204
    finished = _patch(upload_url, whole[100_000:], 100_000, headers)
    assert finished.status_code == 204, finished.text
    # Only the head is read, for sniffing: a recorded state does not keep it.
    assert not _read_back(reads)
    assert [length for key, length in reads if key.startswith("binaries/")] == [HEAD_BYTES]
    again = _binary_object(committed, finished.headers["Waha-Binary"])
    assert (bytes(again.sha256), bytes(again.sha1)) == (bytes(stored.sha256), bytes(stored.sha1))

    # The running digests are recorded with the offset, for whichever process
    # takes the next PATCH: they are those of the bytes so far.
    upload_url = _create(uploads_url, len(whole), headers)
    assert _patch(upload_url, whole[:100_000], 0, headers).status_code == 204
    row = _upload_row(committed, upload_url)
    assert row is not None
    first_state = bytes(row["digest_state"])
    recorded = ContentDigests.resume(first_state, size=100_000)
    assert recorded is not None
    assert recorded.sha256 == hashlib.sha256(whole[:100_000]).digest()
    # A state that is not of the bytes up to the offset (one a process that
    # knows no states left behind) is not taken up: the object is read back.
    assert _patch(upload_url, whole[100_000:200_000], 100_000, headers).status_code == 204
    with committed.begin() as connection:
        connection.execute(
            text("UPDATE tus_upload SET digest_state = :state WHERE id = :id"),
            {"state": first_state, "id": upload_url.rsplit("/", 1)[1]},
        )
    finished = _patch(upload_url, whole[200_000:], 200_000, headers)
    assert finished.status_code == 204, finished.text
    assert len(_read_back(reads)) == 1
    stale = _binary_object(committed, finished.headers["Waha-Binary"])
    assert (bytes(stale.sha256), bytes(stale.sha1)) == (bytes(stored.sha256), bytes(stored.sha1))

    # An upload recorded without them (where the hash state cannot be saved)
    # is read back once at completion, with the same result.
    upload_url = _create(uploads_url, len(whole), headers)
    assert _patch(upload_url, whole[:100_000], 0, headers).status_code == 204
    with committed.begin() as connection:
        connection.execute(
            text("UPDATE tus_upload SET digest_state = NULL WHERE id = :id"),
            {"id": upload_url.rsplit("/", 1)[1]},
        )
    finished = _patch(upload_url, whole[100_000:], 100_000, headers)
    assert finished.status_code == 204, finished.text
    assert len(_read_back(reads)) == 2
    third = _binary_object(committed, finished.headers["Waha-Binary"])
    assert (bytes(third.sha256), bytes(third.sha1)) == (bytes(stored.sha256), bytes(stored.sha1))


def test_a_completion_retried_after_an_outage_takes_up_the_recorded_digests(
    uploads_url: str,
    auth_headers: Headers,
    committed: Engine,
    monkeypatch: pytest.MonkeyPatch,
    object_reads: list[tuple[str, int]],
) -> None:
    original_complete = BinaryStorage.complete_multipart

    def failing_complete(storage: BinaryStorage, *args: Any, **kwargs: Any) -> bool:
        raise StorageUnavailable("object storage is unreachable")

    headers = auth_headers("unit-01")
    content = _content(PART_BYTES + 1_000)
    upload_url = _create(uploads_url, len(content), headers)
    assert _patch(upload_url, content[:PART_BYTES], 0, headers).status_code == 204
    monkeypatch.setattr(BinaryStorage, "complete_multipart", failing_complete)
    _assert_problem(
        _patch(upload_url, content[PART_BYTES:], PART_BYTES, headers), 503, "storage-unavailable"
    )
    row = _upload_row(committed, upload_url)
    assert row is not None
    assert (row["state"], row["upload_offset"]) == ("assembling", len(content))
    assert row["digest_state"] is not None

    # HEAD finishes it, from the recorded digests: nothing is read back.
    monkeypatch.setattr(BinaryStorage, "complete_multipart", original_complete)
    assert _head(upload_url, headers).headers["Upload-Offset"] == str(len(content))
    row = _upload_row(committed, upload_url)
    assert row is not None
    assert (row["state"], row["digest_state"]) == ("completed", None)
    assert not _read_back(object_reads)
    stored = _binary_object(committed, f"Binary/{row['binary_id']}")
    assert bytes(stored.sha256) == hashlib.sha256(content).digest()
    assert bytes(stored.sha1) == hashlib.sha1(content).digest()  # noqa: S324 - R4 Attachment.hash


def test_a_patch_of_over_5_mib_ends_with_a_part_not_a_staged_tail(
    uploads_url: str, auth_headers: Headers, s3: Minio, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    content = _content(PART_BYTES + 3 * 1024 * 1024 + 777)
    upload_url = _create(uploads_url, len(content), headers)
    first = PART_BYTES + 3 * 1024 * 1024
    assert _patch(upload_url, content[:first], 0, headers).status_code == 204
    row = _upload_row(committed, upload_url)
    assert row is not None
    assert [part["size"] for part in row["parts"]] == [first]
    assert row["tail_key"] is None
    assert _staged_keys(s3, settings, upload_url) == set()
    finished = _patch(upload_url, content[first:], first, headers)
    assert finished.status_code == 204, finished.text
    base = uploads_url.removesuffix("/imaging/uploads")
    assert _stored_bytes(base, finished.headers["Waha-Binary"], headers) == content


def test_a_tail_left_by_a_failed_patch_goes_when_the_finished_upload_is_swept(
    uploads_url: str, auth_headers: Headers, s3: Minio, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    content = _content(10_000)
    upload_url = _create(uploads_url, len(content), headers)
    upload_id = upload_url.rsplit("/", 1)[1]
    # What a PATCH that failed between staging its tail and recording it leaves.
    orphan = f"uploads/{upload_id}/tail-{'0' * 32}"
    binary_storage(settings).put_bytes(orphan, b"staged, never recorded")
    assert _patch(upload_url, content, 0, headers).status_code == 204
    # Completion lists nothing under the upload's prefix; the sweep at expiry does.
    assert _staged_keys(s3, settings, upload_url) == {orphan}
    assert _expire_and_sweep(committed, settings, upload_url) == 1
    assert _staged_keys(s3, settings, upload_url) == set()


def test_an_upload_that_arrives_whole_is_stored_with_one_put(
    uploads_url: str,
    auth_headers: Headers,
    s3: Minio,
    settings: Settings,
    committed: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, str]] = []
    for name in ("put", "start_multipart", "upload_part", "complete_multipart"):
        original = getattr(BinaryStorage, name)

        def recording(
            storage: BinaryStorage,
            key: str,
            *args: Any,
            _name: str = name,
            _original: Any = original,
            **kwargs: Any,
        ) -> Any:
            calls.append((_name, key))
            return _original(storage, key, *args, **kwargs)

        monkeypatch.setattr(BinaryStorage, name, recording)

    def upload_calls(upload_url: str) -> list[tuple[str, str]]:
        # Derivatives made meanwhile are stored under keys of their own.
        binary_key = _binary_key(committed, upload_url)
        staging = f"uploads/{upload_url.rsplit('/', 1)[1]}/"
        return [
            (name, "binary" if key == binary_key else "staged")
            for name, key in calls
            if key == binary_key or key.startswith(staging)
        ]

    headers = auth_headers("unit-01")
    photo = _content(1024 * 1024)
    upload_url = _create(uploads_url, len(photo), headers)
    assert calls == []  # creation asks nothing of the object store
    finished = _patch(upload_url, photo, 0, headers)
    assert finished.status_code == 204, finished.text
    assert upload_calls(upload_url) == [("put", "binary")]
    row = _upload_row(committed, upload_url)
    assert row is not None
    assert row["multipart_upload_id"] is None
    assert _binary_key(committed, upload_url) not in _assembling_keys(s3, settings)
    base = uploads_url.removesuffix("/imaging/uploads")
    assert _stored_bytes(base, finished.headers["Waha-Binary"], headers) == photo

    # In two small PATCHes: the first stages a tail, the second puts the whole.
    upload_url = _create(uploads_url, len(photo), headers)
    assert _patch(upload_url, photo[:300_000], 0, headers).status_code == 204
    finished = _patch(upload_url, photo[300_000:], 300_000, headers)
    assert finished.status_code == 204, finished.text
    assert upload_calls(upload_url) == [("put", "staged"), ("put", "binary")]
    assert _stored_bytes(base, finished.headers["Waha-Binary"], headers) == photo

    # Exactly two parts' worth (10 MiB) still goes whole, with one PUT.
    ten = _content(2 * PART_BYTES)
    upload_url = _create(uploads_url, len(ten), headers)
    finished = _patch(upload_url, ten, 0, headers)
    assert finished.status_code == 204, finished.text
    assert upload_calls(upload_url) == [("put", "binary")]

    # Over two parts' worth in one PATCH: a multipart upload, opened with the first part.
    large = _content(2 * PART_BYTES + 1024)
    upload_url = _create(uploads_url, len(large), headers)
    finished = _patch(upload_url, large, 0, headers)
    assert finished.status_code == 204, finished.text
    assert upload_calls(upload_url) == [
        ("start_multipart", "binary"),
        ("upload_part", "binary"),
        ("upload_part", "binary"),
        ("complete_multipart", "binary"),
    ]
    assert _stored_bytes(base, finished.headers["Waha-Binary"], headers) == large


def test_an_object_put_whole_but_never_recorded_goes_when_its_upload_expires(
    uploads_url: str, auth_headers: Headers, s3: Minio, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    upload_url = _create(uploads_url, 10_000, headers)
    binary_key = _binary_key(committed, upload_url)
    # What a PATCH that died between its PUT and recording the offset leaves.
    binary_storage(settings).put_bytes(binary_key, _content(10_000))
    assert binary_key in stored_keys(s3, settings)
    assert _expire_and_sweep(committed, settings, upload_url) == 1
    assert binary_key not in stored_keys(s3, settings)


def test_a_multipart_upload_opened_after_the_lease_was_lost_is_aborted(
    uploads_url: str, auth_headers: Headers, s3: Minio, settings: Settings, committed: Engine
) -> None:
    headers = auth_headers("unit-01")
    upload_url = _create(uploads_url, 3 * PART_BYTES, headers)
    upload_id = upload_url.rsplit("/", 1)[1]
    with Session(committed) as session:
        row = session.get(TusUploadRow, upload_id)
        assert row is not None
        claim = uploads_service._Claim.of(row)  # noqa: SLF001 - the step under test
    # This PATCH's lease token is not the row's (another request took it over).
    with pytest.raises(UploadBusy):
        uploads_service._open_multipart(  # noqa: SLF001
            binary_storage(settings), claim, token=uuid.uuid4()
        )
    assert _binary_key(committed, upload_url) not in _assembling_keys(s3, settings)
    row_after = _upload_row(committed, upload_url)
    assert row_after is not None
    assert row_after["multipart_upload_id"] is None


def test_a_patch_that_lost_its_lease_sends_no_more_parts(
    uploads_url: str,
    auth_headers: Headers,
    settings: Settings,
    committed: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = auth_headers("unit-01")
    content = _content(5 * PART_BYTES)
    upload_url = _create(uploads_url, len(content), headers)
    first = 2 * PART_BYTES + 1
    assert _patch(upload_url, content[:first], 0, headers).status_code == 204
    upload_id = upload_url.rsplit("/", 1)[1]
    # After a long stall its lease ran out and a retry took the upload over.
    with Session(committed) as session, session.begin():
        row = session.get(TusUploadRow, upload_id)
        assert row is not None and row.parts
        claim = uploads_service._Claim.of(row)  # noqa: SLF001 - the step under test
        row.lease_token = uuid.uuid4()
        row.lease_expires_at = datetime.now(UTC) + timedelta(minutes=15)
    sent: list[int] = []
    original = BinaryStorage.upload_part

    def recording(storage: BinaryStorage, key: str, **kwargs: Any) -> str:
        sent.append(int(kwargs["part_number"]))
        return str(original(storage, key, **kwargs))

    monkeypatch.setattr(BinaryStorage, "upload_part", recording)
    monkeypatch.setattr(uploads_service, "LEASE_RENEW_SECONDS", -1.0)
    with pytest.raises(UploadBusy):
        uploads_service._stage_body(  # noqa: SLF001
            binary_storage(settings),
            claim,
            iter([content[first : first + 2 * PART_BYTES]]),
            None,
            token=uuid.uuid4(),
        )
    assert sent == []
