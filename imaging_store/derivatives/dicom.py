"""pydicom work: a DICOM file's header as an R4 ImagingStudy with its one series and instance.

Pure: a file in, JSON out. The subject is added by the service once the
patient is known. R4 ImagingStudy has no element that points at the stored
file, so each instance carries the extension `INSTANCE_BINARY_URL` whose
valueReference is the Binary holding that instance's bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import IO, Any

import pydicom
from pydicom.dataset import Dataset

JSONObject = dict[str, Any]

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"
INSTANCE_BINARY_URL = "https://waha.health/fhir/StructureDefinition/instance-binary"
# DICOM modality for "other", for files that do not say (DICOM PS3.3 C.7.3.1.1.1).
OTHER_MODALITY = "OT"
# Values longer than this are read only when asked for: the header is what
# we need, never the pixel or waveform data.
DEFER_VALUES_OVER = "16 KB"
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A DICOM UID (PS3.5 9.1) that is also a valid urn:oid and FHIR id.
_UID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TIME = re.compile(r"^(\d{2})(\d{2})(\d{2})")
_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")


class DicomUnreadable(Exception):
    """The file is not DICOM Waha can describe; `reason` is a stable code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DicomSummary:
    """The study described by one DICOM file, and whether it holds an image."""

    study_uid: str
    imaging_study: JSONObject
    has_pixel_data: bool


def study_identifier_query(study_uid: str) -> str:
    """Return the search query that finds the ImagingStudy of a Study Instance UID."""
    return f"identifier={DICOM_UID_SYSTEM}|urn:oid:{study_uid}"


def summarize_dicom(source: IO[bytes], *, binary_id: str) -> DicomSummary:
    """Read a DICOM file's header into an ImagingStudy (without subject)."""
    try:
        dataset = pydicom.dcmread(source, defer_size=DEFER_VALUES_OVER)
        study_uid = _uid(dataset, "StudyInstanceUID")
        series_uid = _uid(dataset, "SeriesInstanceUID")
        instance_uid = _uid(dataset, "SOPInstanceUID")
        sop_class_uid = _uid(dataset, "SOPClassUID")
        modality = _text(dataset, "Modality") or OTHER_MODALITY
        instance: JSONObject = {
            "extension": [
                {"url": INSTANCE_BINARY_URL, "valueReference": {"reference": f"Binary/{binary_id}"}}
            ],
            "uid": instance_uid,
            "sopClass": {"system": SOP_CLASS_SYSTEM, "code": f"urn:oid:{sop_class_uid}"},
        }
        _put_number(instance, "number", dataset, "InstanceNumber")
        series: JSONObject = {
            "uid": series_uid,
            "modality": {"system": DCM_SYSTEM, "code": modality},
            "numberOfInstances": 1,
            "instance": [instance],
        }
        _put_number(series, "number", dataset, "SeriesNumber")
        _put_text(series, "description", dataset, "SeriesDescription")
        body_part = _text(dataset, "BodyPartExamined")
        if body_part:
            # DICOM defined terms (CHEST, SKIN, EYE), not SNOMED codes: shown as text.
            series["bodySite"] = {"display": body_part}
        study: JSONObject = {
            "resourceType": "ImagingStudy",
            "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}],
            "status": "available",
            "modality": [{"system": DCM_SYSTEM, "code": modality}],
            "numberOfSeries": 1,
            "numberOfInstances": 1,
            "series": [series],
        }
        started = _started(dataset)
        if started:
            study["started"] = started
        _put_text(study, "description", dataset, "StudyDescription")
        has_pixel_data = any(tag in dataset for tag in _PIXEL_TAGS)
    except DicomUnreadable:
        raise
    except Exception:  # noqa: BLE001 - pydicom raises many types on malformed files
        # InvalidDicomError, EOFError, struct.error, KeyError, ValueError...:
        # all mean this file cannot be read, a permanent condition.
        raise DicomUnreadable("unreadable-dicom") from None
    return DicomSummary(study_uid=study_uid, imaging_study=study, has_pixel_data=has_pixel_data)


def merge_instance(existing: JSONObject, addition: JSONObject) -> JSONObject | None:
    """Add the one series instance of `addition` to a stored study; None if already there."""
    merged: JSONObject = dict(existing)
    new_series = addition["series"][0]
    new_instance = new_series["instance"][0]
    all_series = [dict(series) for series in merged.get("series", [])]
    for series in all_series:
        if series.get("uid") != new_series["uid"]:
            continue
        instances = list(series.get("instance", []))
        if any(instance.get("uid") == new_instance["uid"] for instance in instances):
            return None
        series["instance"] = [*instances, new_instance]
        series["numberOfInstances"] = len(series["instance"])
        break
    else:
        all_series.append(new_series)
    merged["series"] = all_series
    merged["numberOfSeries"] = len(all_series)
    merged["numberOfInstances"] = sum(len(series.get("instance", [])) for series in all_series)
    codes: dict[str, JSONObject] = {}
    for series in all_series:
        codes.setdefault(series["modality"]["code"], series["modality"])
    merged["modality"] = list(codes.values())
    return merged


def _text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _put_text(target: JSONObject, element: str, dataset: Dataset, keyword: str) -> None:
    text = _text(dataset, keyword)
    if text:
        target[element] = text


def _put_number(target: JSONObject, element: str, dataset: Dataset, keyword: str) -> None:
    text = _text(dataset, keyword)
    # FHIR unsignedInt: DICOM IS values may be negative or blank.
    if text is not None and text.isdigit():
        target[element] = int(text)


def _uid(dataset: Dataset, keyword: str) -> str:
    value = _text(dataset, keyword)
    if value is None or len(value) > 64 or not _UID.match(value):
        raise DicomUnreadable(f"missing-or-invalid-{keyword.lower()}")
    return value


def _started(dataset: Dataset) -> str | None:
    """Return StudyDate (+ StudyTime when a UTC offset is known) as a FHIR dateTime."""
    date = _DATE.match(_text(dataset, "StudyDate") or "")
    if date is None:
        return None
    day = "-".join(date.groups())
    time = _TIME.match(_text(dataset, "StudyTime") or "")
    offset = _OFFSET.match(_text(dataset, "TimezoneOffsetFromUTC") or "")
    # FHIR requires a zone on a dateTime with a time; DICOM times are local and
    # rarely carry their offset, so without it only the day is certain.
    if time is None or offset is None:
        return day
    sign, hours, minutes = offset.groups()
    return f"{day}T{':'.join(time.groups())}{sign}{hours}:{minutes}"
