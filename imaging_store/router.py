"""HTTP edge of the imaging store: `POST /fhir/Binary` and `GET /fhir/Binary/<id>`.

Included before fhir_api's generic `/fhir/{type}` routes, which would
otherwise take these paths and keep the bytes in PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.orm import Session

from fhir_api.context import UNRESTRICTED_ACCESS, AuditNotes
from hub.db import SessionDep
from hub.errors import FHIR_MEDIA_TYPE, BadRequest
from hub.settings import Settings, request_settings
from imaging_store import media, presign, service
from imaging_store.errors import BinaryImmutable, BinaryTooLarge, InvalidBinary
from imaging_store.sniffing import PDF
from imaging_store.storage import BinaryStorage

SettingsDep = Annotated[Settings, Depends(request_settings)]
FHIR_JSON_TYPES = ("application/fhir+json", "application/json+fhir", "application/json")
# Room for the JSON around base64 `data` (which is 4/3 of the bytes).
JSON_ENVELOPE_BYTES = 64 * 1024

router = APIRouter(prefix="/fhir/Binary")


async def upload_caller(request: Request) -> service.Caller:
    """Describe the caller from what the auth layer attached to the request."""
    access = getattr(request.state, "access", None) or UNRESTRICTED_ACCESS
    client_id = getattr(access, "client_id", "anonymous")
    audit = AuditNotes()
    request.state.audit = audit
    return service.Caller(
        access=access,
        client_id=client_id,
        author=getattr(access, "author", client_id),
        request_id=getattr(request.state, "request_id", "-"),
        audit=audit,
        unit=getattr(access, "unit", None),
    )


async def storage(settings: SettingsDep) -> BinaryStorage:
    """Return the object store of these settings."""
    return service.binary_storage(settings)


@dataclass(slots=True)
class ReceivedUpload:
    """An upload's decoded bytes and, when it came as FHIR JSON, its other elements."""

    content: service.BinaryContent
    resource: service.JSONObject | None


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BinaryTooLarge(f"the body is over the {limit}-byte limit")


async def received_upload(
    request: Request,
    settings: SettingsDep,
    content_digest: Annotated[str | None, Header(alias="Content-Digest")] = None,
) -> AsyncIterator[ReceivedUpload]:
    """Read an upload body (raw bytes or FHIR JSON), checking size and Content-Digest."""
    wanted_digests = service.parse_content_digest(content_digest)
    limit = settings.max_binary_bytes
    content: service.BinaryContent | None = None
    resource: service.JSONObject | None = None
    try:
        if _media_type(request.headers.get("content-type")) in FHIR_JSON_TYPES:
            json_limit = limit * 4 // 3 + JSON_ENVELOPE_BYTES
            _check_declared_length(request, json_limit)
            digests = service.MessageDigests(wanted_digests)
            body = bytearray()
            async for chunk in request.stream():
                if len(body) + len(chunk) > json_limit:
                    raise BinaryTooLarge(f"the content is over the {limit}-byte limit")
                digests.feed(chunk)
                body += chunk
            digests.verify()
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise InvalidBinary("the body is not JSON") from None
            resource, content = service.binary_from_json(document, limit=limit)
        else:
            _check_declared_length(request, limit)
            content = service.BinaryContent(limit=limit)
            # The body is the content: its SHA-256 is computed once, for both.
            digests = service.MessageDigests(wanted_digests, content=content)
            async for chunk in request.stream():
                digests.feed(chunk)
                content.feed(chunk)
            digests.verify()
        if content.size == 0:
            raise BadRequest("the upload is empty")
        yield ReceivedUpload(content, resource)
    finally:
        # The spool (memory or a temporary file) goes whatever the outcome.
        if content is not None:
            content.close()


CallerDep = Annotated[service.Caller, Depends(upload_caller)]
StorageDep = Annotated[BinaryStorage, Depends(storage)]
UploadDep = Annotated[ReceivedUpload, Depends(received_upload)]


def _version_headers(version_id: int, last_updated_http: str) -> dict[str, str]:
    return {"ETag": f'W/"{version_id}"', "Last-Modified": last_updated_http}


def _http_date(download_or_stored: service.BinaryDownload | service.StoredBinary) -> str:
    return download_or_stored.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT")


@router.post("", response_model=None, status_code=201)
def upload_binary(
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    binary_storage: StorageDep,
    upload: UploadDep,
    security_context: Annotated[str | None, Header(alias="X-Security-Context")] = None,
    prefer: Annotated[str | None, Header(alias="Prefer")] = None,
) -> Response:
    """Store an uploaded Binary; its bytes go to object storage only."""
    stored = service.record_upload(
        session,
        storage=binary_storage,
        content=upload.content,
        caller=caller,
        base_url=settings.fhir_base_url,
        enforce_referential_integrity=settings.enforce_referential_integrity,
        security_context=security_context,
        resource=upload.resource,
    )
    # An upload naming its patient gets its Media at once (DESIGN.md "the Media").
    media_id = media.record_media_for_upload(
        session,
        stored.row,
        caller,
        settings.fhir_base_url,
        enforce_referential_integrity=settings.enforce_referential_integrity,
    )
    if caller.audit is not None:
        context_type, _, context_id = (stored.row.security_context or "").partition("/")
        caller.audit.touched(
            "Binary", stored.id, [context_id] if context_type == "Patient" and context_id else []
        )
    headers = _version_headers(stored.version_id, _http_date(stored))
    headers["Location"] = (
        f"{settings.fhir_base_url}/Binary/{stored.id}/_history/{stored.version_id}"
    )
    if media_id is not None:
        headers["Waha-Media"] = f"Media/{media_id}"
    if prefer is not None and "return=minimal" in prefer.replace(" ", "").lower():
        return Response(status_code=201, headers=headers)
    return Response(
        orjson.dumps(stored.resource), status_code=201, media_type=FHIR_MEDIA_TYPE, headers=headers
    )


def _wants_resource(accept: str | None, format_parameter: str | None) -> bool:
    if format_parameter is not None:
        return _media_type(format_parameter) in (*FHIR_JSON_TYPES, "json")
    accepted = {_media_type(part) for part in (accept or "").split(",")}
    return bool(accepted & set(FHIR_JSON_TYPES))


@router.get("/{binary_id}", response_model=None)
def read_binary(
    binary_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    binary_storage: StorageDep,
    accept: Annotated[str | None, Header(alias="Accept")] = None,
) -> Response:
    """Stream a Binary's bytes, or with Accept: application/fhir+json its resource."""
    as_resource = _wants_resource(accept, request.query_params.get("_format"))
    return _download(session, settings, caller, binary_storage, binary_id, as_resource=as_resource)


@router.get("/{binary_id}/_history/{version_id}", response_model=None)
def vread_binary(
    binary_id: str,
    version_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    binary_storage: StorageDep,
    accept: Annotated[str | None, Header(alias="Accept")] = None,
) -> Response:
    """Serve a version of a Binary, as its upload's Location names it: bytes or resource."""
    as_resource = _wants_resource(accept, request.query_params.get("_format"))
    return _download(
        session,
        settings,
        caller,
        binary_storage,
        binary_id,
        as_resource=as_resource,
        version=version_id,
    )


def _download(
    session: Session,
    settings: Settings,
    caller: service.Caller,
    binary_storage: BinaryStorage,
    binary_id: str,
    *,
    as_resource: bool,
    version: str | None = None,
) -> Response:
    if settings.binary_download_redirect and not as_resource:
        # MinIO serves the bytes itself, from a URL that expires within 5 minutes.
        redirect = presign.redirect_binary(
            session,
            storage=binary_storage,
            binary_id=binary_id,
            caller=caller,
            base_url=settings.fhir_base_url,
            expires_seconds=settings.binary_redirect_seconds,
            public_endpoint=settings.s3_public_endpoint,
            public_secure=settings.s3_public_secure,
            version=version,
        )
        headers = _version_headers(
            redirect.version_id, redirect.last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT")
        )
        headers.update({"Location": redirect.url, "Cache-Control": "no-store"})
        return Response(status_code=307, headers=headers)
    opener = service.open_binary_resource if as_resource else service.open_binary
    download = opener(
        session,
        storage=binary_storage,
        binary_id=binary_id,
        caller=caller,
        base_url=settings.fhir_base_url,
        version=version,
    )
    headers = _version_headers(download.version_id, _http_date(download))
    # Never let a browser guess a type, nor run what it renders.
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    if not as_resource:
        headers["Content-Length"] = str(download.size)
        if download.content_type == PDF:
            headers["Content-Disposition"] = f'attachment; filename="{download.id}.pdf"'
    return StreamingResponse(download.chunks, media_type=download.content_type, headers=headers)


@router.put("/{binary_id}", response_model=None)
def update_binary(binary_id: str) -> Response:
    """Refuse to replace stored bytes: a new upload makes a new Binary."""
    raise BinaryImmutable(f"Binary/{binary_id} cannot be updated; upload a new Binary")


@router.put("", response_model=None)
def conditional_update_binary() -> Response:
    """Refuse conditional updates too: they would write `data` into the record store."""
    raise BinaryImmutable("a Binary cannot be updated; upload a new Binary")


@router.delete("/{binary_id}", response_model=None)
def delete_binary(
    binary_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> Response:
    """Delete a Binary; its history stays and its object awaits the retention purge."""
    version_id, last_updated = service.delete_binary(
        session, binary_id=binary_id, caller=caller, base_url=settings.fhir_base_url
    )
    headers = {"ETag": f'W/"{version_id}"'} if version_id is not None else {}
    if last_updated is not None:
        headers["Last-Modified"] = last_updated.strftime("%a, %d %b %Y %H:%M:%S GMT")
    return Response(status_code=204, headers=headers)
