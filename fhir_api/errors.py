"""Errors of the FHIR record store, each with its HTTP status and FHIR issue type."""

from __future__ import annotations

from hub.errors import Issue, WahaError


class InvalidResource(WahaError):
    """The resource breaks the R4 rules (unknown element, bad value, wrong type)."""

    status = 422
    issue_code = "invalid"
    slug = "invalid-resource"


class UnparsableBody(WahaError):
    """The body is not JSON, or not a FHIR resource at all."""

    status = 400
    issue_code = "structure"
    slug = "unparsable-body"


class UnknownResourceType(WahaError):
    """The type is not an R4 resource type Waha stores."""

    status = 404
    issue_code = "not-supported"
    slug = "unknown-resource-type"


class UnsupportedResourceType(WahaError):
    """An R4 type that has no validating model; refused rather than stored unchecked."""

    status = 400
    issue_code = "not-supported"
    slug = "unsupported-resource-type"


class ResourceNotFound(WahaError):
    """No such resource (or not one the caller may see)."""

    status = 404
    issue_code = "not-found"
    slug = "resource-not-found"


class ResourceGone(WahaError):
    """The resource was deleted; its history remains."""

    status = 410
    issue_code = "deleted"
    slug = "resource-deleted"


class VersionConflict(WahaError):
    """If-Match named a version that is no longer current."""

    status = 412
    issue_code = "conflict"
    slug = "version-conflict"


class PreconditionFailed(WahaError):
    """A conditional interaction matched more (or fewer) resources than it may."""

    status = 412
    issue_code = "multiple-matches"
    slug = "precondition-failed"


class ResourceExists(WahaError):
    """If-None-Match: * on a resource that exists."""

    status = 412
    issue_code = "duplicate"
    slug = "resource-exists"


class DanglingReference(WahaError):
    """A reference points at nothing stored and at no entry of the bundle."""

    status = 422
    issue_code = "not-found"
    slug = "dangling-reference"


class IdempotencyConflict(WahaError):
    """The Bundle.identifier was used before by this client with other content."""

    status = 409
    issue_code = "conflict"
    slug = "idempotency-key-reused"


class BundleInFlight(WahaError):
    """An identical bundle is still being processed and did not finish in time."""

    status = 409
    issue_code = "transient"
    slug = "bundle-in-flight"


class UnsupportedSearch(WahaError):
    """A search criterion Waha cannot evaluate yet."""

    status = 400
    issue_code = "not-supported"
    slug = "unsupported-search"


class BundleTooLarge(WahaError):
    """More entries than the configured limit."""

    status = 413
    issue_code = "too-costly"
    slug = "bundle-too-large"


def nest_expression(expression: str | None, prefix: str) -> str:
    """Place a resource-rooted FHIRPath (`Observation.code`) under a Bundle entry path."""
    if not expression:
        return prefix
    if expression.startswith(prefix):
        return expression
    root, dot, rest = expression.partition(".")
    if prefix.startswith("Bundle.entry[") and root[:1].isupper() and root != "Bundle":
        return f"{prefix}.resource{dot}{rest}"
    return f"{prefix}.{expression}"


def at(error: WahaError, prefix: str) -> WahaError:
    """Place every issue of `error` under `prefix` (e.g. Bundle.entry[3])."""
    error.issues = [
        Issue(
            issue.code, issue.diagnostics, nest_expression(issue.expression, prefix), issue.severity
        )
        for issue in error.issues
    ]
    return error


class InvalidId(WahaError):
    """An id in the URL that breaks the FHIR id rule: no resource can have it."""

    status = 400
    issue_code = "value"
    slug = "invalid-id"


class MethodNotAllowed(WahaError):
    """An HTTP method the endpoint does not take."""

    status = 405
    issue_code = "not-supported"
    slug = "method-not-allowed"


class NotAcceptable(WahaError):
    """The client asks for a format Waha does not write (XML, Turtle, HTML)."""

    status = 406
    issue_code = "not-supported"
    slug = "not-acceptable"


class NotPatchable(WahaError):
    """A resource type the patch interaction does not apply to."""

    status = 405
    issue_code = "not-supported"
    slug = "not-patchable"
