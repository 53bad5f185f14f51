"""Rules of the derivatives: make previews, judge photos and describe DICOM studies, once.

Made by the worker from the outbox event of a created Binary. Derived JPEGs
go to object storage under `derivatives/<binary id>/`, their state to
`binary_derivative`. Every step checks the state it would produce first, and
rows are upserts, so a redelivered event changes nothing. Undecodable content
is recorded as failed (a permanent verdict, not a retry loop); an object
store outage raises StorageUnavailable so that the outbox retries later.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import structlog
from sqlalchemy.orm import Session

from fhir_api import service as fhir_service
from fhir_api.context import SYSTEM_CONTEXT, RequestContext
from fhir_api.writes import EntryRequest, EntryResult, WriteSettings
from hub.errors import WahaError
from imaging_store import repository as binary_repository
from imaging_store import service as binary_service
from imaging_store.derivatives import dicom, images, repository
from imaging_store.derivatives.errors import (
    PreviewFailed,
    PreviewNotAvailable,
    StudyOfAnotherPatient,
)
from imaging_store.derivatives.models import (
    FAILED,
    IMAGING_STUDY,
    NOT_APPLICABLE,
    PENDING,
    PREVIEW,
    QUALITY_CHECK,
    READY,
    THUMBNAIL,
)
from imaging_store.models import BinaryObjectRow
from imaging_store.sniffing import DICOM, HEIC, JPEG, PNG, WEBP
from imaging_store.storage import BinaryStorage, ObjectMissing

log = structlog.get_logger()

JSONObject = dict[str, Any]
PHOTO_TYPES = (JPEG, PNG, WEBP, HEIC)
PREVIEW_KINDS = (THUMBNAIL, PREVIEW)
QUALITY_EXTENSION_URL = "https://waha.health/fhir/StructureDefinition/image-quality"
DERIVATIVE_PREFIX = "derivatives/"
# Sources are spooled to a temporary file above this size: decoders need to
# seek, and several workers each holding a 20 MB photo in RAM adds up.
SPOOL_MEMORY_BYTES = 1024 * 1024
# Beyond this a source is not downloaded at all (tus allows 2 GB uploads);
# photos of the units are 1-20 MB and DICOM headers need far less.
MAX_SOURCE_BYTES = 256 * 1024 * 1024
# pydicom decodes pixels only through numpy, which Waha does not ship: DICOM
# images get a study, not a preview, until a decoder is added.
NO_PIXEL_DECODER = "no-pixel-decoder"
NO_PIXEL_DATA = "no-pixel-data"
# Conflicts of a concurrent writer to the same study: worth retrying.
_TRANSIENT_STATUSES = (409, 412)


@dataclass(slots=True)
class DerivativeDownload:
    """A ready derivative: its size and an iterator over its JPEG bytes."""

    binary_id: str
    kind: str
    size: int
    chunks: Iterator[bytes]


def derivative_key(binary_id: str, kind: str) -> str:
    """Return the object key of a derived JPEG: the Binary's id only, never patient data."""
    return f"{DERIVATIVE_PREFIX}{binary_id}/{kind}.jpg"


def quality_extension(code: str) -> JSONObject:
    """Return the image-quality extension that goes on the Media of a photo."""
    return {"url": QUALITY_EXTENSION_URL, "valueCode": code}


def quality_for_binary(session: Session, binary_id: str) -> str | None:
    """Return the quality code of a photo (ok, too-dark, blurred, too-small), None if unknown."""
    row = repository.get_derivative(session, binary_id, QUALITY_CHECK)
    if row is None or row.status != READY:
        return None
    return row.quality_code


def make_derivatives(
    session: Session, *, storage: BinaryStorage, binary_id: str, write_settings: WriteSettings
) -> str | None:
    """Make what a newly stored Binary yields: previews and quality, or an ImagingStudy.

    Return the Binary's content type (None when it has no row), which tells
    the caller which follow-up steps can apply.
    """
    binary = binary_repository.get_binary_object(session, binary_id)
    if binary is None or binary.deleted_at is not None:
        log.info("imaging_store.derivatives_skipped", binary_id=binary_id, reason="no-binary")
        return binary.content_type if binary is not None else None
    if binary.content_type in PHOTO_TYPES:
        _make_photo_derivatives(session, storage=storage, binary=binary)
    elif binary.content_type == DICOM:
        _make_dicom_derivatives(session, storage=storage, binary=binary, settings=write_settings)
    return binary.content_type


def _make_photo_derivatives(
    session: Session, *, storage: BinaryStorage, binary: BinaryObjectRow
) -> None:
    # The preview row is written last, so its presence means all is done.
    done = repository.get_derivative(session, binary.id, PREVIEW)
    if done is not None and done.status != PENDING:
        return
    try:
        with _spooled_source(storage, binary) as source:
            rendition = images.render_photo(source)
    except (images.ImageUnreadable, _SourceUnavailable) as error:
        _record_failure(session, binary.id, (THUMBNAIL, PREVIEW, QUALITY_CHECK), error.reason)
        return
    repository.put_derivative(
        session, binary.id, QUALITY_CHECK, status=READY, quality_code=rendition.quality_code
    )
    for kind, encoded in ((THUMBNAIL, rendition.thumbnail), (PREVIEW, rendition.preview)):
        key = derivative_key(binary.id, kind)
        storage.put(
            key, io.BytesIO(encoded.content), length=len(encoded.content), content_type=JPEG
        )
        repository.put_derivative(
            session,
            binary.id,
            kind,
            status=READY,
            object_key=key,
            width=encoded.width,
            height=encoded.height,
            size=len(encoded.content),
        )
    log.info(
        "imaging_store.previews_made",
        binary_id=binary.id,
        quality_code=rendition.quality_code,
    )


def _make_dicom_derivatives(
    session: Session, *, storage: BinaryStorage, binary: BinaryObjectRow, settings: WriteSettings
) -> None:
    study_row = repository.lock_derivative(session, binary.id, IMAGING_STUDY)
    if study_row is None:
        try:
            with _spooled_source(storage, binary) as source:
                summary = dicom.summarize_dicom(source, binary_id=binary.id)
        except (dicom.DicomUnreadable, _SourceUnavailable) as error:
            _record_failure(session, binary.id, (THUMBNAIL, PREVIEW, IMAGING_STUDY), error.reason)
            return
        reason = NO_PIXEL_DECODER if summary.has_pixel_data else NO_PIXEL_DATA
        repository.put_derivatives(
            session, binary.id, PREVIEW_KINDS, status=NOT_APPLICABLE, error=reason
        )
        repository.put_derivative(
            session, binary.id, IMAGING_STUDY, status=PENDING, imaging_study=summary.imaging_study
        )
        study_row = repository.lock_derivative(session, binary.id, IMAGING_STUDY)
    if study_row is None or study_row.status != PENDING or study_row.imaging_study is None:
        return
    patient_reference = _patient_of(session, binary.security_context, settings)
    if patient_reference is None:
        # Kept until the lead's Media linking names the patient (create_imaging_study_for).
        log.info("imaging_store.study_awaits_patient", binary_id=binary.id)
        return
    _write_imaging_study(
        session,
        binary_id=binary.id,
        imaging_study=study_row.imaging_study,
        patient_reference=patient_reference,
        settings=settings,
    )


def create_imaging_study_for(
    session: Session, *, binary_id: str, patient_reference: str, write_settings: WriteSettings
) -> str | None:
    """Write the ImagingStudy of a DICOM Binary for its patient; return its id (None if none)."""
    row = repository.lock_derivative(session, binary_id, IMAGING_STUDY)
    if row is None or row.imaging_study is None:
        return None
    if row.status == READY:
        return row.imaging_study_id
    return _write_imaging_study(
        session,
        binary_id=binary_id,
        imaging_study=row.imaging_study,
        patient_reference=patient_reference,
        settings=write_settings,
    )


def _write_imaging_study(
    session: Session,
    *,
    binary_id: str,
    imaging_study: JSONObject,
    patient_reference: str,
    settings: WriteSettings,
) -> str | None:
    document = {**imaging_study, "subject": {"reference": patient_reference}}
    study_uid = str(imaging_study["identifier"][0]["value"]).removeprefix("urn:oid:")
    try:
        # A savepoint: a refused write must not abort the worker's transaction.
        with session.begin_nested():
            result = _create_or_extend_study(
                session, document, study_uid=study_uid, settings=settings
            )
    except WahaError as error:
        if error.status in _TRANSIENT_STATUSES:
            raise
        repository.put_derivative(
            session,
            binary_id,
            IMAGING_STUDY,
            status=FAILED,
            error=error.slug,
            imaging_study=imaging_study,
        )
        log.warning("imaging_store.study_refused", binary_id=binary_id, error=error.slug)
        return None
    repository.put_derivative(
        session,
        binary_id,
        IMAGING_STUDY,
        status=READY,
        imaging_study=imaging_study,
        imaging_study_id=result.resource_id,
    )
    log.info("imaging_store.study_recorded", binary_id=binary_id, study_id=result.resource_id)
    return result.resource_id


def _create_or_extend_study(
    session: Session, document: JSONObject, *, study_uid: str, settings: WriteSettings
) -> EntryResult:
    # Conditional create on the Study Instance UID: the files of one study
    # (one per instance) and reruns all land in the same ImagingStudy.
    result = fhir_service.run_interaction(
        session,
        EntryRequest(
            method="POST",
            resource_type="ImagingStudy",
            resource=document,
            if_none_exist=dicom.study_identifier_query(study_uid),
        ),
        context=SYSTEM_CONTEXT,
        settings=settings,
    )
    if result.created or result.resource is None:
        return result
    if result.resource.get("subject") != document["subject"]:
        raise StudyOfAnotherPatient(f"ImagingStudy/{result.resource_id} names another subject")
    merged = dicom.merge_instance(result.resource, document)
    if merged is None:
        return result
    return fhir_service.run_interaction(
        session,
        EntryRequest(
            method="PUT",
            resource_type="ImagingStudy",
            resource_id=result.resource_id,
            resource=merged,
            if_match=f'W/"{result.version_id}"',
        ),
        context=SYSTEM_CONTEXT,
        settings=settings,
    )


def _read_resource(
    session: Session, resource_type: str, resource_id: str, settings: WriteSettings
) -> JSONObject | None:
    try:
        result = fhir_service.run_interaction(
            session,
            EntryRequest(method="GET", resource_type=resource_type, resource_id=resource_id),
            context=SYSTEM_CONTEXT,
            settings=settings,
        )
    except WahaError:
        return None
    return result.resource


def _patient_of(
    session: Session, security_context: str | None, settings: WriteSettings
) -> str | None:
    """Return `Patient/<id>` from a Binary's securityContext (a Patient or an Encounter)."""
    resource_type, _, resource_id = (security_context or "").partition("/")
    if not resource_id or resource_type not in ("Patient", "Encounter"):
        return None
    resource = _read_resource(session, resource_type, resource_id, settings)
    if resource is None:
        return None
    if resource_type == "Patient":
        return f"Patient/{resource_id}"
    subject = (resource.get("subject") or {}).get("reference")
    if isinstance(subject, str) and subject.startswith("Patient/"):
        return subject
    return None


class _SourceUnavailable(Exception):
    """The source object cannot be derived from (missing, or over the size limit)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextmanager
def _spooled_source(storage: BinaryStorage, binary: BinaryObjectRow) -> Iterator[IO[bytes]]:
    if binary.size > MAX_SOURCE_BYTES:
        raise _SourceUnavailable("source-too-large")
    try:
        chunks = storage.open(binary.object_key)
    except ObjectMissing:
        log.error("imaging_store.object_missing", binary_id=binary.id)
        raise _SourceUnavailable("object-missing") from None
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        yield spool


def _record_failure(session: Session, binary_id: str, kinds: tuple[str, ...], reason: str) -> None:
    repository.put_derivatives(session, binary_id, kinds, status=FAILED, error=reason)
    log.warning("imaging_store.derivatives_failed", binary_id=binary_id, reason=reason)


def get_visible_binary(
    session: Session, *, binary_id: str, context: RequestContext, base_url: str
) -> BinaryObjectRow:
    """Return the stored Binary's row; 404/410 and access as for GET /fhir/Binary/<id>."""
    caller = binary_service.Caller(
        client_id=context.client_id,
        author=context.author,
        request_id=context.request_id,
        access=context.access,
        audit=context.audit,
        unit=context.unit,
    )
    *_, row = binary_service.current_binary(
        session, binary_id=binary_id, caller=caller, base_url=base_url
    )
    return row


def open_derivative(
    session: Session, *, storage: BinaryStorage, binary: BinaryObjectRow, kind: str
) -> DerivativeDownload | None:
    """Open a ready thumbnail or preview; None while it is being made."""
    if binary.content_type not in (*PHOTO_TYPES, DICOM):
        raise PreviewNotAvailable(f"Binary/{binary.id} is not an image")
    row = repository.get_derivative(session, binary.id, kind)
    if row is None or row.status == PENDING:
        return None
    if row.status == NOT_APPLICABLE:
        raise PreviewNotAvailable(f"Binary/{binary.id} has no {kind} ({row.error})")
    if row.status == FAILED or row.object_key is None or row.size is None:
        raise PreviewFailed(f"Binary/{binary.id} could not be made into a {kind} ({row.error})")
    try:
        chunks = storage.open(row.object_key)
    except ObjectMissing:
        log.error("imaging_store.derivative_missing", binary_id=binary.id, kind=kind)
        raise PreviewNotAvailable(f"Binary/{binary.id} has no stored {kind}") from None
    return DerivativeDownload(binary_id=binary.id, kind=kind, size=row.size, chunks=chunks)
