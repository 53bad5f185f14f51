"""OAuth 2.0 errors of the dev issuer, answered in Keycloak's JSON shape."""

from __future__ import annotations


class OAuthError(Exception):
    """An RFC 6749 error response: `error`, `error_description` and its HTTP status."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


class DevIssuerRefused(RuntimeError):
    """The dev issuer was asked to run where it must not (WAHA_ENV=production)."""
