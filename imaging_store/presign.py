"""Presigned download URLs: let clients fetch a Binary's bytes from MinIO directly.

Optional (DESIGN.md "Imaging contract"): the API still decides who may read
the Binary, then answers with a redirect to a URL that stays valid at most
300 s, instead of streaming the bytes itself. Signing is local (no request to
the store), so a URL costs microseconds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from minio import Minio
from sqlalchemy.orm import Session

from imaging_store.service import Caller, binary_at
from imaging_store.sniffing import PDF
from imaging_store.storage import BinaryStorage, StorageConfig

# DESIGN.md: a presigned URL is valid ≤ 300 s; the SDK's default is 7 days.
MAX_EXPIRES_SECONDS = 300

_signers: dict[tuple[StorageConfig, str, bool], Minio] = {}
_signers_lock = threading.Lock()


def _signer(
    storage: BinaryStorage, public_endpoint: str | None, public_secure: bool | None
) -> Minio:
    # SigV4 signs the Host header: a URL handed to clients must be signed for
    # the endpoint they reach, which may differ from the API's own (compose).
    if public_endpoint is None or public_endpoint == storage.config.endpoint:
        if public_secure is None or public_secure == storage.config.secure:
            return storage.client
    endpoint = public_endpoint or storage.config.endpoint
    secure = storage.config.secure if public_secure is None else public_secure
    key = (storage.config, endpoint, secure)
    with _signers_lock:
        signer = _signers.get(key)
        if signer is None:
            # The region is given, so signing never asks the store for it.
            signer = _signers[key] = Minio(
                endpoint,
                access_key=storage.config.access_key,
                secret_key=storage.config.secret_key,
                secure=secure,
                region=storage.config.region,
            )
        return signer


def redirect_seconds(requested: int) -> int:
    """Return the validity actually used: at least 1 s, at most 300 s."""
    return max(1, min(requested, MAX_EXPIRES_SECONDS))


def presigned_download_url(
    storage: BinaryStorage,
    object_key: str,
    *,
    expires_seconds: int,
    content_type: str,
    disposition: str | None = None,
    public_endpoint: str | None = None,
    public_secure: bool | None = None,
) -> str:
    """Return a GET URL of one object, valid ≤ 300 s, that answers with the given headers."""
    # The store answers with these instead of the object's own metadata, so
    # a download by redirect carries the same type and disposition as one
    # streamed by the API.
    response_headers: dict[str, str | list[str] | tuple[str]] = {
        "response-content-type": content_type
    }
    if disposition is not None:
        response_headers["response-content-disposition"] = disposition
    return _signer(storage, public_endpoint, public_secure).presigned_get_object(
        storage.config.bucket,
        object_key,
        expires=timedelta(seconds=redirect_seconds(expires_seconds)),
        response_headers=response_headers,
    )


def download_disposition(binary_id: str, content_type: str) -> str | None:
    """Return the Content-Disposition a download gets: PDFs as attachment, else none."""
    if content_type == PDF:
        return f'attachment; filename="{binary_id}.pdf"'
    return None


@dataclass(frozen=True, slots=True)
class BinaryRedirect:
    """Where to send a reader of a Binary instead of streaming its bytes."""

    id: str
    version_id: int
    last_updated: datetime
    url: str


def redirect_binary(
    session: Session,
    *,
    storage: BinaryStorage,
    binary_id: str,
    caller: Caller,
    base_url: str,
    expires_seconds: int,
    public_endpoint: str | None = None,
    public_secure: bool | None = None,
    version: str | None = None,
) -> BinaryRedirect:
    """Check that the caller may read a Binary, then return a presigned URL of its bytes."""
    # The same checks as a streamed read: existence (404/410), then the access rules.
    _, version_id, last_updated, row = binary_at(
        session, binary_id=binary_id, caller=caller, base_url=base_url, version=version
    )
    url = presigned_download_url(
        storage,
        row.object_key,
        expires_seconds=expires_seconds,
        content_type=row.content_type,
        disposition=download_disposition(row.id, row.content_type),
        public_endpoint=public_endpoint,
        public_secure=public_secure,
    )
    return BinaryRedirect(id=row.id, version_id=version_id, last_updated=last_updated, url=url)
