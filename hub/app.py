"""The FastAPI application factory: wires every domain's routers and middleware."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from fastapi import FastAPI, Request, Response

from fhir_api.router import public_router as fhir_public_router
from fhir_api.router import router as fhir_router
from hub import db, outbox
from hub.errors import install_error_handlers
from hub.logging import configure_logging
from hub.settings import Settings, get_settings

log = structlog.get_logger()


def _route_template(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the Waha API with its routers, error handlers and request logging."""
    settings = settings or get_settings()
    configure_logging(settings)
    db.configure(settings)
    _connect_outbox_notifier()
    app = FastAPI(
        title="Waha",
        summary="FHIR R4 platform for mobile medical units",
        version="0.1.0",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.dependency_overrides[get_settings] = lambda: settings
    install_error_handlers(app)

    @app.middleware("http")
    async def _request_id_and_access_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        request.state.request_id = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        try:
            response = await call_next(request)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        response.headers["X-Request-ID"] = request_id
        # The route template, never the raw URL: query strings carry patient data.
        log.info(
            "hub.request",
            method=request.method,
            route=_route_template(request),
            status=response.status_code,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            request_id=request_id,
        )
        return response

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        """Tell load balancers the process is up."""
        return {"status": "ok"}

    app.include_router(fhir_public_router)
    app.include_router(fhir_router)
    return app


def _connect_outbox_notifier() -> None:
    from hub.celery_app import enqueue_drain  # noqa: PLC0415 - avoids a Celery import cycle

    outbox.set_notifier(enqueue_drain)
