"""Errors of the audit trail, each with its HTTP status and FHIR issue type."""

from __future__ import annotations

from hub.errors import WahaError


class AuditReadForbidden(WahaError):
    """Only an admin reads the audit trail."""

    status = 403
    issue_code = "forbidden"
    slug = "audit-read-forbidden"


class AuditEventNotFound(WahaError):
    """No audit event has this id."""

    status = 404
    issue_code = "not-found"
    slug = "audit-event-not-found"


class AuditTrailReadOnly(WahaError):
    """AuditEvent is written by Waha itself, never through the API."""

    status = 405
    issue_code = "not-supported"
    slug = "audit-trail-read-only"

    def __init__(self, detail: str = "AuditEvent is read-only: Waha writes it itself") -> None:
        super().__init__(detail)
        self.headers["Allow"] = "GET"


class InvalidAuditSearch(WahaError):
    """A search value, prefix, modifier or paging cursor is malformed."""

    status = 400
    issue_code = "invalid"
    slug = "invalid-audit-search"


class UnknownAuditSearchParameter(WahaError):
    """A parameter AuditEvent search does not know, refused under `Prefer: handling=strict`."""

    status = 400
    issue_code = "not-supported"
    slug = "unknown-search-parameter"


class AuditUnavailable(WahaError):
    """The audit trail cannot be written, so the request must not be served unaudited."""

    status = 503
    issue_code = "transient"
    slug = "audit-unavailable"
