"""Errors of the derivatives, each with its HTTP status and FHIR issue type."""

from __future__ import annotations

from hub.errors import WahaError


class PreviewNotAvailable(WahaError):
    """The Binary is not an image Waha can preview (a PDF, text, an ECG waveform)."""

    status = 404
    issue_code = "not-found"
    slug = "preview-not-available"


class PreviewFailed(WahaError):
    """The Binary could not be decoded into a preview; retrying will not help."""

    status = 422
    issue_code = "processing"
    slug = "preview-failed"


class StudyOfAnotherPatient(WahaError):
    """The Study Instance UID is already recorded for a different patient."""

    status = 422
    issue_code = "conflict"
    slug = "study-of-another-patient"
