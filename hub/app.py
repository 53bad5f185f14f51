"""The FastAPI application factory: wires every domain's routers and middleware."""

from __future__ import annotations

import gc
import time
import uuid

import structlog
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth.audit.middleware import AuditMiddleware, denied_recorder
from auth.audit.router import router as audit_router
from auth.middleware import BearerAuthMiddleware, UnitRegistry
from auth.router import router as auth_router
from auth.tokens import TokenValidator
from fhir_api import service as fhir_service
from fhir_api.router import public_router as fhir_public_router
from fhir_api.router import router as fhir_router
from fhir_api.writes import register_preparer
from hub import db, outbox
from hub.errors import install_error_handlers
from hub.logging import configure_logging
from hub.settings import Settings, get_settings
from imaging_store import bundled, media
from imaging_store import service as imaging_service
from imaging_store.derivatives.router import router as derivatives_router
from imaging_store.router import router as imaging_router
from imaging_store.uploads.router import router as uploads_router

log = structlog.get_logger()


class RequestLogMiddleware:
    """Give every request an id and log it by route template, never by raw URL.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware costs a task and a
    stream copy per request, which shows at ingest rates.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw_id = headers.get(b"x-request-id")
        request_id = raw_id.decode("latin-1")[:64] if raw_id else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
            route = scope.get("route")
            # The route template, never the raw URL: query strings carry patient data.
            log.info(
                "hub.request",
                method=scope["method"],
                route=getattr(route, "path", "unmatched"),
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                request_id=request_id,
            )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the Waha API with its routers, error handlers and request logging."""
    settings = settings or get_settings()
    configure_logging(settings)
    db.configure(settings, statement_timeout_ms=settings.database_statement_timeout_ms)
    _connect_outbox_notifier()
    fhir_service.warm_up()
    app = FastAPI(
        title="Waha",
        summary="FHIR R4 platform for mobile medical units",
        version="0.1.0",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )

    app.state.settings = settings
    install_error_handlers(app)

    # Added innermost first. The request log sees (and times) everything; the
    # bearer check runs before the audit, which then knows who is calling.
    app.add_middleware(AuditMiddleware, bind=_session_factory)
    app.add_middleware(
        BearerAuthMiddleware,
        validator=TokenValidator.from_settings(settings),
        units=UnitRegistry(_unit_device_status, ttl_seconds=settings.unit_status_cache_seconds),
        on_denied=denied_recorder(_session_factory),
    )
    app.add_middleware(RequestLogMiddleware)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        """Tell load balancers the process is up."""
        return {"status": "ok"}

    app.include_router(fhir_public_router)
    app.include_router(auth_router)
    # Before fhir_api's generic /fhir/{type} routes: the audit trail has its own store.
    app.include_router(audit_router)
    # Before fhir_api's generic /fhir/{type} routes, which would match Binary too.
    app.include_router(imaging_router)
    app.include_router(uploads_router)
    app.include_router(derivatives_router)
    app.include_router(fhir_router)
    # Media and DocumentReference citing a stored Binary are checked and filled from it.
    linker = media.linker_for(
        settings.fhir_base_url,
        enforce_referential_integrity=settings.enforce_referential_integrity,
    )
    for resource_type in media.LINKED_TYPES:
        register_preparer(resource_type, linker)
    # A Binary with base64 data in a Bundle: bytes to object storage, never to PostgreSQL.
    register_preparer("Binary", bundled.store_for(settings))
    # The bucket is made now if the store answers; if not, on first use.
    imaging_service.prepare_storage(settings)
    _freeze_startup_objects()
    return app


def _freeze_startup_objects() -> None:
    """Move what start-up built out of the garbage collector's reach.

    The R4 definitions, models and compiled extractors are ~400,000 objects
    that live as long as the process; a full collection walked them all
    (100-200 ms with every request on the worker waiting). Frozen, only
    objects made by requests are scanned. Once per process: the first app's
    start-up is the process's.
    """
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


def _session_factory() -> sessionmaker[Session]:
    return db.session_factory


def _unit_device_status(unit: str) -> str | None:
    """Return the status of a unit's Device (`Device/<unit>`), None when it has none."""
    return db.run_read(lambda session: fhir_service.device_status(session, unit))


def _connect_outbox_notifier() -> None:
    from hub.celery_app import enqueue_drain  # noqa: PLC0415 - avoids a Celery import cycle

    outbox.set_notifier(enqueue_drain)
