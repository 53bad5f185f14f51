"""Errors of token validation, mapped to 401/503 by hub's error handlers."""

from __future__ import annotations

from hub.errors import WahaError


class MissingToken(WahaError):
    """The request carries no bearer token."""

    status = 401
    issue_code = "login"
    slug = "missing-token"

    def __init__(self, detail: str = "a bearer token is required") -> None:
        super().__init__(detail)
        # RFC 6750 §3.1: no error code when the request had no credentials at all.
        self.headers["WWW-Authenticate"] = 'Bearer realm="waha"'


class InvalidToken(WahaError):
    """The bearer token is malformed, forged, expired or meant for someone else."""

    status = 401
    issue_code = "login"
    slug = "invalid-token"

    def __init__(self, detail: str = "the bearer token is not valid") -> None:
        super().__init__(detail)
        # The description is a fixed reason ("expired", "wrong issuer"), never token content.
        reason = detail.replace('"', "'")
        self.headers["WWW-Authenticate"] = (
            f'Bearer realm="waha", error="invalid_token", error_description="{reason}"'
        )


class IssuerUnavailable(WahaError):
    """The token issuer's keys cannot be fetched, so no token can be checked."""

    status = 503
    issue_code = "transient"
    slug = "issuer-unavailable"


class Forbidden(WahaError):
    """The caller's role or scopes never allow this interaction (not a matter of rows)."""

    status = 403
    issue_code = "forbidden"
    slug = "forbidden"


class UnitRevoked(InvalidToken):
    """The token belongs to a unit whose Device an administrator set inactive."""

    def __init__(self, principal: object = None) -> None:
        super().__init__("the unit's device is not active")
        # Kept for the audit trail: the token was valid, so it says who tried.
        self.principal = principal
