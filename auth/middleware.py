"""Bearer authentication for every API route except the few public documents.

A pure ASGI middleware, so that a route added later is protected without
anyone remembering to: `/fhir` and `/imaging` need a valid access token unless
the path is public (CapabilityStatement, SMART configuration). It puts the
`Principal` and its `Access` on the request state, and refuses revoked units.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio.to_thread
import orjson
import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from auth.errors import MissingToken, UnitRevoked
from auth.policy import access_for
from auth.tokens import Principal, TokenValidator
from hub.errors import Issue, WahaError, operation_outcome

log = structlog.get_logger()

PROTECTED_PREFIXES = ("/fhir", "/imaging")
PUBLIC_PATHS = frozenset(
    {"/fhir/metadata", "/fhir/.well-known/smart-configuration", "/fhir/.well-known/udap"}
)
FHIR_MEDIA_TYPE = b"application/fhir+json"
PROBLEM_MEDIA_TYPE = b"application/problem+json"
# Validated tokens are kept until they expire (300 s in the realm): a unit
# posting bundles pays the signature check once, not per request.
TOKEN_CACHE_SIZE = 4096

UnitStatusLookup = Callable[[str], str | None]
DeniedHook = Callable[[Scope, WahaError], Awaitable[None]]


@dataclass(slots=True)
class _CachedUnit:
    status: str | None
    checked_at: float


class UnitRegistry:
    """The status of each unit's Device, cached for a few seconds per unit.

    An administrator revokes a unit by setting its `Device.status` to inactive;
    the cache bounds how long its tokens keep working (DESIGN.md: within 30 s).
    """

    def __init__(self, lookup: UnitStatusLookup, *, ttl_seconds: float = 10.0) -> None:
        self._lookup = lookup
        self.ttl_seconds = ttl_seconds
        self._cache: dict[str, _CachedUnit] = {}
        self._lock = threading.Lock()

    def cached(self, unit: str) -> _CachedUnit | None:
        """Return the cached status of a unit while it is fresh."""
        entry = self._cache.get(unit)
        if entry is not None and time.monotonic() - entry.checked_at < self.ttl_seconds:
            return entry
        return None

    def refresh(self, unit: str) -> str | None:
        """Look the unit's Device status up now (blocking) and cache it."""
        status = self._lookup(unit)
        with self._lock:
            self._cache[unit] = _CachedUnit(status, time.monotonic())
        return status


class BearerAuthMiddleware:
    """Require a valid bearer token on protected paths; attach Principal and Access."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        validator: TokenValidator,
        units: UnitRegistry,
        on_denied: DeniedHook | None = None,
    ) -> None:
        self.app = app
        self.validator = validator
        self.units = units
        self.on_denied = on_denied
        self._tokens: OrderedDict[str, Principal] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        # OPTIONS only describes the server (tus capabilities, CORS preflight,
        # which browsers send without credentials).
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            principal = await self._authenticate(scope)
        except WahaError as error:
            if self.on_denied is not None:
                await self.on_denied(scope, error)
            await _send_error(scope, send, error)
            return
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["access"] = access_for(principal)
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> Principal:
        token = _bearer_token(scope)
        principal = self._tokens.get(token)
        if principal is None or principal.expires_at <= time.time():
            # Off the event loop: a key-set fetch is network I/O.
            principal = await anyio.to_thread.run_sync(self.validator.validate, token)
            self._remember(token, principal)
        if principal.has_role("unit"):
            unit = principal.unit or principal.client_id
            cached = self.units.cached(unit)
            status = (
                cached.status
                if cached is not None
                else await anyio.to_thread.run_sync(self.units.refresh, unit)
            )
            if status is not None and status != "active":
                raise UnitRevoked(principal)
        return principal

    def _remember(self, token: str, principal: Principal) -> None:
        self._tokens[token] = principal
        while len(self._tokens) > TOKEN_CACHE_SIZE:
            self._tokens.popitem(last=False)


def _protected(path: str) -> bool:
    if path in PUBLIC_PATHS:
        return False
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PROTECTED_PREFIXES)


def _bearer_token(scope: Scope) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise MissingToken("send the access token as `Authorization: Bearer <token>`")
            return str(token.strip())
    raise MissingToken()


async def _send_error(scope: Scope, send: Send, error: WahaError) -> None:
    """Answer an authentication failure: OperationOutcome under /fhir, problem+json elsewhere."""
    path = str(scope["path"])
    issues: list[Issue] = error.issues
    if path == "/fhir" or path.startswith("/fhir/"):
        body = orjson.dumps(operation_outcome(issues))
        media_type = FHIR_MEDIA_TYPE
    else:
        body = orjson.dumps(
            {
                "type": f"https://waha.health/problems/{error.slug}",
                "title": error.slug.replace("-", " ").capitalize(),
                "status": error.status,
                "detail": "; ".join(issue.diagnostics for issue in issues),
                "instance": path,
            }
        )
        media_type = PROBLEM_MEDIA_TYPE
    headers = [
        (b"content-type", media_type),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
