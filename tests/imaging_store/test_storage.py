"""The object-store wrapper against the real local S3 server."""

from __future__ import annotations

import hashlib
import io
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import minio.api
import minio.helpers
import pytest
from minio import Minio

from hub.settings import Settings
from imaging_store import service
from imaging_store.errors import StorageUnavailable
from imaging_store.storage import BinaryStorage, ObjectMissing, StorageConfig
from tests.imaging_store.conftest import free_port


def _config(settings: Settings, **changes: object) -> StorageConfig:
    config = service.storage_config(settings)
    values = {
        "endpoint": config.endpoint,
        "access_key": config.access_key,
        "secret_key": config.secret_key,
        "secure": config.secure,
        "region": config.region,
        "bucket": config.bucket,
    }
    values.update(changes)
    return StorageConfig(**values)  # type: ignore[arg-type]  # test-only keyword pass-through


def test_the_bucket_is_created_on_first_use_and_ensuring_it_is_idempotent(
    settings: Settings, s3: Minio
) -> None:
    bucket = f"waha-test-{uuid.uuid4().hex[:12]}"
    storage = BinaryStorage(_config(settings, bucket=bucket))
    assert not s3.bucket_exists(bucket)
    storage.put("binaries/one", io.BytesIO(b"abc"), length=3, content_type="text/plain")
    assert s3.bucket_exists(bucket)
    BinaryStorage(_config(settings, bucket=bucket)).ensure_bucket()
    assert storage.exists("binaries/one")
    assert b"".join(storage.open("binaries/one")) == b"abc"


def test_encryption_at_rest_is_requested_where_supported(settings: Settings, s3: Minio) -> None:
    bucket = f"waha-test-{uuid.uuid4().hex[:12]}"
    storage = BinaryStorage(_config(settings, bucket=bucket))
    assert storage.encrypts_at_rest is None
    storage.put("binaries/two", io.BytesIO(b"abc"), length=3, content_type="text/plain")
    assert storage.encrypts_at_rest is True
    stat = s3.stat_object(bucket, "binaries/two")
    assert stat.metadata["x-amz-server-side-encryption"] == "AES256"


class _NoEncryptionS3(BaseHTTPRequestHandler):
    """An S3 endpoint that, like MinIO without a KMS, refuses SSE-S3 (and keeps puts)."""

    stored: ClassVar[dict[str, bytes]] = {}

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if self.headers.get("x-amz-server-side-encryption"):
            error = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                b"<Message>no KMS</Message><Resource>/</Resource><RequestId>1</RequestId>"
                b"<HostId>1</HostId></Error>"
            )
            self.send_response(501)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        self.stored[self.path] = body
        self.send_response(200)
        self.send_header("ETag", '"1"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - overridden signature
        """Keep test output quiet."""


def test_a_store_without_encryption_at_rest_gets_the_object_in_clear(settings: Settings) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoEncryptionS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"127.0.0.1:{server.server_address[1]}"
        storage = BinaryStorage(_config(settings, endpoint=endpoint, bucket="no-kms"))
        storage.put("binaries/three", io.BytesIO(b"abc"), length=3, content_type="text/plain")
        assert storage.encrypts_at_rest is False
        assert _NoEncryptionS3.stored["/no-kms/binaries/three"] == b"abc"
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_object_is_object_missing(settings: Settings) -> None:
    storage = BinaryStorage(_config(settings))
    storage.ensure_bucket()
    with pytest.raises(ObjectMissing):
        storage.open(f"binaries/{uuid.uuid4()}")
    assert not storage.exists(f"binaries/{uuid.uuid4()}")


def test_a_store_that_is_down_fails_fast_as_unavailable(settings: Settings) -> None:
    storage = BinaryStorage(_config(settings, endpoint=f"127.0.0.1:{free_port()}"))
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        storage.put("binaries/x", io.BytesIO(b"abc"), length=3, content_type="text/plain")
    with pytest.raises(StorageUnavailable):
        storage.open("binaries/x")
    assert time.monotonic() - started < 30


def test_prepare_storage_does_not_raise_when_the_store_is_down(settings: Settings) -> None:
    service.prepare_storage(settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{free_port()}"}))


def test_a_known_sha256_goes_in_one_put_and_is_not_hashed_again(
    settings: Settings, s3: Minio, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over 5 MiB, where the SDK would cut parts, and from a spool file on disk.
    content = uuid.uuid4().bytes * (6 * 1024 * 1024 // 16 + 3)
    hashed: list[int] = []
    original_hash = minio.helpers.sha256_hash

    def recording_hash(data: bytes | str | None) -> str:
        hashed.append(len(data or b""))
        return original_hash(data)

    def no_multipart(*_: object, **__: object) -> None:
        raise AssertionError("a known digest must not go through put_object")

    monkeypatch.setattr(minio.api, "sha256_hash", recording_hash)
    storage = BinaryStorage(_config(settings))
    monkeypatch.setattr(storage.client, "put_object", no_multipart)
    with tempfile.SpooledTemporaryFile(max_size=1024) as spool:
        spool.write(content)
        spool.seek(0)
        storage.put(
            "binaries/known-digest",
            spool,
            length=len(content),
            content_type="image/jpeg",
            sha256=hashlib.sha256(content).digest(),
        )
    assert max(hashed, default=0) == 0
    assert b"".join(storage.open("binaries/known-digest")) == content
    assert s3.stat_object(settings.s3_bucket, "binaries/known-digest").content_type == "image/jpeg"


def test_a_known_sha256_signs_a_multipart_part(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[int] = []
    original_hash = minio.helpers.sha256_hash

    def recording_hash(data: bytes | str | None) -> str:
        hashed.append(len(data or b""))
        return original_hash(data)

    storage = BinaryStorage(_config(settings))
    key = f"binaries/{uuid.uuid4()}"
    upload_id = storage.start_multipart(key, content_type="application/octet-stream")
    monkeypatch.setattr(minio.api, "sha256_hash", recording_hash)
    etag = storage.upload_part(
        key,
        multipart_upload_id=upload_id,
        part_number=1,
        data=b"abc",
        sha256=hashlib.sha256(b"abc").digest(),
    )
    monkeypatch.undo()
    assert max(hashed, default=0) == 0
    assert storage.complete_multipart(key, multipart_upload_id=upload_id, parts=[(1, etag)])
    assert b"".join(storage.open(key)) == b"abc"


def test_a_store_without_encryption_gets_a_known_digest_upload_from_the_start(
    settings: Settings,
) -> None:
    # The refused first attempt read the file; the second one must send it whole again.
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoEncryptionS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    content = b"0123456789" * 10_000
    try:
        endpoint = f"127.0.0.1:{server.server_address[1]}"
        storage = BinaryStorage(_config(settings, endpoint=endpoint, bucket="no-kms"))
        storage.put(
            "binaries/four",
            io.BytesIO(content),
            length=len(content),
            content_type="text/plain",
            sha256=hashlib.sha256(content).digest(),
        )
        assert storage.encrypts_at_rest is False
        assert _NoEncryptionS3.stored["/no-kms/binaries/four"] == content
    finally:
        server.shutdown()
        server.server_close()
