"""Media and DocumentReference linking: the resource that says what a stored Binary is.

A unit uploads the bytes first, then sends the Media (a DocumentReference for
a PDF) with `content.url` = `Binary/<id>` in its bundle (DESIGN.md "Imaging
contract"). A preparer registered with the write engine checks, inside the
bundle's transaction, that the Binary exists and is the caller's to cite,
fills `size`, `hash` (SHA-1, as R4 defines) and `contentType` from the stored
object, refuses values that disagree, and records a `binary_link` row, from
which on the Binary follows the patient's record. It also adds the photo's
quality verdict and writes a DICOM file's ImagingStudy once the patient is
known; both may also arrive later, from the derivatives handler.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.orm import Session

from fhir_api import service as fhir_service
from fhir_api.context import SYSTEM_CONTEXT, RequestContext
from fhir_api.errors import DanglingReference, InvalidResource
from fhir_api.writes import EntryRequest, WriteSettings, format_instant
from hub.errors import Issue, WahaError
from imaging_store import repository
from imaging_store import service as binary_service
from imaging_store.derivatives import service as derivatives_service
from imaging_store.errors import BinaryNotFound
from imaging_store.models import BinaryObjectRow
from imaging_store.sniffing import DICOM

log = structlog.get_logger()

JSONObject = dict[str, Any]
# The resource types whose attachments may cite a stored Binary.
LINKED_TYPES = ("Media", "DocumentReference")
# `Binary/<id>`, optionally of a version (a Binary's bytes never change).
_BINARY_PATH = re.compile(r"^Binary/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_PATIENT_PATH = re.compile(r"^Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


@dataclass(frozen=True, slots=True)
class CitedBinary:
    """One attachment of a resource that cites a stored Binary, and where it sits."""

    binary_id: str
    attachment: JSONObject
    path: str


@dataclass(frozen=True, slots=True)
class AttachmentLinker:
    """The write-engine preparer of Media and DocumentReference (see `linker_for`).

    A frozen dataclass, so that two apps built with the same settings register
    one preparer, not two (`register_preparer` compares by equality).
    """

    base_url: str
    enforce_referential_integrity: bool = True

    def __call__(self, session: Session, resource: JSONObject, context: RequestContext) -> None:
        """Check and fill the resource's Binary attachments, and record its links."""
        link_attachments(
            session,
            resource,
            context=context,
            write_settings=WriteSettings(
                base_url=self.base_url,
                enforce_referential_integrity=self.enforce_referential_integrity,
            ),
        )


def linker_for(base_url: str, *, enforce_referential_integrity: bool = True) -> AttachmentLinker:
    """Return the preparer to register for every type of LINKED_TYPES."""
    return AttachmentLinker(
        base_url=base_url, enforce_referential_integrity=enforce_referential_integrity
    )


def binary_id_of(url: Any, *, base_url: str) -> str | None:
    """Return the id of the stored Binary an Attachment.url names, None for any other URL."""
    if not isinstance(url, str):
        return None
    prefix = base_url.rstrip("/") + "/"
    local = url[len(prefix) :] if url.startswith(prefix) else url
    match = _BINARY_PATH.match(local)
    return match.group(1) if match else None


def patient_id_of(reference: Any, *, base_url: str) -> str | None:
    """Return the patient id of a Reference to a Patient (relative or under the base)."""
    value = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(value, str):
        return None
    prefix = base_url.rstrip("/") + "/"
    local = value[len(prefix) :] if value.startswith(prefix) else value
    match = _PATIENT_PATH.match(local)
    return match.group(1) if match else None


def cited_binaries(resource: JSONObject, *, base_url: str) -> list[CitedBinary]:
    """Return the attachments of a Media or DocumentReference that cite a stored Binary."""
    resource_type = resource.get("resourceType")
    attachments: list[tuple[Any, str]] = []
    if resource_type == "Media":
        attachments.append((resource.get("content"), "Media.content"))
    elif resource_type == "DocumentReference":
        for position, content in enumerate(resource.get("content") or []):
            if isinstance(content, dict):
                path = f"DocumentReference.content[{position}].attachment"
                attachments.append((content.get("attachment"), path))
    cited: list[CitedBinary] = []
    for attachment, path in attachments:
        if not isinstance(attachment, dict):
            continue
        url = attachment.get("url")
        binary_id = binary_id_of(url, base_url=base_url)
        if binary_id is not None:
            cited.append(CitedBinary(binary_id, attachment, path))
        elif isinstance(url, str) and _names_a_binary(url, base_url=base_url):
            # `Binary/Binary/<id>` or `Binary/` would be kept unchecked, unfilled.
            message = f"{path}.url {url!r} names no stored Binary (use Binary/<id>)"
            raise InvalidResource(message, issues=[Issue("not-found", message, f"{path}.url")])
    return cited


def _names_a_binary(url: str, *, base_url: str) -> bool:
    prefix = base_url.rstrip("/") + "/"
    local = url[len(prefix) :] if url.startswith(prefix) else url
    return local == "Binary" or local.startswith("Binary/")


def _sha1_base64(row: BinaryObjectRow) -> str:
    return base64.b64encode(row.sha1).decode("ascii")


def _media_type(value: str) -> str:
    return value.split(";")[0].strip().lower()


def _fill_attachment(cited: CitedBinary, row: BinaryObjectRow) -> None:
    """Fill contentType, size and hash from the stored object; refuse given values that differ."""
    attachment, path = cited.attachment, cited.path
    reference = f"Binary/{row.id}"
    if "data" in attachment:
        raise InvalidResource(
            f"{path} carries data and cites {reference}; send one or the other",
            issues=[Issue("invalid", f"data given with a url citing {reference}", f"{path}.data")],
        )
    given_type = attachment.get("contentType")
    if given_type is None:
        attachment["contentType"] = row.content_type
    elif not isinstance(given_type, str) or _media_type(given_type) != row.content_type:
        raise _mismatch(f"{path}.contentType", f"{reference} is {row.content_type}")
    given_size = attachment.get("size")
    if given_size is None:
        attachment["size"] = row.size
    elif isinstance(given_size, bool) or given_size != row.size:
        raise _mismatch(f"{path}.size", f"{reference} has {row.size} bytes")
    given_hash = attachment.get("hash")
    if given_hash is None:
        attachment["hash"] = _sha1_base64(row)
    else:
        try:
            decoded = base64.b64decode(str(given_hash), validate=True)
        except binascii.Error:
            decoded = b""
        if decoded != row.sha1:
            raise _mismatch(f"{path}.hash", f"{reference} has another SHA-1")


def _mismatch(expression: str, diagnostics: str) -> InvalidResource:
    return InvalidResource(
        f"{expression} disagrees with the stored Binary: {diagnostics}",
        issues=[Issue("value", diagnostics, expression)],
    )


def _not_found(cited: CitedBinary) -> DanglingReference:
    # The same answer for absent, deleted and not the caller's: citing a
    # stranger's Binary must not reveal that it exists.
    message = f"Binary/{cited.binary_id} does not exist"
    return DanglingReference(message, issues=[Issue("not-found", message, f"{cited.path}.url")])


def _visible_binary(
    session: Session, cited: CitedBinary, *, context: RequestContext, base_url: str
) -> BinaryObjectRow:
    # Locked (link_attachments took the locks): two bundles citing one Binary
    # for two patients serialize, and the second sees the first one's link.
    row = repository.lock_binary_object(session, cited.binary_id)
    if row is None or row.deleted_at is not None:
        raise _not_found(cited)
    try:
        binary_service.check_binary_access(
            session,
            row,
            access=context.access,
            client_id=context.client_id,
            owner=context.owner,
            base_url=base_url,
        )
    except BinaryNotFound:
        raise _not_found(cited) from None
    return row


def _read(
    session: Session, resource_type: str, resource_id: str, *, write_settings: WriteSettings
) -> tuple[JSONObject, int] | None:
    try:
        result = fhir_service.run_interaction(
            session,
            EntryRequest(method="GET", resource_type=resource_type, resource_id=resource_id),
            context=SYSTEM_CONTEXT,
            settings=write_settings,
        )
    except WahaError:
        return None
    if result.resource is None or result.version_id is None:
        return None
    return result.resource, result.version_id


def _patient_of_context(
    session: Session, row: BinaryObjectRow, *, write_settings: WriteSettings
) -> str | None:
    """Return the patient an upload's securityContext named (a Patient, or an Encounter's)."""
    resource_type, _, resource_id = (row.security_context or "").partition("/")
    if resource_type == "Patient" and resource_id:
        return resource_id
    if resource_type == "Encounter" and resource_id:
        found = _read(session, "Encounter", resource_id, write_settings=write_settings)
        if found is not None:
            return patient_id_of(found[0].get("subject"), base_url=write_settings.base_url)
    return None


def _check_one_record(
    session: Session,
    cited: CitedBinary,
    row: BinaryObjectRow,
    *,
    resource_key: tuple[str, str],
    patient_id: str | None,
    write_settings: WriteSettings,
) -> None:
    """Refuse to cite a Binary that already belongs to another patient's record."""
    owners = {
        link.patient_id
        for link in repository.list_binary_links(session, row.id)
        if (link.resource_type, link.resource_id) != resource_key and link.patient_id is not None
    }
    context_patient = _patient_of_context(session, row, write_settings=write_settings)
    if context_patient is not None:
        owners.add(context_patient)
    if owners and owners != {patient_id}:
        # Neither the message nor the issue names the other patient.
        message = f"Binary/{row.id} belongs to another patient's record"
        raise InvalidResource(
            message, issues=[Issue("business-rule", message, f"{cited.path}.url")]
        )


def _set_quality(resource: JSONObject, code: str) -> bool:
    """Put the image-quality extension on a Media (replacing an older one); tell if it changed."""
    wanted = derivatives_service.quality_extension(code)
    extensions = [
        extension
        for extension in resource.get("extension") or []
        if not (isinstance(extension, dict) and extension.get("url") == wanted["url"])
    ]
    changed = extensions + [wanted] != (resource.get("extension") or [])
    resource["extension"] = [*extensions, wanted]
    return changed


def link_attachments(
    session: Session,
    resource: JSONObject,
    *,
    context: RequestContext,
    write_settings: WriteSettings,
) -> None:
    """Check and fill a Media's or DocumentReference's Binary attachments and record its links."""
    resource_type = str(resource.get("resourceType"))
    resource_id = resource.get("id")
    if not isinstance(resource_id, str):
        # The engine names the resource before preparers run; a link needs that id.
        raise RuntimeError(f"a {resource_type} reached its preparer without its id")
    base_url = write_settings.base_url
    patient_id = patient_id_of(resource.get("subject"), base_url=base_url)
    cited = cited_binaries(resource, base_url=base_url)
    # Locked in one order, so two bundles citing the same Binaries cannot deadlock.
    for binary_id in sorted({item.binary_id for item in cited}):
        repository.lock_binary_object(session, binary_id)
    rows: list[BinaryObjectRow] = []
    for item in cited:
        row = _visible_binary(session, item, context=context, base_url=base_url)
        _fill_attachment(item, row)
        _check_one_record(
            session,
            item,
            row,
            resource_key=(resource_type, resource_id),
            patient_id=patient_id,
            write_settings=write_settings,
        )
        rows.append(row)
    repository.delete_binary_links_of(
        session, resource_type, resource_id, keeping=[row.id for row in rows]
    )
    for row in rows:
        repository.put_binary_link(
            session,
            binary_id=row.id,
            resource_type=resource_type,
            resource_id=resource_id,
            patient_id=patient_id,
        )
    if resource_type == "Media" and rows:
        code = derivatives_service.quality_for_binary(session, rows[0].id)
        if code is not None:
            _set_quality(resource, code)
    dicom_rows = [row for row in rows if row.content_type == DICOM]
    # Preparers run before the bundle's own writes: a Patient created by the
    # same bundle is not stored yet, and a study naming it would be refused
    # for good. Its study is written after the commit instead, by the outbox
    # handler of this resource's event (complete_links_of).
    if (
        dicom_rows
        and patient_id is not None
        and _read(session, "Patient", patient_id, write_settings=write_settings) is not None
    ):
        for row in dicom_rows:
            # Runs the engine again, nested in this one's transaction; a
            # refused study is recorded as failed, never fails this write.
            derivatives_service.create_imaging_study_for(
                session,
                binary_id=row.id,
                patient_reference=f"Patient/{patient_id}",
                write_settings=write_settings,
            )
    if rows:
        log.info(
            "imaging_store.binaries_linked",
            resource_type=resource_type,
            resource_id=resource_id,
            binaries=len(rows),
        )


def apply_quality_to_linked_media(
    session: Session, binary_id: str, *, write_settings: WriteSettings
) -> list[str]:
    """Put a photo's quality verdict on every Media citing it; return the Media ids changed."""
    # No lock on the Binary's row here: a unit's PUT of the Media holds the
    # Media's lock and then takes the row's (in the preparer), so taking them
    # in the other order could deadlock. A Media linked while the verdict is
    # being recorded gets it from its own event (complete_links_of) instead.
    code = derivatives_service.quality_for_binary(session, binary_id)
    if code is None:
        return []
    changed: list[str] = []
    for link in repository.list_binary_links(session, binary_id):
        if link.resource_type != "Media":
            continue
        found = _read(session, "Media", link.resource_id, write_settings=write_settings)
        if found is None:
            continue
        media, version_id = found
        if not _set_quality(media, code):
            continue
        # If-Match: a unit's concurrent update wins and this run is retried
        # by the outbox (412 is transient), never silently overwritten.
        fhir_service.run_interaction(
            session,
            EntryRequest(
                method="PUT",
                resource_type="Media",
                resource_id=link.resource_id,
                resource=media,
                if_match=f'W/"{version_id}"',
            ),
            context=SYSTEM_CONTEXT,
            settings=write_settings,
        )
        changed.append(link.resource_id)
    if changed:
        log.info("imaging_store.quality_applied", binary_id=binary_id, media=len(changed))
    return changed


def create_linked_imaging_study(
    session: Session, binary_id: str, *, write_settings: WriteSettings
) -> str | None:
    """Write the pending ImagingStudy of a DICOM Binary once a Media names its patient."""
    row = repository.lock_binary_object(session, binary_id)
    if row is None or row.content_type != DICOM:
        return None
    patients = repository.list_linked_patient_ids(session, binary_id)
    if len(patients) != 1:
        return None
    return derivatives_service.create_imaging_study_for(
        session,
        binary_id=binary_id,
        patient_reference=f"Patient/{patients[0]}",
        write_settings=write_settings,
    )


def complete_links_of(
    session: Session, resource_type: str, resource_id: str, *, write_settings: WriteSettings
) -> None:
    """After a Media or DocumentReference is stored, finish what its Binaries wait for.

    For the outbox handler of its `fhir.resource_changed` event: the quality
    verdict of a photo, the ImagingStudy of a DICOM file whose patient this
    resource named. Both are idempotent, so redelivered events change nothing.
    """
    for link in repository.list_binary_links_of(session, resource_type, resource_id):
        create_linked_imaging_study(session, link.binary_id, write_settings=write_settings)
        apply_quality_to_linked_media(session, link.binary_id, write_settings=write_settings)


def record_media_for_upload(
    session: Session,
    binary_row: BinaryObjectRow,
    caller: binary_service.Caller,
    base_url: str,
    *,
    enforce_referential_integrity: bool = True,
    encounter_id: str | None = None,
) -> str | None:
    """Record the Media of an upload that named its patient or encounter; return its id.

    `encounter_id` is the tus metadata's `encounter` when `patient` was given
    too (the Binary's securityContext keeps only the patient).
    """
    resource_type, _, resource_id = (binary_row.security_context or "").partition("/")
    if not resource_id or resource_type not in ("Patient", "Encounter"):
        return None
    if resource_type == "Encounter":
        encounter_id = resource_id
    write_settings = WriteSettings(
        base_url=base_url, enforce_referential_integrity=enforce_referential_integrity
    )
    # Units write as their Device (auth.policy.author_of); their care
    # relationships grow from this Media as from any resource they write.
    unit = caller.author.removeprefix("Device/") if caller.author.startswith("Device/") else None
    context = RequestContext(
        client_id=caller.client_id,
        author=caller.author,
        request_id=caller.request_id,
        unit=unit,
        access=caller.access,
    )
    media: JSONObject = {"resourceType": "Media", "status": "completed"}
    patient_id = resource_id if resource_type == "Patient" else None
    if encounter_id is not None:
        encounter = _read(session, "Encounter", encounter_id, write_settings=write_settings)
        subject = encounter[0].get("subject") if encounter is not None else None
        encounter_patient = patient_id_of(subject, base_url=base_url)
        if patient_id is not None and encounter_patient not in (None, patient_id):
            message = f"Encounter/{encounter_id} is another patient's visit"
            raise InvalidResource(
                message, issues=[Issue("business-rule", message, "Media.encounter")]
            )
        patient_id = patient_id or encounter_patient
    if patient_id is not None:
        media["subject"] = {"reference": f"Patient/{patient_id}"}
    if encounter_id is not None:
        media["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    media["createdDateTime"] = format_instant(datetime.now(UTC).replace(microsecond=0))
    if unit is not None and _read(session, "Device", unit, write_settings=write_settings):
        media["device"] = {"reference": f"Device/{unit}"}
    media["content"] = {
        "contentType": binary_row.content_type,
        "url": f"Binary/{binary_row.id}",
        "size": binary_row.size,
        "hash": _sha1_base64(binary_row),
    }
    result = fhir_service.run_interaction(
        session,
        EntryRequest(method="POST", resource_type="Media", resource=media),
        context=context,
        settings=write_settings,
    )
    assert result.resource_id is not None  # noqa: S101 - a create always names its resource
    # Also recorded here, not only by the preparer: the link must not depend
    # on which preparers the process registered.
    repository.put_binary_link(
        session,
        binary_id=binary_row.id,
        resource_type="Media",
        resource_id=result.resource_id,
        patient_id=patient_id,
    )
    log.info(
        "imaging_store.upload_media_recorded", binary_id=binary_row.id, media_id=result.resource_id
    )
    return result.resource_id


def record_media_for_binary(
    session: Session,
    *,
    binary_id: str,
    caller: binary_service.Caller,
    base_url: str,
    enforce_referential_integrity: bool = True,
    encounter_id: str | None = None,
) -> str | None:
    """Record the Media of a just-stored upload by its Binary id (see record_media_for_upload)."""
    row = repository.get_binary_object(session, binary_id)
    if row is None:
        return None
    return record_media_for_upload(
        session,
        row,
        caller,
        base_url,
        enforce_referential_integrity=enforce_referential_integrity,
        encounter_id=encounter_id,
    )
