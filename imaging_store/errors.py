"""Errors of the imaging store, each with its HTTP status and FHIR issue type."""

from __future__ import annotations

from hub.errors import WahaError


class InvalidContentDigest(WahaError):
    """The Content-Digest header is not an RFC 9530 dictionary Waha can verify."""

    status = 400
    issue_code = "invalid"
    slug = "invalid-content-digest"


class ContentDigestMismatch(WahaError):
    """The received content does not hash to the Content-Digest the client sent."""

    status = 422
    issue_code = "invalid"
    slug = "content-digest-mismatch"


class InvalidBinary(WahaError):
    """A FHIR JSON Binary that cannot be stored (no data, bad base64, wrong type)."""

    status = 422
    issue_code = "invalid"
    slug = "invalid-binary"


class BinaryTooLarge(WahaError):
    """The content is over the `max_binary_bytes` limit."""

    status = 413
    issue_code = "too-costly"
    slug = "binary-too-large"


class ContentTypeNotAllowed(WahaError):
    """The bytes are not of a type on the allow-list (or are active content)."""

    status = 415
    issue_code = "not-supported"
    slug = "content-type-not-allowed"


class BinaryNotFound(WahaError):
    """No such Binary (or not one the caller may see)."""

    status = 404
    issue_code = "not-found"
    slug = "binary-not-found"


class BinaryImmutable(WahaError):
    """Stored bytes are never replaced; a new upload makes a new Binary."""

    status = 405
    issue_code = "not-supported"
    slug = "binary-immutable"


class StorageUnavailable(WahaError):
    """The object store did not answer; the client should retry later."""

    status = 503
    issue_code = "transient"
    slug = "storage-unavailable"
