"""HTTP edge of the derivatives: `GET /imaging/binaries/<id>/thumbnail` and `/preview`.

Outside /fhir, so errors are RFC 9457 problem+json: 404 for an unknown Binary
or one that is not a previewable image (PDF, text, ECG waveform, DICOM until
a pixel decoder is shipped), 422 when the content could not be decoded
(retrying will not help), and 202 with Retry-After while the worker has not
made it yet.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fhir_api.context import UNRESTRICTED_ACCESS, AuditNotes, RequestContext
from hub.db import SessionDep
from hub.settings import Settings, request_settings
from imaging_store import service as binary_service
from imaging_store.derivatives import service
from imaging_store.derivatives.models import PENDING, PREVIEW, THUMBNAIL
from imaging_store.derivatives.schemas import DerivativePending
from imaging_store.models import BinaryObjectRow
from imaging_store.storage import BinaryStorage

SettingsDep = Annotated[Settings, Depends(request_settings)]
# The worker usually takes a second or two after the upload.
RETRY_AFTER_SECONDS = 2
# Derived bytes never change; private because they show a patient.
CACHE_CONTROL = "private, max-age=3600"
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/jpeg": {}}, "description": "The derived JPEG."},
    202: {"model": DerivativePending, "description": "Not made yet; retry later."},
}

router = APIRouter(prefix="/imaging/binaries")


async def derivative_storage(settings: SettingsDep) -> BinaryStorage:
    """Return the object store the derived images are in."""
    # Async: no I/O here, and a sync dependency costs a thread hand-off per request.
    return binary_service.binary_storage(settings)


StorageDep = Annotated[BinaryStorage, Depends(derivative_storage)]


def _request_context(request: Request) -> RequestContext:
    access = getattr(request.state, "access", None) or UNRESTRICTED_ACCESS
    client_id = getattr(access, "client_id", "anonymous")
    audit = AuditNotes()
    request.state.audit = audit
    return RequestContext(
        client_id=client_id,
        author=getattr(access, "author", client_id),
        request_id=getattr(request.state, "request_id", "-"),
        unit=getattr(access, "unit", None),
        access=access,
        audit=audit,
    )


def _visible_binary(
    request: Request, session: SessionDep, settings: Settings, binary_id: str
) -> BinaryObjectRow:
    """Load the Binary whose derivative is asked for, if the caller may see it."""
    binary = service.get_visible_binary(
        session,
        binary_id=binary_id,
        context=_request_context(request),
        base_url=settings.fhir_base_url,
    )
    return binary


def _derivative_response(
    binary_id: str, kind: str, download: service.DerivativeDownload | None
) -> Response:
    if download is None:
        pending = DerivativePending(binary=f"Binary/{binary_id}", kind=kind, status=PENDING)
        return JSONResponse(
            pending.model_dump(),
            status_code=202,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Cache-Control": "no-store"},
        )
    return StreamingResponse(
        download.chunks,
        media_type="image/jpeg",
        headers={
            "Content-Length": str(download.size),
            "Cache-Control": CACHE_CONTROL,
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get("/{binary_id}/thumbnail", response_model=None, responses=_RESPONSES)
def read_thumbnail(
    binary_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Response:
    """Stream a Binary's thumbnail (at most 256 px), or 202 while it is being made."""
    binary = _visible_binary(request, session, settings, binary_id)
    download = service.open_derivative(session, storage=storage, binary=binary, kind=THUMBNAIL)
    return _derivative_response(binary.id, THUMBNAIL, download)


@router.get("/{binary_id}/preview", response_model=None, responses=_RESPONSES)
def read_preview(
    binary_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> Response:
    """Stream a Binary's web preview (at most 1600 px), or 202 while it is being made."""
    binary = _visible_binary(request, session, settings, binary_id)
    download = service.open_derivative(session, storage=storage, binary=binary, kind=PREVIEW)
    return _derivative_response(binary.id, PREVIEW, download)
