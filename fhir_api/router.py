"""FHIR R4 REST edge: one interaction table over generic /fhir/{type} paths."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response

from fhir_api import patches, reads, search, service
from fhir_api.capability import capability_statement
from fhir_api.context import UNRESTRICTED_ACCESS, AccessControl, AuditNotes, RequestContext
from fhir_api.errors import MethodNotAllowed, NotAcceptable, UnparsableBody
from fhir_api.scope import search_scope
from fhir_api.validation import JSONObject, parse_json
from fhir_api.writes import EntryRequest, EntryResult, WriteSettings
from hub.db import run_read, session_scope
from hub.errors import FHIR_MEDIA_TYPE, PayloadTooLarge, UnsupportedMediaType
from hub.settings import Settings, request_settings

SettingsDep = Annotated[Settings, Depends(request_settings)]
ACCEPTED_BODY_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")

# What an Accept header or `_format` may ask for: Waha writes FHIR JSON only.
ACCEPTABLE_RANGES = frozenset({"*/*", "application/*", *ACCEPTED_BODY_TYPES})
ACCEPTABLE_FORMATS = frozenset({"json", *ACCEPTED_BODY_TYPES})


async def acceptable_format(request: Request) -> None:
    """Answer 406 when the client accepts no format Waha writes (R4 http.html#mime-type)."""
    wanted = request.query_params.get("_format")
    if wanted is not None:
        # Written unencoded, `application/fhir+json` arrives with a space for its plus.
        wanted = wanted.replace(" ", "+")
        if wanted.split(";")[0].strip().lower() not in ACCEPTABLE_FORMATS:
            raise NotAcceptable(f"_format={wanted}: Waha answers in FHIR JSON only")
        return  # _format overrides Accept
    accept = ",".join(request.headers.getlist("accept"))
    if not accept.strip():
        return
    ranges = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    # `application/*+json` and the like take any JSON, FHIR's included.
    structured = any(r.startswith("application/") and r.endswith("+json") for r in ranges)
    if not (ranges & ACCEPTABLE_RANGES or structured):
        raise NotAcceptable(f"Accept: {accept[:100]}: Waha answers in application/fhir+json only")


public_router = APIRouter(prefix="/fhir", dependencies=[Depends(acceptable_format)])
router = APIRouter(prefix="/fhir", dependencies=[Depends(acceptable_format)])


def fhir_response(
    body: JSONObject | None, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Serialize a FHIR body as application/fhir+json."""
    content = orjson.dumps(body) if body is not None else b""
    return Response(content, status_code=status, media_type=FHIR_MEDIA_TYPE, headers=headers)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def fhir_body(request: Request, settings: SettingsDep) -> bytes:
    """Read a FHIR JSON body, enforcing its media type and size limit."""
    content_type = _content_type(request)
    if content_type not in ACCEPTED_BODY_TYPES:
        raise UnsupportedMediaType(
            f"send application/fhir+json (got {content_type or 'no Content-Type'})"
        )
    return await _limited_body(request, settings)


async def patch_body(request: Request, settings: SettingsDep) -> tuple[str, bytes]:
    """Read a PATCH body and its media type, enforcing both and the size limit."""
    content_type = _content_type(request)
    if content_type not in patches.PATCH_TYPES:
        # XML Patch is R4's third form; FHIRPath Patch comes as a Parameters resource.
        error = UnsupportedMediaType(
            f"patch with a JSON Patch, {patches.JSON_PATCH} (got {content_type or 'nothing'})"
        )
        error.headers["Accept-Patch"] = ", ".join((patches.JSON_PATCH, patches.MERGE_PATCH))
        raise error
    # Parsed in the route's worker thread (`_patch`): a large body must not
    # hold the event loop.
    return content_type, await _limited_body(request, settings)


async def _limited_body(request: Request, settings: Settings) -> bytes:
    limit = settings.max_json_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def request_context(request: Request) -> RequestContext:
    """Describe the caller from what the auth layer attached to the request.

    Async on purpose, like every dependency here: a sync dependency costs a
    thread hand-off per request, which measured more than the query itself.
    """
    state = request.state
    access: AccessControl = getattr(state, "access", None) or UNRESTRICTED_ACCESS
    audit = AuditNotes()
    state.audit = audit
    return RequestContext(
        client_id=getattr(access, "client_id", "anonymous"),
        author=getattr(access, "author", "anonymous"),
        request_id=getattr(state, "request_id", "-"),
        unit=getattr(access, "unit", None),
        access=access,
        audit=audit,
    )


BodyDep = Annotated[bytes, Depends(fhir_body)]
PatchBodyDep = Annotated[tuple[str, bytes], Depends(patch_body)]
ContextDep = Annotated[RequestContext, Depends(request_context)]
PreferHeader = Annotated[str | None, Header(alias="Prefer")]


def write_settings(settings: Settings) -> WriteSettings:
    """Return what the write engine needs from the settings."""
    return WriteSettings(
        base_url=settings.fhir_base_url,
        enforce_referential_integrity=settings.enforce_referential_integrity,
        max_resource_bytes=settings.max_json_body_bytes,
    )


def _prefer(prefer: str | None, preference: str, default: str) -> str:
    # RFC 7240: preferences are separated by commas (or semicolons, as clients send them).
    for part in (prefer or "").replace(",", ";").split(";"):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == preference:
            return value.strip().strip('"')
    return default


def _prefer_return(prefer: str | None) -> str:
    return _prefer(prefer, "return", "representation")


def _strict_handling(prefer: str | None) -> bool:
    return _prefer(prefer, "handling", "lenient").lower() == "strict"


def _resource_headers(result: EntryResult, base_url: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    if result.version_id is not None:
        headers["ETag"] = f'W/"{result.version_id}"'
    if result.last_updated is not None:
        headers["Last-Modified"] = result.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT")
    if result.resource_type and result.resource_id and result.version_id is not None:
        location = (
            f"{base_url}/{result.resource_type}/{result.resource_id}/_history/{result.version_id}"
        )
        if result.status == 201:
            headers["Location"] = location
        elif result.status == 200:
            # A conditional create's match, an update: which version this is.
            headers["Content-Location"] = location
    return headers


def _write_response(result: EntryResult, prefer: str | None, base_url: str) -> Response:
    headers = _resource_headers(result, base_url)
    if result.status == 204:
        return Response(status_code=204, headers=headers)
    wanted = _prefer_return(prefer)
    if wanted == "minimal":
        return Response(status_code=result.status, headers=headers)
    if wanted == "OperationOutcome" or result.resource is None:
        # No resource: a person matched whose record the caller may not read yet.
        message = f"{result.resource_type}/{result.resource_id} version {result.version_id}"
        return fhir_response(service.outcome_for(message), result.status, headers)
    return fhir_response(result.resource, result.status, headers)


def _self_link(request: Request, settings: Settings) -> str:
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{settings.public_base_url.rstrip('/')}{request.url.path}{query}"


def _parse_since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as error:
        raise UnparsableBody(f"_since {value!r} is not a FHIR instant") from error
    if moment.tzinfo is None:
        raise UnparsableBody("_since must carry a time zone")
    return moment


def _page(settings: Settings, count: int | None, cursor: str | None) -> reads.Page:
    size = settings.default_page_size if count is None else count
    return reads.Page(count=max(0, min(size, settings.max_page_size)), cursor=cursor)


def _history(
    request: Request,
    context: RequestContext,
    settings: Settings,
    *,
    resource_type: str | None,
    resource_id: str | None,
    count: int | None,
    cursor: str | None,
    since: str | None,
) -> Response:
    context.access.check("history", resource_type)
    bundle = run_read(
        lambda session: reads.history_bundle(
            session,
            base_url=settings.fhir_base_url,
            resource_type=resource_type,
            resource_id=resource_id,
            since=_parse_since(since),
            page=_page(settings, count, cursor),
            self_link=_self_link(request, settings),
            access=context.access,
            audit=context.audit,
        )
    )
    return fhir_response(bundle)


CountQuery = Annotated[int | None, Query(alias="_count", ge=0)]
CursorQuery = Annotated[str | None, Query(alias="_cursor")]
SinceQuery = Annotated[str | None, Query(alias="_since")]


@public_router.get("/metadata", response_model=None)
def metadata(settings: SettingsDep) -> Response:
    """Answer the CapabilityStatement."""
    return Response(
        _capability_bytes(settings.fhir_base_url, settings.oidc_issuer),
        media_type=FHIR_MEDIA_TYPE,
    )


@public_router.api_route("/metadata", methods=["POST", "PUT", "PATCH", "DELETE"])
def metadata_other_methods() -> Response:
    """Refuse anything but reading the CapabilityStatement."""
    raise MethodNotAllowed("the CapabilityStatement is read with GET")


@functools.cache
def _capability_bytes(base_url: str, issuer: str) -> bytes:
    # ~450 kB of JSON that never changes while the process runs: serialize once.
    return orjson.dumps(capability_statement(base_url, "0.1.0", issuer))


@router.post("", response_model=None)
def bundle_interaction(
    settings: SettingsDep,
    context: ContextDep,
    body: BodyDep,
    prefer: PreferHeader = None,
) -> Response:
    """Process a transaction or batch Bundle."""
    document = parse_json(body)
    if context.audit is not None and isinstance(document, dict) and document.get("type") == "batch":
        context.audit.interaction = "batch"
    with session_scope() as session:
        status, response = service.process_bundle(
            session,
            document,
            context=context,
            settings=write_settings(settings),
            limits=service.BundleLimits(
                max_entries=settings.max_bundle_entries,
                idempotency_wait_seconds=settings.idempotency_wait_seconds,
            ),
            representation=_prefer_return(prefer) == "representation" and prefer is not None,
        )
    return fhir_response(response, status)


@router.get("/_history", response_model=None)
def system_history(
    request: Request,
    context: ContextDep,
    settings: SettingsDep,
    count: CountQuery = None,
    cursor: CursorQuery = None,
    since: SinceQuery = None,
) -> Response:
    """Answer the history of every resource."""
    return _history(
        request,
        context,
        settings,
        resource_type=None,
        resource_id=None,
        count=count,
        cursor=cursor,
        since=since,
    )


@router.get("", response_model=None)
def system_search(
    request: Request, context: ContextDep, settings: SettingsDep, prefer: PreferHeader = None
) -> Response:
    """Search several types at once (`_type=Patient,Observation`)."""
    context.access.check("search", None)
    bundle = run_read(
        lambda session: search.system_search(
            session,
            pairs=request.query_params.multi_items(),
            base_url=settings.fhir_base_url,
            strict=_strict_handling(prefer),
            scope=search_scope(context.access),
        )
    )
    return fhir_response(bundle)


def _search(
    resource_type: str,
    pairs: list[tuple[str, str]],
    context: RequestContext,
    settings: Settings,
    prefer: str | None,
) -> Response:
    context.access.check("search", resource_type)
    bundle = run_read(
        lambda session: search.search(
            session,
            resource_type=resource_type,
            pairs=pairs,
            base_url=settings.fhir_base_url,
            strict=_strict_handling(prefer),
            scope=search_scope(context.access),
        )
    )
    return fhir_response(bundle)


@router.get("/{resource_type}", response_model=None)
def search_type(
    resource_type: str,
    request: Request,
    context: ContextDep,
    settings: SettingsDep,
    prefer: PreferHeader = None,
) -> Response:
    """Search one type."""
    return _search(resource_type, request.query_params.multi_items(), context, settings, prefer)


def _write(entry: EntryRequest, context: RequestContext, settings: Settings) -> EntryResult:
    with session_scope() as session:
        return service.run_interaction(
            session, entry, context=context, settings=write_settings(settings)
        )


@router.post("/{resource_type}", response_model=None)
def create(
    resource_type: str,
    settings: SettingsDep,
    context: ContextDep,
    body: BodyDep,
    prefer: PreferHeader = None,
    if_none_exist: Annotated[str | None, Header(alias="If-None-Exist")] = None,
) -> Response:
    """Create a resource (conditionally with If-None-Exist)."""
    entry = EntryRequest(
        method="POST",
        resource_type=resource_type,
        resource=parse_json(body),
        if_none_exist=if_none_exist,
    )
    result = _write(entry, context, settings)
    return _write_response(result, prefer, settings.fhir_base_url)


@router.put("/{resource_type}", response_model=None)
def conditional_update(
    resource_type: str,
    request: Request,
    settings: SettingsDep,
    context: ContextDep,
    body: BodyDep,
    prefer: PreferHeader = None,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Response:
    """Update the one resource matching the query, or create it."""
    if not request.url.query:
        raise UnparsableBody("a conditional update needs search criteria")
    entry = EntryRequest(
        method="PUT",
        resource_type=resource_type,
        query=request.url.query,
        resource=parse_json(body),
        if_match=if_match,
    )
    result = _write(entry, context, settings)
    return _write_response(result, prefer, settings.fhir_base_url)


def _patch(
    resource_type: str,
    resource_id: str | None,
    query: str | None,
    body: tuple[str, bytes],
    if_match: str | None,
    context: RequestContext,
    settings: Settings,
) -> EntryResult:
    patch = patches.parse_patch(*body)
    with session_scope() as session:
        return patches.patch_resource(
            session,
            resource_type=resource_type,
            resource_id=resource_id,
            query=query,
            patch=patch,
            if_match=if_match,
            context=context,
            settings=write_settings(settings),
        )


@router.patch("/{resource_type}/{resource_id}", response_model=None)
def patch(
    resource_type: str,
    resource_id: str,
    settings: SettingsDep,
    context: ContextDep,
    body: PatchBodyDep,
    prefer: PreferHeader = None,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Response:
    """Patch a resource with a JSON Patch (RFC 6902) or a merge patch (RFC 7386)."""
    result = _patch(resource_type, resource_id, None, body, if_match, context, settings)
    return _write_response(result, prefer, settings.fhir_base_url)


@router.patch("/{resource_type}", response_model=None)
def conditional_patch(
    resource_type: str,
    request: Request,
    settings: SettingsDep,
    context: ContextDep,
    body: PatchBodyDep,
    prefer: PreferHeader = None,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Response:
    """Patch the one resource matching the query (404 for none, 412 for several)."""
    if not request.url.query:
        raise UnparsableBody("a conditional patch needs search criteria")
    query = request.url.query
    result = _patch(resource_type, None, query, body, if_match, context, settings)
    return _write_response(result, prefer, settings.fhir_base_url)


@router.delete("/{resource_type}", response_model=None)
def conditional_delete(
    resource_type: str,
    request: Request,
    settings: SettingsDep,
    context: ContextDep,
) -> Response:
    """Delete the one resource matching the query."""
    if not request.url.query:
        raise UnparsableBody("a conditional delete needs search criteria")
    entry = EntryRequest(method="DELETE", resource_type=resource_type, query=request.url.query)
    result = _write(entry, context, settings)
    return Response(status_code=204, headers=_resource_headers(result, settings.fhir_base_url))


@router.get("/{resource_type}/_history", response_model=None)
def type_history(
    resource_type: str,
    request: Request,
    context: ContextDep,
    settings: SettingsDep,
    count: CountQuery = None,
    cursor: CursorQuery = None,
    since: SinceQuery = None,
) -> Response:
    """Answer the history of every resource of a type."""
    return _history(
        request,
        context,
        settings,
        resource_type=resource_type,
        resource_id=None,
        count=count,
        cursor=cursor,
        since=since,
    )


async def search_form(request: Request) -> list[tuple[str, str]]:
    """Return the parameters of `POST [type]/_search`: the URL's, then the form body's."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if body and content_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded")
    try:
        form = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UnparsableBody("the form body is not UTF-8") from error
    pairs = request.query_params.multi_items()
    pairs.extend(parse_qsl(form, keep_blank_values=True))
    return pairs


SearchFormDep = Annotated[list[tuple[str, str]], Depends(search_form)]


@router.post("/{resource_type}/_search", response_model=None)
def search_type_post(
    resource_type: str,
    context: ContextDep,
    settings: SettingsDep,
    pairs: SearchFormDep,
    prefer: PreferHeader = None,
) -> Response:
    """Search one type with form-encoded parameters."""
    return _search(resource_type, pairs, context, settings, prefer)


@router.get("/{resource_type}/{resource_id}", response_model=None)
def read(
    resource_type: str, resource_id: str, context: ContextDep, settings: SettingsDep
) -> Response:
    """Read the current version of a resource."""
    context.access.check("read", resource_type)
    result = run_read(
        lambda session: reads.read_resource(
            session,
            resource_type=resource_type,
            resource_id=resource_id,
            access=context.access,
            audit=context.audit,
        )
    )
    return fhir_response(result.resource, 200, _resource_headers(result, settings.fhir_base_url))


@router.put("/{resource_type}/{resource_id}", response_model=None)
def update(
    resource_type: str,
    resource_id: str,
    settings: SettingsDep,
    context: ContextDep,
    body: BodyDep,
    prefer: PreferHeader = None,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """Update a resource, or create it under the client's id."""
    entry = EntryRequest(
        method="PUT",
        resource_type=resource_type,
        resource_id=resource_id,
        resource=parse_json(body),
        if_match=if_match,
        if_none_match=if_none_match,
    )
    result = _write(entry, context, settings)
    return _write_response(result, prefer, settings.fhir_base_url)


@router.delete("/{resource_type}/{resource_id}", response_model=None)
def delete(
    resource_type: str,
    resource_id: str,
    settings: SettingsDep,
    context: ContextDep,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Response:
    """Delete a resource; its history stays."""
    entry = EntryRequest(
        method="DELETE", resource_type=resource_type, resource_id=resource_id, if_match=if_match
    )
    result = _write(entry, context, settings)
    return Response(status_code=204, headers=_resource_headers(result, settings.fhir_base_url))


@router.get("/{resource_type}/{resource_id}/_history", response_model=None)
def instance_history(
    resource_type: str,
    resource_id: str,
    request: Request,
    context: ContextDep,
    settings: SettingsDep,
    count: CountQuery = None,
    cursor: CursorQuery = None,
    since: SinceQuery = None,
) -> Response:
    """Answer every version of one resource."""
    return _history(
        request,
        context,
        settings,
        resource_type=resource_type,
        resource_id=resource_id,
        count=count,
        cursor=cursor,
        since=since,
    )


@router.get("/{resource_type}/{resource_id}/_history/{version_id}", response_model=None)
def vread(
    resource_type: str,
    resource_id: str,
    version_id: str,
    context: ContextDep,
    settings: SettingsDep,
) -> Response:
    """Read one version of a resource."""
    context.access.check("vread", resource_type)
    result = run_read(
        lambda session: reads.vread_resource(
            session,
            resource_type=resource_type,
            resource_id=resource_id,
            version_id=version_id,
            access=context.access,
            audit=context.audit,
        )
    )
    return fhir_response(result.resource, 200, _resource_headers(result, settings.fhir_base_url))


@router.get("/Patient/{patient_id}/$everything", response_model=None)
def patient_everything(
    patient_id: str,
    request: Request,
    context: ContextDep,
    settings: SettingsDep,
    count: CountQuery = None,
    cursor: CursorQuery = None,
    since: SinceQuery = None,
    types: Annotated[str | None, Query(alias="_type")] = None,
) -> Response:
    """Answer Patient/$everything: the patient's compartment and what it references."""
    context.access.check("everything", "Patient")
    bundle = run_read(
        lambda session: reads.everything_bundle(
            session,
            base_url=settings.fhir_base_url,
            patient_id=patient_id,
            types=[t for t in types.split(",") if t] if types else None,
            since=_parse_since(since),
            page=_page(settings, count, cursor),
            self_link=_self_link(request, settings),
            access=context.access,
            audit=context.audit,
        )
    )
    return fhir_response(bundle)


# Last: its three free segments would otherwise take `[type]/[id]/_history`.
@router.get("/{compartment}/{compartment_id}/{resource_type}", response_model=None)
def compartment_search(
    compartment: str,
    compartment_id: str,
    resource_type: str,
    request: Request,
    context: ContextDep,
    settings: SettingsDep,
    prefer: PreferHeader = None,
) -> Response:
    """Search one type within a patient's compartment (`Patient/[id]/Observation?...`)."""
    context.access.check("search", resource_type)
    pairs = request.query_params.multi_items()
    bundle = run_read(
        lambda session: search.compartment_search(
            session,
            compartment=compartment,
            compartment_id=compartment_id,
            resource_type=resource_type,
            pairs=pairs,
            base_url=settings.fhir_base_url,
            strict=_strict_handling(prefer),
            scope=search_scope(context.access),
        )
    )
    return fhir_response(bundle)
