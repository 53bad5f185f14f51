"""Rules of the imaging store: receive, verify, sniff, store and serve Binary content.

Every Binary has two records: its bytes in object storage, and a Binary
resource without `data` (contentType, securityContext, meta) written through
`fhir_api.service`, so that read, vread, history, search and references work
like any other resource, plus a `binary_object` row saying where the bytes
are and what they hash to. The row and the resource are flushed before the
object is written, and the request's transaction commits only after the
object is stored: an outage of either store leaves no row without object. A
commit that fails after the object was written leaves an object without row
under `binaries/`; the orphan sweep (later) removes keys older than a grace
period that have no row.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import re
import struct
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from sqlalchemy.orm import Session

from fhir_api import service as fhir_service
from fhir_api.context import (
    UNRESTRICTED_ACCESS,
    AccessControl,
    AuditNotes,
    RequestContext,
    owner_of,
)
from fhir_api.errors import ResourceNotFound
from fhir_api.writes import EntryRequest, WriteSettings
from hub.errors import WahaError
from hub.settings import Settings
from imaging_store import repository
from imaging_store.errors import (
    BinaryNotFound,
    BinaryTooLarge,
    ContentDigestMismatch,
    InvalidBinary,
    InvalidContentDigest,
    StorageUnavailable,
)
from imaging_store.hash_states import (
    RESUMABLE,
    SHA256_STATE_BYTES,
    ResumableHash,
    RunningHash,
    new_hash,
)
from imaging_store.models import BinaryObjectRow
from imaging_store.sniffing import HEAD_BYTES, sniff_content_type
from imaging_store.storage import (
    BinaryStorage,
    ObjectMissing,
    StorageConfig,
    object_key,
    storage_for,
)

log = structlog.get_logger()

JSONObject = dict[str, Any]
# Spooled uploads stay in memory up to this size, then go to a temporary file,
# so concurrent 25 MB uploads do not each hold 25 MB of RAM.
SPOOL_MEMORY_BYTES = 1024 * 1024
# A saved ContentDigests: version, size, UTF-8 validity, the decoder's flag and
# the length of its pending bytes; then those bytes and the SHA-256 and SHA-1
# states. Not the head: content stays out of the database, but for the few
# bytes of an unfinished block or character that a running state holds.
_STATE_HEADER = struct.Struct("<BQ?QB")
_STATE_VERSION = 2
# RFC 9530 algorithms Waha verifies, by their registered names.
_DIGEST_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512"}
_DIGEST_MEMBER = re.compile(r"^\s*([a-z0-9_\-*.]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*$")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who uploads or reads, as the auth layer describes the request."""

    client_id: str
    author: str
    request_id: str
    access: AccessControl = UNRESTRICTED_ACCESS
    # Where the request's audit event learns which Binary and patients it touched.
    audit: AuditNotes | None = None
    # The unit a unit client uploads for (None for people).
    unit: str | None = None

    @property
    def owner(self) -> str:
        """Return who owns what this caller uploads (a unit's client, or the person)."""
        return owner_of(self.client_id, self.author, self.unit)

    def checked_context(self) -> RequestContext:
        """Return this caller with the Binary rule already applied: no row condition.

        Binary rows are private in the record store's own rule, so once
        `check_binary_access` has let the caller in, the store must not ask again.
        """
        return RequestContext(
            client_id=self.client_id, author=self.author, request_id=self.request_id
        )

    def request_context(self) -> RequestContext:
        """Return this caller as the record store's writes and reads see it."""
        return RequestContext(
            client_id=self.client_id,
            author=self.author,
            request_id=self.request_id,
            unit=self.unit,
            access=self.access,
        )


@dataclass(frozen=True, slots=True)
class StoredBinary:
    """What an upload produced."""

    id: str
    version_id: int
    last_updated: datetime
    content_type: str
    size: int
    resource: JSONObject
    # The metadata row, for the upload's Media (media.record_media_for_upload)
    # without reading back what this unit of work has just written.
    row: BinaryObjectRow = field(repr=False)


@dataclass(slots=True)
class BinaryDownload:
    """An open Binary: its metadata and an iterator over its bytes (or its JSON)."""

    id: str
    version_id: int
    last_updated: datetime
    content_type: str
    size: int
    chunks: Iterator[bytes]


def storage_config(settings: Settings) -> StorageConfig:
    """Return where the settings say the object store is."""
    return StorageConfig(
        endpoint=settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=settings.s3_secure,
        region=settings.s3_region,
        bucket=settings.s3_bucket,
    )


def binary_storage(settings: Settings) -> BinaryStorage:
    """Return the process's object-store client for these settings."""
    return storage_for(storage_config(settings))


def prepare_storage(settings: Settings) -> None:
    """Create the bucket at start; if the store is down, log it and retry on first use."""
    try:
        binary_storage(settings).ensure_bucket()
    except StorageUnavailable:
        log.warning("imaging_store.bucket_deferred", bucket=settings.s3_bucket)


def parse_content_digest(header: str | None) -> dict[str, bytes]:
    """Return the digests of an RFC 9530 `Content-Digest` header that Waha verifies."""
    if header is None:
        return {}
    wanted: dict[str, bytes] = {}
    for member in header.split(","):
        match = _DIGEST_MEMBER.match(member)
        if match is None:
            raise InvalidContentDigest("Content-Digest must be like sha-256=:<base64>:")
        algorithm, encoded = match.group(1).lower(), match.group(2)
        if algorithm not in _DIGEST_ALGORITHMS:
            continue
        try:
            wanted[algorithm] = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise InvalidContentDigest(f"Content-Digest {algorithm} is not base64") from None
    if not wanted:
        raise InvalidContentDigest("Content-Digest names no algorithm Waha verifies (sha-256)")
    return wanted


class MessageDigests:
    """Hash an HTTP body as it arrives and compare it with its Content-Digest.

    Given the ContentDigests fed the very same bytes (a raw upload, whose body
    is the content), its SHA-256 serves for `sha-256` instead of a second hash.
    """

    def __init__(self, wanted: dict[str, bytes], *, content: ContentDigests | None = None) -> None:
        self.wanted = wanted
        self._content = content
        self._hashes = {
            name: hashlib.new(_DIGEST_ALGORITHMS[name])
            for name in wanted
            if content is None or name != "sha-256"
        }

    def feed(self, chunk: bytes) -> None:
        """Hash one received chunk."""
        for digest in self._hashes.values():
            digest.update(chunk)

    def verify(self) -> None:
        """Raise ContentDigestMismatch unless every announced digest matches."""
        for name, expected in self.wanted.items():
            hashed = self._hashes.get(name)
            if hashed is not None:
                actual = hashed.digest()
            else:
                assert self._content is not None  # noqa: S101 - only sha-256 is lent
                actual = self._content.sha256
            if actual != expected:
                raise ContentDigestMismatch(f"the content does not match its Content-Digest {name}")


class ContentDigests:
    """SHA-256, SHA-1, leading bytes and UTF-8 validity of content read as a stream.

    Shared by uploads in one request (BinaryContent) and objects assembled
    across requests and read back from the store (tus completion).
    """

    def __init__(self) -> None:
        self.size = 0
        self._sha256: RunningHash = new_hash("sha256")
        self._sha1: RunningHash = new_hash("sha1")
        self._head = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._valid_text = True
        # False once taken up from a saved state, which leaves the head out.
        self.head_known = True

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk."""
        self.size += len(chunk)
        self._sha256.update(chunk)
        self._sha1.update(chunk)
        if self.head_known and len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        if self._valid_text:
            try:
                self._decoder.decode(chunk)
            except UnicodeDecodeError:
                self._valid_text = False
            else:
                self._valid_text = b"\x00" not in chunk

    def copy(self) -> ContentDigests:
        """Return an independent copy, to go on from while this state stays as it is."""
        twin = ContentDigests()
        twin.size = self.size
        twin._sha256 = self._sha256.copy()
        twin._sha1 = self._sha1.copy()
        twin._head = bytearray(self._head)
        twin._decoder.setstate(self._decoder.getstate())
        twin._valid_text = self._valid_text
        twin.head_known = self.head_known
        return twin

    def state(self) -> bytes | None:
        """Return the whole running state as bytes, or None where hashes cannot be resumed."""
        if not isinstance(self._sha256, ResumableHash) or not isinstance(self._sha1, ResumableHash):
            return None
        pending, flag = self._decoder.getstate()
        header = _STATE_HEADER.pack(_STATE_VERSION, self.size, self._valid_text, flag, len(pending))
        return b"".join((header, pending, self._sha256.state, self._sha1.state))

    @classmethod
    def resume(cls, state: bytes, *, size: int) -> ContentDigests | None:
        """Take up a state of `size` bytes from `state()`, maybe another process's.

        None when it cannot be: unreadable here, or not of `size` bytes. The
        head is not in the state: `head_known` is False from then on.
        """
        if not RESUMABLE:
            return None
        try:
            version, saved_size, valid_text, flag, pending_bytes = _STATE_HEADER.unpack_from(state)
            if version != _STATE_VERSION or saved_size != size:
                return None
            start = _STATE_HEADER.size
            pending = state[start : start + pending_bytes]
            start += pending_bytes
            sha256_state = state[start : start + SHA256_STATE_BYTES]
            sha256 = ResumableHash("sha256", state=sha256_state, size=size)
            sha1 = ResumableHash("sha1", state=state[start + SHA256_STATE_BYTES :], size=size)
        except (struct.error, ValueError):
            return None
        digests = cls()
        digests.size = size
        digests._valid_text = valid_text
        digests._decoder.setstate((pending, flag))
        digests.head_known = False
        digests._sha256 = sha256
        digests._sha1 = sha1
        return digests

    @property
    def head(self) -> bytes:
        """Return the leading bytes the type sniffers look at (empty unless `head_known`)."""
        return bytes(self._head)

    @property
    def valid_text(self) -> bool:
        """Tell whether the whole content is UTF-8 without NUL."""
        if not self._valid_text:
            return False
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        return True

    @property
    def sha256(self) -> bytes:
        """Return the SHA-256 of the content."""
        return self._sha256.digest()

    @property
    def sha1(self) -> bytes:
        """Return the SHA-1 of the content (R4 Attachment.hash)."""
        return self._sha1.digest()


class BinaryContent(ContentDigests):
    """The bytes of one Binary, spooled, hashed, size-checked and text-checked as they arrive."""

    def __init__(self, *, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.file: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(
            max_size=SPOOL_MEMORY_BYTES
        )

    def feed(self, chunk: bytes) -> None:
        """Take one chunk; refuse the whole content as soon as it is over the limit."""
        if self.size + len(chunk) > self.limit:
            raise BinaryTooLarge(f"the content is over the {self.limit}-byte limit")
        self.file.write(chunk)
        super().feed(chunk)

    def store(self, storage: BinaryStorage, key: str, content_type: str) -> None:
        """Put the spooled bytes at `key`, signed with the SHA-256 already computed."""
        self.file.seek(0)
        storage.put(key, self.file, length=self.size, content_type=content_type, sha256=self.sha256)

    def close(self) -> None:
        """Free the spool."""
        self.file.close()


def binary_from_json(document: Any, *, limit: int) -> tuple[JSONObject, BinaryContent]:
    """Split a FHIR JSON Binary into its resource (without data) and its decoded bytes."""
    if not isinstance(document, dict) or document.get("resourceType") != "Binary":
        raise InvalidBinary("POST /fhir/Binary as FHIR JSON takes a Binary resource")
    data = document.get("data")
    if not isinstance(data, str) or not data:
        raise InvalidBinary("Binary.data must carry the content as base64")
    # 4 base64 characters make 3 bytes: refuse before decoding what is too big.
    if len(data) // 4 * 3 > limit + 2:
        raise BinaryTooLarge(f"the content is over the {limit}-byte limit")
    try:
        decoded = base64.b64decode(data, validate=True)
    except binascii.Error:
        raise InvalidBinary("Binary.data is not valid base64") from None
    content = BinaryContent(limit=limit)
    try:
        content.feed(decoded)
    except BinaryTooLarge:
        content.close()
        raise
    # Everything but the bytes goes to the record store, whose validator
    # refuses unknown elements with their path; contentType is re-sniffed.
    resource = {key: value for key, value in document.items() if key != "data"}
    return resource, content


def record_upload(
    session: Session,
    *,
    storage: BinaryStorage,
    content: BinaryContent,
    caller: Caller,
    base_url: str,
    enforce_referential_integrity: bool,
    security_context: str | None = None,
    resource: JSONObject | None = None,
) -> StoredBinary:
    """Store one uploaded Binary: sniff its type, write its records, then its object."""
    caller.access.check("create", "Binary")
    content_type = sniff_content_type(content.head, valid_text=content.valid_text)
    binary_id = str(uuid.uuid4())
    document: JSONObject = {
        key: value for key, value in (resource or {}).items() if key not in ("id", "data")
    }
    document.update(resourceType="Binary", id=binary_id, contentType=content_type)
    if security_context is not None and "securityContext" not in document:
        document["securityContext"] = {"reference": security_context}
    context_reference = (document.get("securityContext") or {}).get("reference")
    row = repository.add_binary_object(
        session,
        BinaryObjectRow(
            id=binary_id,
            content_type=content_type,
            size=content.size,
            sha256=content.sha256,
            sha1=content.sha1,
            object_key=object_key(binary_id),
            # Access hook: the owner decides who may read until a Media or
            # DocumentReference in a patient's compartment references it.
            owner_client_id=caller.owner,
            security_context=context_reference if isinstance(context_reference, str) else None,
        ),
    )
    result = fhir_service.run_interaction(
        session,
        EntryRequest(
            method="PUT",
            resource_type="Binary",
            resource_id=binary_id,
            resource=document,
            fresh_id=True,
        ),
        # The caller's own rights: a securityContext naming a record it may
        # not see is refused exactly like one naming nothing.
        context=caller.request_context(),
        settings=WriteSettings(
            base_url=base_url, enforce_referential_integrity=enforce_referential_integrity
        ),
    )
    # As the write engine stored it (this server's absolute URLs made local).
    stored_context = ((result.resource or {}).get("securityContext") or {}).get("reference")
    row.security_context = stored_context if isinstance(stored_context, str) else None
    content.store(storage, row.object_key, content_type)
    assert result.version_id is not None and result.last_updated is not None  # noqa: S101
    log.info(
        "imaging_store.binary_stored",
        binary_id=binary_id,
        content_type=content_type,
        size=content.size,
        client_id=caller.client_id,
    )
    return StoredBinary(
        id=binary_id,
        version_id=result.version_id,
        last_updated=result.last_updated,
        content_type=content_type,
        size=content.size,
        resource=result.resource or document,
        row=row,
    )


def current_binary(
    session: Session, *, binary_id: str, caller: Caller, base_url: str
) -> tuple[JSONObject, int, datetime, BinaryObjectRow]:
    """Return a readable Binary: resource, version, time and row (404/410, access rules)."""
    # Access first: whether another caller's Binary exists, or was deleted,
    # is not for this caller to learn (404 either way).
    row = repository.get_binary_object(session, binary_id)
    if row is None:
        # Purged, or never stored: the resource answers, as this caller may see
        # it (410 for an administrator, 404 for everyone else).
        try:
            fhir_service.run_interaction(
                session,
                EntryRequest(method="GET", resource_type="Binary", resource_id=binary_id),
                context=caller.request_context(),
                settings=WriteSettings(base_url=base_url),
            )
        except ResourceNotFound:
            pass  # answered below exactly as another caller's Binary is
        raise BinaryNotFound(f"Binary/{binary_id} is not known")
    check_binary_access(
        session,
        row,
        access=caller.access,
        client_id=caller.client_id,
        owner=caller.owner,
        base_url=base_url,
        audit=caller.audit,
    )
    # The Binary resource decides existence (404 absent, 410 deleted), so a
    # deletion through any FHIR path hides the bytes too.
    result = fhir_service.run_interaction(
        session,
        EntryRequest(method="GET", resource_type="Binary", resource_id=binary_id),
        context=caller.checked_context(),
        settings=WriteSettings(base_url=base_url),
    )
    if row.deleted_at is not None or result.resource is None:
        raise BinaryNotFound(f"Binary/{binary_id} has no stored content")
    assert result.version_id is not None and result.last_updated is not None  # noqa: S101
    return result.resource, result.version_id, result.last_updated, row


def check_binary_access(
    session: Session,
    row: BinaryObjectRow,
    *,
    access: AccessControl,
    client_id: str,
    owner: str,
    base_url: str,
    audit: AuditNotes | None = None,
) -> None:
    """Raise 404 unless the caller may see this Binary (DESIGN.md "Access rules").

    A Binary belongs to its uploader (`owner_of`); once it names a patient or an
    encounter (X-Security-Context, Binary.securityContext), or a Media or
    DocumentReference about a patient cites it, it follows that record:
    whoever may read the Patient or Encounter may read the Binary. `audit`,
    when given, learns the Binary and its patients once access is granted.
    """
    access.check("read", "Binary")
    linked: list[str] | None = None
    if not (access.unrestricted or row.owner_client_id == owner):
        linked = repository.list_linked_patient_ids(session, row.id)
        targets = [row.security_context or "", *(f"Patient/{p}" for p in linked)]
        if not any(
            _may_read_target(session, target, access=access, client_id=client_id, base_url=base_url)
            for target in targets
        ):
            raise BinaryNotFound(f"Binary/{row.id} is not known")
    if audit is not None:
        if linked is None:
            linked = repository.list_linked_patient_ids(session, row.id)
        # A patient's access report must list who saw their photos too.
        context_type, _, context_id = (row.security_context or "").partition("/")
        patients = [context_id] if context_type == "Patient" and context_id else []
        audit.touched("Binary", row.id, [*patients, *linked])


def _may_read_target(
    session: Session, target: str, *, access: AccessControl, client_id: str, base_url: str
) -> bool:
    resource_type, _, resource_id = target.partition("/")
    return (
        resource_type in ("Patient", "Encounter")
        and bool(resource_id)
        and _may_read(
            session,
            resource_type,
            resource_id,
            access=access,
            client_id=client_id,
            base_url=base_url,
        )
    )


def _may_read(
    session: Session,
    resource_type: str,
    resource_id: str,
    *,
    access: AccessControl,
    client_id: str,
    base_url: str,
) -> bool:
    try:
        fhir_service.run_interaction(
            session,
            EntryRequest(method="GET", resource_type=resource_type, resource_id=resource_id),
            context=RequestContext(
                client_id=client_id, author=client_id, request_id="-", access=access
            ),
            settings=WriteSettings(base_url=base_url),
        )
    except WahaError:
        return False
    return True


def _open_object(storage: BinaryStorage, row: BinaryObjectRow) -> Iterator[bytes]:
    try:
        return storage.open(row.object_key)
    except ObjectMissing:
        # The row outlived its object (a dev S3 restarted, a purge raced a
        # read): nothing to serve; the log says which, for an operator.
        log.error("imaging_store.object_missing", binary_id=row.id)
        raise BinaryNotFound(f"Binary/{row.id} has no stored content") from None


def binary_at(
    session: Session, *, binary_id: str, caller: Caller, base_url: str, version: str | None
) -> tuple[JSONObject, int, datetime, BinaryObjectRow]:
    """Return a readable Binary as `current_binary` does, or one version of it.

    Stored bytes never change, so every version that is not a deletion names
    the same content; only its metadata and ETag are its own.
    """
    resource, version_id, last_updated, row = current_binary(
        session, binary_id=binary_id, caller=caller, base_url=base_url
    )
    if version is None or version == str(version_id):
        return resource, version_id, last_updated, row
    try:
        # The caller's right to this Binary is checked above.
        result = fhir_service.run_interaction(
            session,
            EntryRequest(
                method="GET", resource_type="Binary", resource_id=binary_id, version_id=version
            ),
            context=caller.checked_context(),
            settings=WriteSettings(base_url=base_url),
        )
    except ResourceNotFound:
        raise BinaryNotFound(f"Binary/{binary_id} has no version {version[:20]}") from None
    assert result.resource is not None and result.version_id is not None  # noqa: S101
    assert result.last_updated is not None  # noqa: S101
    return result.resource, result.version_id, result.last_updated, row


def open_binary(
    session: Session,
    *,
    storage: BinaryStorage,
    binary_id: str,
    caller: Caller,
    base_url: str,
    version: str | None = None,
) -> BinaryDownload:
    """Open a Binary's bytes for streaming, as stored (of `version`, when named)."""
    _, version_id, last_updated, row = binary_at(
        session, binary_id=binary_id, caller=caller, base_url=base_url, version=version
    )
    return BinaryDownload(
        id=row.id,
        version_id=version_id,
        last_updated=last_updated,
        content_type=row.content_type,
        size=row.size,
        chunks=_open_object(storage, row),
    )


def open_binary_resource(
    session: Session,
    *,
    storage: BinaryStorage,
    binary_id: str,
    caller: Caller,
    base_url: str,
    version: str | None = None,
) -> BinaryDownload:
    """Open a Binary as FHIR JSON, its `data` base64-encoded while streaming."""
    resource, version_id, last_updated, row = binary_at(
        session, binary_id=binary_id, caller=caller, base_url=base_url, version=version
    )
    chunks = _open_object(storage, row)
    return BinaryDownload(
        id=row.id,
        version_id=version_id,
        last_updated=last_updated,
        content_type="application/fhir+json",
        size=row.size,
        chunks=_json_with_data(resource, chunks),
    )


def _json_with_data(resource: JSONObject, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Yield `resource` as JSON with `data` appended, base64-encoding the bytes piecewise."""
    # Base64 of a multiple of 3 bytes has no padding, so pieces concatenate
    # into the encoding of the whole; the object never sits whole in memory.
    without_data = {key: value for key, value in resource.items() if key != "data"}
    opening = orjson.dumps(without_data)
    yield opening[:-1] + b',"data":"'
    pending = b""
    for chunk in chunks:
        pending += chunk
        cut = len(pending) - len(pending) % 3
        if cut:
            yield base64.b64encode(pending[:cut])
            pending = pending[cut:]
    yield base64.b64encode(pending) + b'"}'


def delete_binary(
    session: Session, *, binary_id: str, caller: Caller, base_url: str
) -> tuple[int | None, datetime | None]:
    """Delete a Binary: the resource gets a deleted version, the row a deletion time.

    The object stays until the retention purge removes it. Only who may read
    the Binary may delete it, and only in a role that may delete at all.
    """
    caller.access.check("delete", "Binary")
    row = repository.get_binary_object(session, binary_id)
    # No row (purged, or never stored): the store's own rule decides, so another
    # caller learns nothing from the answer.
    context = caller.request_context() if row is None else caller.checked_context()
    if row is not None:
        check_binary_access(
            session,
            row,
            access=caller.access,
            client_id=caller.client_id,
            owner=caller.owner,
            base_url=base_url,
        )
    result = fhir_service.run_interaction(
        session,
        EntryRequest(method="DELETE", resource_type="Binary", resource_id=binary_id),
        context=context,
        settings=WriteSettings(base_url=base_url),
    )
    repository.delete_binary_object(session, binary_id, at=datetime.now(UTC))
    return result.version_id, result.last_updated
