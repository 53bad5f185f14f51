"""The base domain error and the only place errors become HTTP responses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from psycopg.errors import QueryCanceled
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger()

FHIR_MEDIA_TYPE = "application/fhir+json"
PROBLEM_MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome issue: what went wrong and where."""

    code: str
    diagnostics: str
    expression: str | None = None
    severity: str = "error"


class WahaError(Exception):
    """A condition a client can act on; carries its HTTP status and FHIR issue type."""

    status: int = 400
    issue_code: str = "processing"
    slug: str = "error"

    def __init__(self, detail: str, *, issues: list[Issue] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.issues = issues or [Issue(self.issue_code, detail)]
        self.headers: dict[str, str] = {}


class BadRequest(WahaError):
    """The request cannot be understood as sent."""

    status = 400
    issue_code = "invalid"
    slug = "bad-request"


class NotFound(WahaError):
    """Nothing the caller may see is there."""

    status = 404
    issue_code = "not-found"
    slug = "not-found"


class PayloadTooLarge(WahaError):
    """The body is over a configured limit."""

    status = 413
    issue_code = "too-costly"
    slug = "payload-too-large"


class UnsupportedMediaType(WahaError):
    """The body's media type is not one Waha accepts here."""

    status = 415
    issue_code = "not-supported"
    slug = "unsupported-media-type"


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    """Build an OperationOutcome resource from issues."""
    rendered: list[dict[str, Any]] = []
    for issue in issues:
        item: dict[str, Any] = {
            "severity": issue.severity,
            "code": issue.code,
            "diagnostics": issue.diagnostics,
        }
        if issue.expression:
            item["expression"] = [issue.expression]
        rendered.append(item)
    return {"resourceType": "OperationOutcome", "issue": rendered}


@dataclass(slots=True)
class ErrorBody:
    """A rendered error: status, media type, body and extra headers."""

    status: int
    media_type: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _is_fhir_path(request: Request) -> bool:
    path = request.url.path
    return path == "/fhir" or path.startswith("/fhir/")


def render_error(request: Request, status: int, issues: list[Issue], slug: str) -> ErrorBody:
    """Render an error as OperationOutcome under /fhir, problem+json elsewhere."""
    if _is_fhir_path(request):
        return ErrorBody(status, FHIR_MEDIA_TYPE, operation_outcome(issues))
    detail = "; ".join(issue.diagnostics for issue in issues)
    return ErrorBody(
        status,
        PROBLEM_MEDIA_TYPE,
        {
            "type": f"https://waha.health/problems/{slug}",
            "title": slug.replace("-", " ").capitalize(),
            "status": status,
            "detail": detail,
            "instance": request.url.path,
        },
    )


def _respond(rendered: ErrorBody) -> Response:
    return JSONResponse(
        rendered.body,
        status_code=rendered.status,
        media_type=rendered.media_type,
        headers=rendered.headers or None,
    )


def _statement_timed_out(request: Request) -> ErrorBody:
    # The API's statement timeout (settings.database_statement_timeout_ms) ended a
    # statement: nothing was committed. Usually a search that asks too much,
    # sometimes a lock held long by another request: later may be better.
    log.warning("hub.statement_timeout", path=request.url.path)
    issues = [
        Issue(
            "too-costly",
            "the request ran longer than the server allows; narrow it, or retry later",
        )
    ]
    rendered = render_error(request, 503, issues, "too-costly")
    rendered.headers["Retry-After"] = "5"
    return rendered


def install_error_handlers(app: FastAPI) -> None:
    """Install the only exception handlers of the application."""

    @app.exception_handler(WahaError)
    async def _waha_error(request: Request, error: WahaError) -> Response:
        rendered = render_error(request, error.status, error.issues, error.slug)
        rendered.headers.update(error.headers)
        return _respond(rendered)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        issues = [
            Issue("invalid", str(item.get("msg")), ".".join(str(p) for p in item.get("loc", ())))
            for item in error.errors()
        ]
        return _respond(render_error(request, 400, issues, "bad-request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(error.status_code, "processing")
        issues = [Issue(code, str(error.detail))]
        rendered = render_error(request, error.status_code, issues, code)
        if error.headers:
            rendered.headers.update(error.headers)
        return _respond(rendered)

    @app.exception_handler(OperationalError)
    async def _database_unavailable(request: Request, error: OperationalError) -> Response:
        if isinstance(error.orig, QueryCanceled):
            return _respond(_statement_timed_out(request))
        # A lost or refused database connection: nothing was committed, and the
        # pool is renewed, so the same request is worth sending again.
        log.warning(
            "hub.database_unavailable",
            error_type=type(error.orig).__name__,
            connection_invalidated=error.connection_invalidated,
        )
        issues = [Issue("transient", "the database is unavailable; retry the request")]
        rendered = render_error(request, 503, issues, "database-unavailable")
        rendered.headers["Retry-After"] = "1"
        return _respond(rendered)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> Response:
        request_id = getattr(request.state, "request_id", "-")
        log.exception("hub.unexpected_error", error_type=type(error).__name__)
        issues = [Issue("exception", f"internal error; request id {request_id}")]
        return _respond(render_error(request, 500, issues, "internal-error"))
