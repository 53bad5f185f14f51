"""Rules of resumable uploads (tus 1.0.0): create, receive, finish into a Binary, expire.

Bytes never sit whole in the API. A PATCH body is cut into S3 multipart parts
as it streams (S3 wants at least 5 MiB in every part but the last, and takes
parts of different sizes): a part goes out once 10 MiB are buffered, keeping
the last 5 MiB back, so that the PATCH ends with a part of 5 to 10 MiB. Only
a PATCH that brings fewer than 5 MiB (with what was staged before) leaves
bytes past its last part; they are staged as a small object
(`uploads/<id>/tail-…`) and put in front of the next PATCH's bytes. The
multipart upload assembles straight into the Binary's own key
`binaries/<binary id>`, and is opened only when a first part goes out: an
upload whose bytes are all in hand before that (a photo sent in one PATCH,
up to 10 MiB) is stored with a single PUT, one S3 request instead of three.

A PATCH may stream for minutes over a rural mobile network, so it holds no
transaction (nor pooled connection) meanwhile: one short unit of work takes a
lease on the row (a second PATCH gets 423), the body goes to S3, and another
short unit of work records the new parts and offset and frees the lease. The
offset advances only in that last step, so a store outage or a checksum
mismatch leaves the upload where it was; parts a failed PATCH uploaded are
never listed, and its retry overwrites them under the same part numbers.
A PATCH that puts an upload whole records its offset and its Binary in one
transaction: the offset never reaches the length without the Binary, and a
retry after a failure sends the bytes again to the same key. A multipart
upload, once completed, cannot take its parts again, so its last PATCH
records the full offset first (state `assembling`); HEAD or a retry then
finishes it.

An upload is hashed and UTF-8-checked as it streams, whichever API process
each PATCH reaches: the running state (SHA-256 and SHA-1 contexts, the UTF-8
decoder's) is recorded with the offset it covers, in the same transaction,
and the next PATCH takes it up if it covers exactly the bytes up to the
offset. The state holds no content but the bytes of an unfinished hash block
(under 64): the leading bytes that sniffing needs are read from the object
(8 KiB) at completion. Only where a state cannot be saved or taken up (no
libcrypto to load, a state left behind by a process that knows none)
does completion re-read the whole object once, streamed.

Staged tails are removed by key as soon as a later PATCH has consumed them.
One left behind by a PATCH that failed between staging and recording goes
with its upload's prefix when the upload is swept at expiry, completed or
not, so completion lists nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.orm import Session

from fhir_api import service as fhir_service
from fhir_api.context import RequestContext
from fhir_api.errors import ResourceGone, ResourceNotFound
from fhir_api.writes import EntryRequest, WriteSettings
from hub.db import session_scope
from hub.settings import Settings
from imaging_store import media
from imaging_store import repository as binary_repository
from imaging_store.errors import ContentTypeNotAllowed, StorageUnavailable
from imaging_store.models import BinaryObjectRow
from imaging_store.service import Caller, ContentDigests
from imaging_store.sniffing import HEAD_BYTES, sniff_content_type
from imaging_store.storage import BinaryStorage, object_key
from imaging_store.uploads import repository
from imaging_store.uploads.errors import (
    ChecksumAlgorithmUnsupported,
    ChecksumMismatch,
    InvalidUploadRequest,
    UploadBusy,
    UploadExpired,
    UploadInterrupted,
    UploadNotFound,
    UploadOffsetMismatch,
    UploadTooLarge,
)
from imaging_store.uploads.models import ASSEMBLING, COMPLETED, RECEIVING, TusUploadRow

log = structlog.get_logger()

# S3's smallest part (all but the last). A PATCH buffers at most twice this
# (plus one received chunk) before sending a part.
PART_BYTES = 5 * 1024 * 1024
STAGING_PREFIX = "uploads/"
# A lease outlives a crashed API process by this much; a streaming PATCH
# renews it well before, so a slow network never loses it mid-body.
LEASE_DURATION = timedelta(minutes=15)
LEASE_RENEW_SECONDS = 60.0
CHECKSUM_ALGORITHMS = ("sha1", "sha256")
# The type is sniffed at completion; until then the object is opaque bytes.
OPAQUE_CONTENT_TYPE = "application/octet-stream"
MAX_METADATA_CHARS = 4096
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_METADATA_KEY = re.compile(r"^[^\s,]+$")
_CONTEXT_TYPES = {"patient": "Patient", "encounter": "Encounter"}


@dataclass(frozen=True, slots=True)
class UploadSettings:
    """What uploads need from the settings."""

    max_bytes: int
    expiry: timedelta
    base_url: str
    enforce_referential_integrity: bool


def upload_settings(settings: Settings) -> UploadSettings:
    """Return the upload rules of these settings."""
    return UploadSettings(
        max_bytes=settings.max_tus_upload_bytes,
        expiry=timedelta(hours=settings.tus_upload_expiry_hours),
        base_url=settings.fhir_base_url,
        enforce_referential_integrity=settings.enforce_referential_integrity,
    )


@dataclass(frozen=True, slots=True)
class UploadStatus:
    """Where an upload stands, as HEAD and PATCH report it."""

    id: str
    length: int
    offset: int
    upload_metadata: str | None
    # None once finished: a finished upload no longer expires for the client.
    expires_at: datetime | None
    # Set once the bytes are a Binary.
    binary_id: str | None


@dataclass(frozen=True, slots=True)
class UploadChecksum:
    """A PATCH's Upload-Checksum: an algorithm and the digest of the body."""

    algorithm: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class _Claim:
    """A snapshot of the upload a leased PATCH works on."""

    id: str
    state: str
    length: int
    offset: int
    binary_id: str
    multipart_upload_id: str | None
    parts: list[dict[str, Any]]
    tail_key: str | None
    tail_size: int
    digest_state: bytes | None

    @classmethod
    def of(cls, row: TusUploadRow) -> _Claim:
        return cls(
            id=row.id,
            state=row.state,
            length=row.length,
            offset=row.upload_offset,
            binary_id=row.binary_id,
            multipart_upload_id=row.multipart_upload_id,
            parts=list(row.parts),
            tail_key=row.tail_key,
            tail_size=row.tail_size,
            digest_state=row.digest_state,
        )


@dataclass(frozen=True, slots=True)
class _Staged:
    """What one PATCH stored: its parts, its new tail and the new offset."""

    multipart_upload_id: str | None
    parts: list[dict[str, Any]]
    tail_key: str | None
    tail_size: int
    offset: int
    # The digests of the upload up to `offset`, unless a state could not be taken up.
    digests: ContentDigests | None = None


def staging_prefix(upload_id: str) -> str:
    """Return the key prefix of an upload's staged objects."""
    return f"{STAGING_PREFIX}{upload_id}/"


def parse_upload_length(value: str | None, *, defer_length: str | None, limit: int) -> int:
    """Return a valid Upload-Length, or refuse it (missing, deferred, zero, over the limit)."""
    if defer_length is not None:
        raise InvalidUploadRequest("Upload-Defer-Length is not supported; send Upload-Length")
    if value is None:
        raise InvalidUploadRequest("Upload-Length is required")
    if not value.isascii() or not value.isdigit():
        raise InvalidUploadRequest("Upload-Length must be a non-negative integer")
    length = int(value)
    if length == 0:
        raise InvalidUploadRequest("the upload is empty")
    if length > limit:
        raise UploadTooLarge(f"Upload-Length is over the {limit}-byte limit")
    return length


def parse_upload_metadata(value: str | None) -> dict[str, str]:
    """Decode Upload-Metadata (`key base64,key base64`); values must be UTF-8."""
    if value is None or not value.strip():
        return {}
    if len(value) > MAX_METADATA_CHARS:
        raise InvalidUploadRequest(f"Upload-Metadata is over {MAX_METADATA_CHARS} characters")
    metadata: dict[str, str] = {}
    for pair in value.split(","):
        key, _, encoded = pair.strip().partition(" ")
        if not _METADATA_KEY.match(key) or key in metadata:
            raise InvalidUploadRequest("Upload-Metadata keys must be unique, without spaces")
        try:
            metadata[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidUploadRequest(f"Upload-Metadata {key} is not base64 UTF-8") from None
    return metadata


def parse_upload_offset(value: str | None) -> int:
    """Return a PATCH's Upload-Offset, or refuse it."""
    if value is None or not value.isascii() or not value.isdigit():
        raise InvalidUploadRequest("Upload-Offset must be a non-negative integer")
    return int(value)


def parse_upload_checksum(value: str | None) -> UploadChecksum | None:
    """Return a PATCH's Upload-Checksum (`sha256 <base64>`), or None when absent."""
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    algorithm = algorithm.lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise ChecksumAlgorithmUnsupported(
            f"Upload-Checksum algorithm must be one of {', '.join(CHECKSUM_ALGORITHMS)}"
        )
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        raise InvalidUploadRequest("Upload-Checksum is not base64") from None
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise InvalidUploadRequest(f"Upload-Checksum is not a {algorithm} digest")
    return UploadChecksum(algorithm, digest)


def _context_reference(key: str, value: str) -> str:
    resource_type = _CONTEXT_TYPES[key]
    resource_id = value.removeprefix(f"{resource_type}/")
    if not _FHIR_ID.match(resource_id):
        raise InvalidUploadRequest(f"Upload-Metadata {key} must be {resource_type}/<id>")
    return f"{resource_type}/{resource_id}"


def _request_context(caller: Caller) -> RequestContext:
    # The caller's own rights: a context it may not see is one that is not there.
    return caller.request_context()


def _security_context(
    session: Session, metadata: dict[str, str], *, caller: Caller, settings: UploadSettings
) -> str | None:
    """Check the patient/encounter the metadata names; return the Binary's securityContext."""
    references = {
        key: _context_reference(key, metadata[key]) for key in _CONTEXT_TYPES if metadata.get(key)
    }
    # Checked now, not after gigabytes: the reference must resolve when the
    # Binary is recorded, and the caller must be allowed to see it.
    for key, reference in references.items():
        resource_type, resource_id = reference.split("/")
        try:
            fhir_service.run_interaction(
                session,
                EntryRequest(method="GET", resource_type=resource_type, resource_id=resource_id),
                context=_request_context(caller),
                settings=WriteSettings(base_url=settings.base_url),
            )
        except (ResourceNotFound, ResourceGone):
            raise InvalidUploadRequest(
                f"Upload-Metadata {key} names no {resource_type} you may see"
            ) from None
    # The patient decides access (DESIGN.md "Access rules"); the encounter implies one.
    return references.get("patient") or references.get("encounter")


def _status(row: TusUploadRow) -> UploadStatus:
    done = row.state == COMPLETED
    return UploadStatus(
        id=row.id,
        length=row.length,
        offset=row.upload_offset,
        upload_metadata=row.upload_metadata,
        expires_at=None if done else row.expires_at,
        binary_id=row.binary_id if done else None,
    )


def _visible(row: TusUploadRow | None, *, caller: Caller, now: datetime) -> TusUploadRow:
    # Another client's upload answers exactly like a missing one.
    if row is None or row.owner_client_id != caller.owner:
        raise UploadNotFound("no such upload")
    if row.expires_at <= now:
        if row.state == COMPLETED:
            raise UploadNotFound("no such upload")
        raise UploadExpired(f"upload {row.id} expired; start a new upload")
    return row


def _leased(row: TusUploadRow, now: datetime) -> bool:
    return (
        row.lease_token is not None
        and row.lease_expires_at is not None
        and row.lease_expires_at > now
    )


def _take_lease(row: TusUploadRow, *, token: uuid.UUID, now: datetime) -> None:
    row.lease_token = token
    row.lease_expires_at = now + LEASE_DURATION


def _leased_row(session: Session, upload_id: str, token: uuid.UUID) -> TusUploadRow:
    row = repository.lock_upload(session, upload_id)
    if row is None or row.lease_token != token:
        # The lease ran out and another request took the upload over.
        raise UploadBusy(f"upload {upload_id} was taken over by another request")
    return row


def _renew_lease(upload_id: str, token: uuid.UUID) -> None:
    with session_scope() as session:
        row = _leased_row(session, upload_id, token)
        row.lease_expires_at = _now() + LEASE_DURATION


def _release_lease(upload_id: str, token: uuid.UUID) -> None:
    # Best effort on a failure path: an unreleased lease simply runs out.
    try:
        with session_scope() as session:
            row = repository.lock_upload(session, upload_id)
            if row is not None and row.lease_token == token:
                row.lease_token = None
                row.lease_expires_at = None
    except Exception:  # the original error matters more than this one
        log.warning("imaging_store.upload_lease_not_released", upload_id=upload_id)


def _now() -> datetime:
    return datetime.now(UTC)


def _resume_digests(claim: _Claim) -> ContentDigests | None:
    """Return digests to go on from at the claim's offset: fresh at 0, else its recorded state.

    None when the recorded state is missing or not of exactly the bytes up to
    the offset (a process that knows no state moved the offset on): completion
    then reads the object back.
    """
    if claim.offset == 0:
        return ContentDigests()
    if claim.digest_state is None:
        return None
    return ContentDigests.resume(claim.digest_state, size=claim.offset)


def create_upload(
    session: Session,
    *,
    caller: Caller,
    upload_length: str | None,
    defer_length: str | None,
    upload_metadata: str | None,
    settings: UploadSettings,
    now: datetime,
) -> UploadStatus:
    """Start a resumable upload: check its headers and record it (S3 sees nothing yet)."""
    row = _new_upload(
        session,
        caller=caller,
        length=parse_upload_length(
            upload_length, defer_length=defer_length, limit=settings.max_bytes
        ),
        upload_metadata=upload_metadata,
        settings=settings,
        now=now,
    )
    return _status(row)


@dataclass(frozen=True, slots=True)
class HeldUpload:
    """A new upload whose creating request holds its lease, to take the bytes it carries."""

    status: UploadStatus
    token: uuid.UUID
    claim: _Claim
    checksum: UploadChecksum | None


def create_upload_with_bytes(
    session: Session,
    *,
    caller: Caller,
    upload_length: str | None,
    defer_length: str | None,
    upload_metadata: str | None,
    upload_checksum: str | None,
    content_length: str | None,
    settings: UploadSettings,
    now: datetime,
) -> HeldUpload:
    """Start an upload whose creation carries its first bytes (tus creation-with-upload).

    Everything that would refuse those bytes is checked first, so such a
    creation records nothing. The upload is recorded already leased to this
    request: its bytes then need no transaction of their own to claim it.
    """
    length = parse_upload_length(upload_length, defer_length=defer_length, limit=settings.max_bytes)
    checksum = parse_upload_checksum(upload_checksum)
    if content_length and content_length.isdigit() and int(content_length) > length:
        raise UploadTooLarge(f"the body goes past Upload-Length {length}")
    token = uuid.uuid4()
    row = _new_upload(
        session,
        caller=caller,
        length=length,
        upload_metadata=upload_metadata,
        settings=settings,
        now=now,
        lease=token,
    )
    return HeldUpload(status=_status(row), token=token, claim=_Claim.of(row), checksum=checksum)


def _new_upload(
    session: Session,
    *,
    caller: Caller,
    length: int,
    upload_metadata: str | None,
    settings: UploadSettings,
    now: datetime,
    lease: uuid.UUID | None = None,
) -> TusUploadRow:
    caller.access.check("create", "Binary")
    metadata = parse_upload_metadata(upload_metadata)
    security_context = _security_context(session, metadata, caller=caller, settings=settings)
    row = TusUploadRow(
        id=uuid.uuid4().hex,
        owner_client_id=caller.owner,
        length=length,
        upload_offset=0,
        upload_metadata=upload_metadata.strip() if upload_metadata else None,
        security_context=security_context,
        state=RECEIVING,
        binary_id=str(uuid.uuid4()),
        multipart_upload_id=None,
        parts=[],
        tail_key=None,
        tail_size=0,
        expires_at=now + settings.expiry,
    )
    if lease is not None:
        _take_lease(row, token=lease, now=now)
    repository.add_upload(session, row)
    log.info(
        "imaging_store.upload_created",
        upload_id=row.id,
        length=length,
        client_id=caller.client_id,
    )
    return row


def describe_upload(
    *,
    storage: BinaryStorage,
    upload_id: str,
    caller: Caller,
    settings: UploadSettings,
    now: datetime,
) -> UploadStatus:
    """Tell where an upload stands; finish it first if its completion was interrupted."""
    with session_scope() as session:
        row = _visible(repository.lock_upload(session, upload_id), caller=caller, now=now)
        status = _status(row)
        token: uuid.UUID | None = None
        if row.state == ASSEMBLING and not _leased(row, now):
            token = uuid.uuid4()
            _take_lease(row, token=token, now=now)
    if token is None:
        return status
    try:
        return _assemble(
            storage=storage, upload_id=upload_id, token=token, caller=caller, settings=settings
        )
    except BaseException:
        _release_lease(upload_id, token)
        raise


def receive_chunk(
    *,
    storage: BinaryStorage,
    upload_id: str,
    caller: Caller,
    upload_offset: str | None,
    upload_checksum: str | None,
    content_length: str | None,
    chunks: Iterable[bytes],
    settings: UploadSettings,
    now: datetime,
) -> UploadStatus:
    """Append one PATCH body at the upload's offset; finish the upload when it is full."""
    offset = parse_upload_offset(upload_offset)
    checksum = parse_upload_checksum(upload_checksum)
    declared = int(content_length) if content_length and content_length.isdigit() else None
    token = uuid.uuid4()
    with session_scope() as session:
        row = _visible(repository.lock_upload(session, upload_id), caller=caller, now=now)
        if _leased(row, now):
            raise UploadBusy(f"upload {upload_id} is being written by another request")
        if row.upload_offset != offset:
            raise UploadOffsetMismatch(
                f"Upload-Offset is {offset} but the upload is at {row.upload_offset}"
            )
        if declared is not None and offset + declared > row.length:
            raise UploadTooLarge(f"the body goes past Upload-Length {row.length}")
        if row.state == COMPLETED:
            # The answer to a last PATCH was lost and the client sent it again.
            return _status(row)
        _take_lease(row, token=token, now=now)
        claim = _Claim.of(row)
    return _receive_leased(
        storage=storage,
        claim=claim,
        token=token,
        chunks=chunks,
        checksum=checksum,
        caller=caller,
        settings=settings,
    )


def receive_first_bytes(
    *,
    storage: BinaryStorage,
    held: HeldUpload,
    caller: Caller,
    chunks: Iterable[bytes],
    settings: UploadSettings,
) -> UploadStatus:
    """Take the bytes a creation carries, under the lease the creation recorded."""
    return _receive_leased(
        storage=storage,
        claim=held.claim,
        token=held.token,
        chunks=chunks,
        checksum=held.checksum,
        caller=caller,
        settings=settings,
    )


def _receive_leased(
    *,
    storage: BinaryStorage,
    claim: _Claim,
    token: uuid.UUID,
    chunks: Iterable[bytes],
    checksum: UploadChecksum | None,
    caller: Caller,
    settings: UploadSettings,
) -> UploadStatus:
    upload_id = claim.id
    try:
        assembling: _Claim | None = None
        digests: ContentDigests | None = None
        if claim.state == RECEIVING:
            staged = _stage_body(storage, claim, chunks, checksum, token=token)
            if (
                staged.offset == claim.length
                and staged.multipart_upload_id is None
                and staged.digests is not None
            ):
                # Put whole by this PATCH, every byte hashed: one transaction
                # records the offset and the Binary. Should it fail, the upload
                # stays at its old offset and a retry puts the same key again.
                content_type = _sniff_or_purge(storage, claim, staged.digests, caller, token=token)
                with session_scope() as session:
                    row = _leased_row(session, upload_id, token)
                    row.upload_offset = staged.offset
                    status = _finish(
                        session,
                        row,
                        content_type=content_type,
                        digests=staged.digests,
                        caller=caller,
                        settings=settings,
                    )
                if claim.tail_key is not None:
                    _remove_quietly(storage, claim.tail_key)
                return status
            with session_scope() as session:
                row = _leased_row(session, upload_id, token)
                row.multipart_upload_id = staged.multipart_upload_id
                row.parts = staged.parts
                row.tail_key = staged.tail_key
                row.tail_size = staged.tail_size
                row.upload_offset = staged.offset
                # Kept while assembling too: a retried completion takes it up.
                row.digest_state = None if staged.digests is None else staged.digests.state()
                # Each PATCH buys the upload another expiry period.
                row.expires_at = _now() + settings.expiry
                if staged.offset == row.length:
                    row.state = ASSEMBLING
                    # Completion goes on under the same lease, from this state.
                    assembling = _Claim.of(row)
                    digests = staged.digests
                else:
                    row.lease_token = None
                    row.lease_expires_at = None
                status = _status(row)
            if claim.tail_key is not None and claim.tail_key != staged.tail_key:
                _remove_quietly(storage, claim.tail_key)
            if status.offset < status.length:
                return status
        return _assemble(
            storage=storage,
            upload_id=upload_id,
            token=token,
            caller=caller,
            settings=settings,
            claim=assembling,
            digests=digests,
        )
    except BaseException:
        _release_lease(upload_id, token)
        raise


def _stage_body(
    storage: BinaryStorage,
    claim: _Claim,
    chunks: Iterable[bytes],
    checksum: UploadChecksum | None,
    *,
    token: uuid.UUID,
) -> _Staged:
    """Store a PATCH body as parts (and a new tail); nothing is recorded yet."""
    key = object_key(claim.binary_id)
    buffer = bytearray(storage.read_small(claim.tail_key)) if claim.tail_key else bytearray()
    parts = list(claim.parts)
    multipart_upload_id = claim.multipart_upload_id
    received = 0
    # Hashed as it streams, so that completion need not read the object back.
    digests = _resume_digests(claim)
    # From offset 0 the upload's SHA-256 and SHA-1 are also those of this body.
    body_hash = (
        hashlib.new(checksum.algorithm) if checksum is not None and claim.offset > 0 else None
    )
    renewed_at = time.monotonic()

    def flush_part(size: int, *, sha256: bytes | None = None) -> None:
        nonlocal multipart_upload_id
        if multipart_upload_id is None:
            multipart_upload_id = _open_multipart(storage, claim, token=token)
        # One copy of the part (a bytearray slice, then bytes, would be two);
        # the view is released before the buffer is cut.
        with memoryview(buffer) as view:
            data = bytes(view[:size])
        etag = storage.upload_part(
            key,
            multipart_upload_id=multipart_upload_id,
            part_number=len(parts) + 1,
            data=data,
            sha256=sha256,
        )
        parts.append({"number": len(parts) + 1, "etag": etag, "size": size})
        del buffer[:size]

    try:
        for chunk in chunks:
            received += len(chunk)
            if claim.offset + received > claim.length:
                raise UploadTooLarge(f"the body goes past Upload-Length {claim.length}")
            if digests is not None:
                digests.feed(chunk)
            if body_hash is not None:
                body_hash.update(chunk)
            buffer += chunk
            # Renewed before any part goes out: after a stall longer than the
            # lease, a retry may own the upload, and this PATCH must not
            # overwrite its parts (the renewal then refuses it).
            if time.monotonic() - renewed_at > LEASE_RENEW_SECONDS:
                _renew_lease(claim.id, token)
                renewed_at = time.monotonic()
            # PART_BYTES stay behind to join what follows: the PATCH then
            # ends with a whole part rather than a tail to stage and read back,
            # and a body of up to 10 MiB stays whole for a single PUT.
            if len(buffer) > 2 * PART_BYTES:
                flush_part(len(buffer) - PART_BYTES)
    except UploadInterrupted:
        # tus: keep what arrived, so the client resumes from there; a body
        # announced with a checksum cannot be verified in part, so it goes.
        if checksum is not None:
            raise
        log.info("imaging_store.upload_interrupted", upload_id=claim.id, received=received)
    if checksum is not None:
        if body_hash is not None:
            actual = body_hash.digest()
        else:
            assert digests is not None  # noqa: S101 - fresh at offset 0
            actual = digests.sha256 if checksum.algorithm == "sha256" else digests.sha1
        if actual != checksum.digest:
            raise ChecksumMismatch(
                f"the body does not match its Upload-Checksum {checksum.algorithm}"
            )
    if received == 0:
        return _Staged(
            multipart_upload_id, claim.parts, claim.tail_key, claim.tail_size, claim.offset, digests
        )
    offset = claim.offset + received
    if offset == claim.length:
        if multipart_upload_id is None:
            # Every byte is in hand and no part went out: one PUT is the object,
            # signed with its SHA-256 when this process saw every byte.
            whole = digests.sha256 if digests is not None else None
            storage.put(
                key,
                io.BytesIO(buffer),
                length=len(buffer),
                content_type=OPAQUE_CONTENT_TYPE,
                sha256=whole,
            )
        elif buffer:
            flush_part(len(buffer))
        return _Staged(multipart_upload_id, parts, None, 0, offset, digests)
    if len(buffer) >= PART_BYTES:
        flush_part(len(buffer))
    if not buffer:
        return _Staged(multipart_upload_id, parts, None, 0, offset, digests)
    # A fresh key per PATCH: the recorded tail stays intact until this one is committed.
    tail_key = f"{staging_prefix(claim.id)}tail-{uuid.uuid4().hex}"
    storage.put_bytes(tail_key, bytes(buffer))
    return _Staged(multipart_upload_id, parts, tail_key, len(buffer), offset, digests)


def _open_multipart(storage: BinaryStorage, claim: _Claim, *, token: uuid.UUID) -> str:
    """Open the upload's multipart upload and record it at once, before any part goes out.

    Recorded at once, not with the PATCH's other changes: if the PATCH fails
    later, the expiry sweep still knows the multipart upload to abort.
    """
    key = object_key(claim.binary_id)
    multipart_upload_id = storage.start_multipart(key, content_type=OPAQUE_CONTENT_TYPE)
    try:
        with session_scope() as session:
            _leased_row(session, claim.id, token).multipart_upload_id = multipart_upload_id
    except BaseException:
        # Unrecorded, nothing would ever abort it.
        try:
            storage.abort_multipart(key, multipart_upload_id=multipart_upload_id)
        except StorageUnavailable:
            log.warning("imaging_store.multipart_left_open", upload_id=claim.id)
        raise
    return multipart_upload_id


def _assemble(
    *,
    storage: BinaryStorage,
    upload_id: str,
    token: uuid.UUID,
    caller: Caller,
    settings: UploadSettings,
    claim: _Claim | None = None,
    digests: ContentDigests | None = None,
) -> UploadStatus:
    """Complete the multipart object, check it, and record it as a Binary (lease held).

    `claim` is the upload as the PATCH that filled it just recorded it, and
    `digests` those of all its bytes, as that PATCH took them up and went on.
    """
    if claim is None:
        with session_scope() as session:
            claim = _Claim.of(_leased_row(session, upload_id, token))
    if digests is None and claim.digest_state is not None:
        digests = ContentDigests.resume(claim.digest_state, size=claim.length)
    key = object_key(claim.binary_id)
    if claim.multipart_upload_id is None:
        # Stored whole by one PUT; only an interrupted completion needs to check.
        if digests is None and not storage.exists(key):
            log.error("imaging_store.upload_object_missing", upload_id=upload_id)
            raise StorageUnavailable("the upload's object is missing from object storage")
    else:
        numbered = [(int(part["number"]), str(part["etag"])) for part in claim.parts]
        # False when a previous attempt completed it and then failed later on.
        if not storage.complete_multipart(
            key, multipart_upload_id=claim.multipart_upload_id, parts=numbered
        ) and not storage.exists(key):
            log.error("imaging_store.upload_parts_missing", upload_id=upload_id)
            raise StorageUnavailable("the upload's parts are missing from object storage")
    if digests is None:
        digests = ContentDigests()
        for chunk in storage.open(key):
            digests.feed(chunk)
    content_type = _sniff_or_purge(storage, claim, digests, caller, token=token)
    with session_scope() as session:
        status = _finish(
            session,
            _leased_row(session, upload_id, token),
            content_type=content_type,
            digests=digests,
            caller=caller,
            settings=settings,
        )
    return status


def _sniff_or_purge(
    storage: BinaryStorage,
    claim: _Claim,
    digests: ContentDigests,
    caller: Caller,
    *,
    token: uuid.UUID,
) -> str:
    """Return the stored upload's sniffed type; refused content is purged with its upload."""
    upload_id = claim.id
    # Digests taken up from a recorded state have no head: it is read from the object.
    head = (
        digests.head
        if digests.head_known
        else storage.read_head(object_key(claim.binary_id), HEAD_BYTES)
    )
    try:
        return sniff_content_type(head, valid_text=digests.valid_text)
    except ContentTypeNotAllowed:
        # Refused content is purged at once, not left for the sweep; only under
        # the lease, or a PATCH that stalled past it would purge its retry's upload.
        with session_scope() as session:
            row = _leased_row(session, upload_id, token)
            storage.remove(object_key(row.binary_id))
            repository.delete_upload(session, upload_id)
        _remove_prefix_quietly(storage, staging_prefix(upload_id))
        log.warning("imaging_store.upload_refused", upload_id=upload_id, client_id=caller.client_id)
        raise


def _finish(
    session: Session,
    row: TusUploadRow,
    *,
    content_type: str,
    digests: ContentDigests,
    caller: Caller,
    settings: UploadSettings,
) -> UploadStatus:
    """Record a leased upload's stored object as its Binary (and Media) and mark it done."""
    binary_row = _record_binary(
        session,
        row=row,
        content_type=content_type,
        digests=digests,
        caller=caller,
        settings=settings,
    )
    # An upload naming its patient gets its Media at once (DESIGN.md "the Media").
    encounter = parse_upload_metadata(row.upload_metadata).get("encounter")
    media.record_media_for_upload(
        session,
        binary_row,
        caller,
        settings.base_url,
        enforce_referential_integrity=settings.enforce_referential_integrity,
        encounter_id=encounter.removeprefix("Encounter/") if encounter else None,
    )
    row.state = COMPLETED
    row.digest_state = None
    row.tail_key = None
    row.tail_size = 0
    row.lease_token = None
    row.lease_expires_at = None
    # A finished upload answers HEAD (with its Binary) this long, then goes.
    row.expires_at = _now() + settings.expiry
    log.info(
        "imaging_store.upload_completed",
        upload_id=row.id,
        binary_id=row.binary_id,
        content_type=content_type,
        size=digests.size,
        client_id=caller.client_id,
    )
    return _status(row)


def _record_binary(
    session: Session,
    *,
    row: TusUploadRow,
    content_type: str,
    digests: ContentDigests,
    caller: Caller,
    settings: UploadSettings,
) -> BinaryObjectRow:
    """Write the binary_object row and the data-less Binary, as POST /fhir/Binary does."""
    document: dict[str, Any] = {
        "resourceType": "Binary",
        "id": row.binary_id,
        "contentType": content_type,
    }
    if row.security_context is not None:
        document["securityContext"] = {"reference": row.security_context}
    binary_row = binary_repository.add_binary_object(
        session,
        BinaryObjectRow(
            id=row.binary_id,
            content_type=content_type,
            size=digests.size,
            sha256=digests.sha256,
            sha1=digests.sha1,
            object_key=object_key(row.binary_id),
            owner_client_id=row.owner_client_id,
            security_context=row.security_context,
        ),
    )
    fhir_service.run_interaction(
        session,
        EntryRequest(
            method="PUT",
            resource_type="Binary",
            resource_id=row.binary_id,
            resource=document,
            # Chosen at the upload's creation, never known to another writer.
            fresh_id=True,
        ),
        context=_request_context(caller),
        settings=WriteSettings(
            base_url=settings.base_url,
            enforce_referential_integrity=settings.enforce_referential_integrity,
        ),
    )
    return binary_row


def terminate_upload(
    session: Session, *, storage: BinaryStorage, upload_id: str, caller: Caller, now: datetime
) -> None:
    """Drop an upload and its stored parts (tus termination); a finished Binary stays."""
    row = repository.lock_upload(session, upload_id)
    if row is None or row.owner_client_id != caller.owner:
        raise UploadNotFound("no such upload")
    if _leased(row, now):
        raise UploadBusy(f"upload {upload_id} is being written by another request")
    if row.state != COMPLETED:
        _discard_objects(storage, row)
    repository.delete_upload(session, upload_id)
    log.info("imaging_store.upload_terminated", upload_id=upload_id, client_id=caller.client_id)


def _discard_objects(storage: BinaryStorage, row: TusUploadRow) -> None:
    key = object_key(row.binary_id)
    if row.multipart_upload_id is not None:
        storage.abort_multipart(key, multipart_upload_id=row.multipart_upload_id)
    # An object there (assembled, or stored whole by a PATCH that failed before
    # recording it) was never recorded as a Binary: nobody can reach it.
    storage.remove(key)
    storage.remove_prefix(staging_prefix(row.id))


def sweep_expired_uploads(
    session: Session, *, storage: BinaryStorage, now: datetime, limit: int = 500
) -> int:
    """Remove uploads past their expiry (parts, staged objects, rows); return how many."""
    swept = 0
    for row in repository.lock_expired_uploads(session, now=now, limit=limit):
        if row.state != COMPLETED:
            _discard_objects(storage, row)
        else:
            # A tail staged by a PATCH that then failed was never recorded; its
            # upload's prefix goes now (completion does not list it).
            _remove_prefix_quietly(storage, staging_prefix(row.id))
        repository.delete_upload(session, row.id)
        swept += 1
    if swept:
        log.info("imaging_store.uploads_swept", count=swept)
    return swept


def _remove_quietly(storage: BinaryStorage, key: str) -> None:
    # Leftovers under the upload's prefix go with it at completion or expiry.
    try:
        storage.remove(key)
    except StorageUnavailable:
        log.warning("imaging_store.staged_object_kept", key=key)


def _remove_prefix_quietly(storage: BinaryStorage, prefix: str) -> None:
    try:
        storage.remove_prefix(prefix)
    except StorageUnavailable:
        log.warning("imaging_store.staged_objects_kept", prefix=prefix)
