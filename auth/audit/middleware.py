"""Audit every interaction with patient data before its answer leaves the server.

A pure ASGI middleware inside the bearer authentication: when the response
starts, it writes the AuditEvent (its own transaction, off the event loop) and
only then lets the status line go out, so no client ever sees an answer whose
audit was lost. When the audit cannot be written, the answer becomes a 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
import orjson
import structlog
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth.audit import service
from auth.audit.errors import AuditUnavailable
from auth.audit.writer import AuditWriter
from auth.tokens import Principal
from hub.errors import WahaError, operation_outcome

log = structlog.get_logger()

AUDITED_PREFIXES = ("/fhir", "/imaging")
UNAUDITED_PATHS = frozenset({"/fhir/metadata", "/fhir/.well-known/smart-configuration"})

# (method, route template) → FHIR restful-interaction code.
_SUBTYPES: dict[tuple[str, str], str] = {
    ("POST", "/fhir"): "transaction",
    ("GET", "/fhir"): "search-system",
    ("GET", "/fhir/_history"): "history-system",
    ("GET", "/fhir/{resource_type}"): "search-type",
    ("POST", "/fhir/{resource_type}"): "create",
    ("PUT", "/fhir/{resource_type}"): "update",
    ("DELETE", "/fhir/{resource_type}"): "delete",
    ("GET", "/fhir/{resource_type}/_history"): "history-type",
    ("POST", "/fhir/{resource_type}/_search"): "search-type",
    ("GET", "/fhir/{resource_type}/{resource_id}"): "read",
    ("PUT", "/fhir/{resource_type}/{resource_id}"): "update",
    ("PATCH", "/fhir/{resource_type}"): "patch",
    ("PATCH", "/fhir/{resource_type}/{resource_id}"): "patch",
    ("DELETE", "/fhir/{resource_type}/{resource_id}"): "delete",
    ("GET", "/fhir/{resource_type}/{resource_id}/_history"): "history-instance",
    ("GET", "/fhir/{resource_type}/{resource_id}/_history/{version_id}"): "vread",
    ("GET", "/fhir/Patient/{patient_id}/$everything"): "operation",
    ("GET", "/fhir/{compartment}/{compartment_id}/{resource_type}"): "search-type",
    ("POST", "/fhir/Binary"): "create",
    ("GET", "/fhir/Binary/{binary_id}"): "read",
    ("GET", "/fhir/Binary/{binary_id}/_history/{version_id}"): "vread",
    ("GET", "/fhir/AuditEvent"): "search-type",
    ("GET", "/fhir/AuditEvent/{audit_event_id}"): "read",
}
_BY_METHOD = {"GET": "read", "HEAD": "read", "POST": "create", "PUT": "update", "PATCH": "update"}


def _audited(path: str) -> bool:
    if path in UNAUDITED_PATHS:
        return False
    return any(path == prefix or path.startswith(prefix + "/") for prefix in AUDITED_PREFIXES)


def _subtype(scope: Scope, notes: Any) -> str:
    interaction = getattr(notes, "interaction", None)
    if isinstance(interaction, str) and interaction in service.SUBTYPES:
        return interaction
    route = getattr(scope.get("route"), "path", None)
    method = str(scope["method"])
    if route is not None and (method, route) in _SUBTYPES:
        return _SUBTYPES[(method, route)]
    if method == "DELETE":
        return "delete"
    return _BY_METHOD.get(method, "operation")


def _route_entities(scope: Scope) -> tuple[str, ...]:
    """Name the record a request tried when nothing was read (a refused or failed read)."""
    params = scope.get("path_params") or {}
    resource_type, resource_id = params.get("resource_type"), params.get("resource_id")
    if resource_type and resource_id:
        return (f"{resource_type}/{resource_id}",)
    if params.get("binary_id"):
        # /fhir/Binary/<id> and /imaging/binaries/<id>/thumbnail|preview
        return (f"Binary/{params['binary_id']}",)
    if params.get("patient_id"):
        return (f"Patient/{params['patient_id']}",)
    return ()


def _route_patients(scope: Scope) -> tuple[str, ...]:
    params = scope.get("path_params") or {}
    if params.get("patient_id"):
        return (str(params["patient_id"]),)
    if params.get("compartment") == "Patient" and params.get("compartment_id"):
        return (str(params["compartment_id"]),)
    if params.get("resource_type") == "Patient" and params.get("resource_id"):
        return (str(params["resource_id"]),)
    return ()


def _source_address(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _query(scope: Scope) -> str | None:
    raw = scope.get("query_string") or b""
    return bytes(raw).decode("latin-1") or None


class AuditMiddleware:
    """Write an AuditEvent for every audited request before its response starts."""

    def __init__(self, app: ASGIApp, *, bind: Callable[[], sessionmaker[Session]]) -> None:
        self.app = app
        self.writer = AuditWriter(bind)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http" or not _audited(scope["path"]):
            await self.app(scope, receive, send)
            return
        replaced = False

        async def audited_send(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                try:
                    await self._record(scope, int(message["status"]))
                except AuditUnavailable as error:
                    replaced = True
                    await _send_unavailable(send, error)
                    return
            await send(message)

        await self.app(scope, receive, audited_send)

    async def _record(self, scope: Scope, status: int) -> None:
        state = scope.get("state") or {}
        notes = state.get("audit")
        principal = state.get("principal")
        subtype = _subtype(scope, notes)
        record = service.AuditRecord(
            action=service.action_for(subtype),
            subtype=subtype,
            outcome=service.outcome_for_status(status),
            outcome_description=None if status < 400 else f"HTTP {status}",
            principal=principal if isinstance(principal, Principal) else None,
            client_id=None,
            source_address=_source_address(scope),
            request_id=state.get("request_id"),
            method=str(scope["method"]),
            path=str(scope["path"]),
            query=_query(scope),
            entity_refs=tuple(getattr(notes, "resource_refs", ())) or _route_entities(scope),
            patient_ids=tuple(getattr(notes, "patient_ids", ())) or _route_patients(scope),
        )
        await self.writer.write(record)


def denied_recorder(
    bind: Callable[[], sessionmaker[Session]],
) -> Callable[[Scope, WahaError], Awaitable[None]]:
    """Return the hook that audits refused authentications (bad, expired, revoked tokens)."""

    async def record_denied(scope: Scope, error: WahaError) -> None:
        # A revoked unit's token was valid: its principal says who tried.
        principal = getattr(error, "principal", None)
        record = service.AuditRecord(
            action="E",
            subtype=service.LOGIN_SUBTYPE,
            outcome=service.outcome_for_status(error.status),
            outcome_description=error.detail,
            principal=principal if isinstance(principal, Principal) else None,
            client_id=None,
            source_address=_source_address(scope),
            request_id=(scope.get("state") or {}).get("request_id"),
            method=str(scope["method"]),
            path=str(scope["path"]),
            query=None,
        )
        try:
            await anyio.to_thread.run_sync(service.record, bind(), [record])
        except AuditUnavailable:
            # The request is refused anyway; record() has logged the failure.
            log.warning("auth.denied_unaudited", path=scope["path"])

    return record_denied


async def _send_unavailable(send: Send, error: AuditUnavailable) -> None:
    body = orjson.dumps(operation_outcome(error.issues))
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/fhir+json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"5"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
