"""HTTP edge of the audit trail: admins search and read AuditEvent; nobody writes it."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from auth.audit import service
from auth.audit.errors import AuditTrailReadOnly
from auth.tokens import Principal
from hub.db import SessionDep
from hub.errors import FHIR_MEDIA_TYPE
from hub.settings import Settings, request_settings

router = APIRouter(prefix="/fhir/AuditEvent")

SettingsDep = Annotated[Settings, Depends(request_settings)]
PreferHeader = Annotated[str | None, Header(alias="Prefer")]
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]


def request_principal(request: Request) -> Principal | None:
    """Return who the authentication middleware says is calling, if anyone."""
    principal = getattr(request.state, "principal", None)
    return principal if isinstance(principal, Principal) else None


PrincipalDep = Annotated[Principal | None, Depends(request_principal)]


def _fhir_response(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type=FHIR_MEDIA_TYPE)


def _strict_handling(prefer: str | None) -> bool:
    # RFC 7240: preferences are separated by commas (or semicolons, as clients send them).
    for part in (prefer or "").replace(",", ";").split(";"):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "handling":
            return value.strip().strip('"').lower() == "strict"
    return False


@router.get("", response_model=None)
def search_audit_events(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    prefer: PreferHeader = None,
) -> Response:
    """Search the audit trail (admins only), newest first."""
    service.require_audit_reader(principal)
    search = service.parse_search(
        request.query_params.multi_items(),
        default_count=settings.default_page_size,
        max_count=settings.max_page_size,
        strict=_strict_handling(prefer),
    )
    bundle = service.search_events(
        session, principal=principal, search=search, base_url=settings.fhir_base_url
    )
    return _fhir_response(bundle)


@router.get("/{event_id}", response_model=None)
def read_audit_event(event_id: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """Read one AuditEvent (admins only)."""
    return _fhir_response(service.read_event(session, principal=principal, event_id=event_id))


@router.api_route("", methods=WRITE_METHODS, response_model=None, include_in_schema=False)
def refuse_type_write() -> Response:
    """Refuse every write: the trail is append-only and Waha alone appends."""
    raise AuditTrailReadOnly()


@router.api_route(
    "/{event_id}", methods=WRITE_METHODS, response_model=None, include_in_schema=False
)
def refuse_instance_write() -> Response:
    """Refuse every write: the trail is append-only and Waha alone appends."""
    raise AuditTrailReadOnly()
