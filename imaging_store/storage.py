"""The object store behind Binary: a thin wrapper over the minio SDK.

Keys are `binaries/<uuid>` and carry no patient data. Calls fail fast (short
connect timeout, one retry) because a unit waiting on a dead store should get
503 and retry later, not hang for the SDK's default five minutes.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, BinaryIO, cast

import structlog
import urllib3
from minio import Minio
from minio.credentials.credentials import Credentials
from minio.datatypes import Part
from minio.error import MinioException, S3Error
from minio.helpers import DictType
from minio.sse import SseS3

from imaging_store.errors import StorageUnavailable

log = structlog.get_logger()

KEY_PREFIX = "binaries/"
STREAM_CHUNK_BYTES = 64 * 1024
# S3's largest single PUT. Up to it an object whose SHA-256 is known goes in
# one request signed with that hash; above it, the SDK's multipart upload.
MAX_SINGLE_PUT_BYTES = 5 * 1024**3
_PAYLOAD_SHA256 = "x-amz-content-sha256"
# S3 error codes by which a backend says it cannot encrypt at rest (MinIO
# without a KMS answers NotImplemented; others refuse the header).
_SSE_REFUSED_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest", "KMS.NotConfigured"}
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError, MinioException)


class ObjectMissing(Exception):
    """The store has no object under the key (the row outlived its object)."""


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Where the object store is and how to reach it."""

    endpoint: str
    access_key: str
    secret_key: str
    secure: bool
    region: str
    bucket: str
    connect_timeout_seconds: float = 3.0
    read_timeout_seconds: float = 60.0


class _Client(Minio):
    """The SDK's client, signing with a payload SHA-256 the caller already computed.

    Over http the SDK hashes every body again for the SigV4 payload hash (over
    https it computes an MD5 instead): a second pass over bytes Waha has just
    hashed while receiving them. A request that carries `x-amz-content-sha256`
    is signed with that value, which S3 and MinIO check against the body.
    """

    def _build_headers(
        self,
        host: str,
        headers: DictType | None = None,
        body: bytes | None = None,
        creds: Credentials | None = None,
    ) -> tuple[DictType, datetime]:
        payload_sha256 = (headers or {}).get(_PAYLOAD_SHA256)
        if payload_sha256 is None:
            return super()._build_headers(host, headers, body, creds)
        # Without the body the SDK neither hashes it nor measures it: the
        # caller's headers carry Content-Length, and the hash is put back.
        built, date = super()._build_headers(host, headers, None, creds)
        built[_PAYLOAD_SHA256] = payload_sha256
        return built, date


def object_key(binary_id: str) -> str:
    """Return the object key of a Binary: its id only, never patient data."""
    return f"{KEY_PREFIX}{binary_id}"


class BinaryStorage:
    """Put, stream and remove Binary objects in one bucket."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(
                connect=config.connect_timeout_seconds, read=config.read_timeout_seconds
            ),
            maxsize=20,
            retries=urllib3.Retry(total=1, backoff_factor=0.1, status_forcelist=[502, 503, 504]),
            # A body streamed from a spool file goes in 64 KiB sends, not 16 KiB.
            blocksize=STREAM_CHUNK_BYTES,
        )
        # The region is given so the SDK does not ask the store for the
        # bucket's location before every first call.
        self.client = _Client(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=config.secure,
            region=config.region,
            http_client=http,
        )
        self._lock = threading.Lock()
        self._bucket_ready = False
        # None until the first write tells whether the backend encrypts at rest.
        self.encrypts_at_rest: bool | None = None

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent); raise if the store is down."""
        if self._bucket_ready:
            return
        with self._lock:
            if self._bucket_ready:
                return
            try:
                if not self.client.bucket_exists(self.config.bucket):
                    try:
                        self.client.make_bucket(self.config.bucket)
                    except S3Error as error:
                        # Another API process created it between the two calls.
                        if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
                    log.info("imaging_store.bucket_created", bucket=self.config.bucket)
            except _TRANSPORT_ERRORS as error:
                raise self._unavailable(error, "ensure_bucket") from None
            self._bucket_ready = True

    def put(
        self,
        key: str,
        data: IO[bytes],
        *,
        length: int,
        content_type: str,
        sha256: bytes | None = None,
    ) -> None:
        """Store `length` bytes from `data` under `key`, encrypted at rest where supported.

        `sha256`, the digest of exactly those bytes when the caller has it,
        spares the SDK a second pass over them and a multipart upload.
        """
        self.ensure_bucket()
        start = data.tell()
        if self.encrypts_at_rest is not False:
            try:
                self._put(key, data, length, content_type, sha256=sha256, encrypt=True)
            except S3Error as error:
                if error.code not in _SSE_REFUSED_CODES:
                    raise self._unavailable(error, "put_object") from None
                # The backend cannot encrypt at rest (moto, MinIO without a KMS):
                # store in clear rather than refuse every upload, and say so once.
                log.warning(
                    "imaging_store.encryption_unsupported",
                    bucket=self.config.bucket,
                    code=error.code,
                )
                self.encrypts_at_rest = False
                data.seek(start)
            except _TRANSPORT_ERRORS as error:
                raise self._unavailable(error, "put_object") from None
            else:
                self.encrypts_at_rest = True
                return
        try:
            self._put(key, data, length, content_type, sha256=sha256, encrypt=False)
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "put_object") from None

    def _put(
        self,
        key: str,
        data: IO[bytes],
        length: int,
        content_type: str,
        *,
        sha256: bytes | None,
        encrypt: bool,
    ) -> None:
        if sha256 is not None and length <= MAX_SINGLE_PUT_BYTES:
            headers: DictType = {
                "Content-Type": content_type,
                "Content-Length": str(length),
                _PAYLOAD_SHA256: sha256.hex(),
            }
            if encrypt:
                headers.update(SseS3().headers())
            self.client._execute(
                "PUT",
                self.config.bucket,
                key,
                # urllib3 streams the file (and rewinds it for a retry); the SDK
                # only passes the body on, since it need neither hash nor measure it.
                body=cast(bytes, data),
                headers=headers,
                no_body_trace=True,
            )
            return
        self.client.put_object(
            self.config.bucket,
            key,
            # The SDK only calls read(); a spooled temporary file is typed IO[bytes].
            cast(BinaryIO, data),
            length,
            content_type=content_type,
            sse=SseS3() if encrypt else None,
        )

    def open(self, key: str, *, length: int = 0) -> Iterator[bytes]:
        """Start reading an object (its first `length` bytes if given); iterate over chunks.

        The store is contacted before this returns, so an outage surfaces as
        StorageUnavailable here rather than as a broken response stream.
        """
        try:
            response = self.client.get_object(self.config.bucket, key, length=length)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectMissing(key) from None
            raise self._unavailable(error, "get_object") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "get_object") from None
        return _stream(response)

    def exists(self, key: str) -> bool:
        """Tell whether an object is stored under `key`."""
        try:
            self.client.stat_object(self.config.bucket, key)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                return False
            raise self._unavailable(error, "stat_object") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "stat_object") from None
        return True

    # Multipart helpers for resumable uploads. They use the SDK's thin S3 API
    # calls (CreateMultipartUpload, UploadPart, Complete/Abort) because its
    # high-level put_object owns the whole stream in one call, whereas a
    # resumable upload receives its parts across many requests and processes.

    def start_multipart(self, key: str, *, content_type: str) -> str:
        """Begin a multipart upload into `key`, encrypted at rest where supported."""
        self.ensure_bucket()
        if self.encrypts_at_rest is not False:
            try:
                upload_id = self.client._create_multipart_upload(
                    self.config.bucket, key, {"Content-Type": content_type, **SseS3().headers()}
                )
            except S3Error as error:
                if error.code not in _SSE_REFUSED_CODES:
                    raise self._unavailable(error, "create_multipart_upload") from None
                log.warning(
                    "imaging_store.encryption_unsupported",
                    bucket=self.config.bucket,
                    code=error.code,
                )
                self.encrypts_at_rest = False
            except _TRANSPORT_ERRORS as error:
                raise self._unavailable(error, "create_multipart_upload") from None
            else:
                self.encrypts_at_rest = True
                return str(upload_id)
        try:
            upload_id = self.client._create_multipart_upload(
                self.config.bucket, key, {"Content-Type": content_type}
            )
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "create_multipart_upload") from None
        return str(upload_id)

    def upload_part(
        self,
        key: str,
        *,
        multipart_upload_id: str,
        part_number: int,
        data: bytes,
        sha256: bytes | None = None,
    ) -> str:
        """Store one part of a multipart upload; return its ETag.

        `sha256`, the part's digest when the caller has it, spares the SDK
        hashing the part again.
        """
        headers: DictType | None = None
        if sha256 is not None:
            headers = {"Content-Length": str(len(data)), _PAYLOAD_SHA256: sha256.hex()}
        try:
            etag = self.client._upload_part(
                self.config.bucket, key, data, headers, multipart_upload_id, part_number
            )
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "upload_part") from None
        return str(etag)

    def complete_multipart(
        self, key: str, *, multipart_upload_id: str, parts: Sequence[tuple[int, str]]
    ) -> bool:
        """Assemble the listed (number, ETag) parts into `key`; False if no such upload."""
        try:
            self.client._complete_multipart_upload(
                self.config.bucket,
                key,
                multipart_upload_id,
                [Part(number, etag) for number, etag in parts],
            )
        except S3Error as error:
            if error.code == "NoSuchUpload":
                return False
            raise self._unavailable(error, "complete_multipart_upload") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "complete_multipart_upload") from None
        return True

    def abort_multipart(self, key: str, *, multipart_upload_id: str) -> None:
        """Drop a multipart upload and its parts (already gone is fine)."""
        try:
            self.client._abort_multipart_upload(self.config.bucket, key, multipart_upload_id)
        except S3Error as error:
            if error.code != "NoSuchUpload":
                raise self._unavailable(error, "abort_multipart_upload") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "abort_multipart_upload") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small object held in memory (a staged tail under 5 MiB)."""
        self.put(key, io.BytesIO(data), length=len(data), content_type="application/octet-stream")

    def read_head(self, key: str, length: int) -> bytes:
        """Return an object's first `length` bytes (all of it if shorter)."""
        return b"".join(self.open(key, length=length))

    def read_small(self, key: str) -> bytes:
        """Return a small object's bytes whole (staged tails under 5 MiB, never a Binary)."""
        return b"".join(self.open(key))

    def remove(self, key: str) -> None:
        """Delete one object (already gone is fine)."""
        try:
            self.client.remove_object(self.config.bucket, key)
        except S3Error as error:
            if error.code not in ("NoSuchKey", "NoSuchBucket"):
                raise self._unavailable(error, "remove_object") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "remove_object") from None

    def remove_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; return how many."""
        try:
            keys = [
                str(item.object_name)
                for item in self.client.list_objects(
                    self.config.bucket, prefix=prefix, recursive=True
                )
            ]
            for key in keys:
                self.client.remove_object(self.config.bucket, key)
        except S3Error as error:
            if error.code == "NoSuchBucket":
                return 0
            raise self._unavailable(error, "remove_prefix") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "remove_prefix") from None
        return len(keys)

    def list_objects(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """Yield the key and last-modified time of every object under `prefix`, in key order."""
        try:
            for item in self.client.list_objects(self.config.bucket, prefix=prefix, recursive=True):
                if item.object_name is not None and item.last_modified is not None:
                    yield str(item.object_name), item.last_modified
        except S3Error as error:
            if error.code == "NoSuchBucket":
                return
            raise self._unavailable(error, "list_objects") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "list_objects") from None

    def modified_at(self, key: str) -> datetime | None:
        """Return when the object under `key` was last written, or None if there is none."""
        try:
            return self.client.stat_object(self.config.bucket, key).last_modified
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                return None
            raise self._unavailable(error, "stat_object") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "stat_object") from None

    def list_multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str, datetime]]:
        """Yield (key, multipart upload id, started at) of every unfinished multipart upload."""
        key_marker: str | None = None
        try:
            while True:
                result = self.client._list_multipart_uploads(
                    self.config.bucket, prefix=prefix, key_marker=key_marker
                )
                for upload in result.uploads:
                    if upload.upload_id is not None and upload.initiated_time is not None:
                        yield str(upload.object_name), upload.upload_id, upload.initiated_time
                # The SDK drops NextUploadIdMarker, so pages go by key: several
                # uploads into one key may wait for the next sweep.
                if not result.is_truncated or not result.next_key_marker:
                    return
                key_marker = result.next_key_marker
        except S3Error as error:
            if error.code == "NoSuchBucket":
                return
            raise self._unavailable(error, "list_multipart_uploads") from None
        except _TRANSPORT_ERRORS as error:
            raise self._unavailable(error, "list_multipart_uploads") from None

    def _unavailable(self, error: Exception, operation: str) -> StorageUnavailable:
        # The error's text may hold the endpoint, never patient data; log the type.
        log.warning(
            "imaging_store.storage_unavailable",
            operation=operation,
            error=type(error).__name__,
            code=getattr(error, "code", None),
        )
        return StorageUnavailable("object storage is unavailable; retry later")


def _stream(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    try:
        yield from response.stream(STREAM_CHUNK_BYTES)
    finally:
        response.close()
        response.release_conn()


_storages: dict[StorageConfig, BinaryStorage] = {}
_storages_lock = threading.Lock()


def storage_for(config: StorageConfig) -> BinaryStorage:
    """Return the process's client for `config` (one connection pool per store)."""
    with _storages_lock:
        storage = _storages.get(config)
        if storage is None:
            storage = _storages[config] = BinaryStorage(config)
        return storage
