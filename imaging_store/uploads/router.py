"""HTTP edge of resumable uploads: tus 1.0.0 at `/imaging/uploads`.

Core protocol plus the creation, creation-with-upload, termination, checksum
and expiration extensions. Errors keep tus's status codes (409, 412, 413, 415, 423, 460)
with problem+json bodies; every answer carries `Tus-Resumable`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio.from_thread
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from hub.db import SessionDep, session_scope
from hub.errors import WahaError
from hub.settings import Settings, request_settings
from imaging_store.router import upload_caller
from imaging_store.service import Caller, binary_storage
from imaging_store.storage import BinaryStorage
from imaging_store.uploads import service
from imaging_store.uploads.errors import (
    TUS_VERSION,
    NotOffsetOctetStream,
    TusVersionUnsupported,
    UploadInterrupted,
)

PREFIX = "/imaging/uploads"
TUS_EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
BINARY_HEADER = "Waha-Binary"


class TusRoute(APIRoute):
    """A route whose every answer, errors included, says which tus version it speaks."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap the handler so its responses and errors carry Tus-Resumable."""
        handler = super().get_route_handler()

        async def tus_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except WahaError as error:
                # Not handled here: hub/errors.py renders it, with these headers.
                error.headers["Tus-Resumable"] = TUS_VERSION
                raise
            response.headers["Tus-Resumable"] = TUS_VERSION
            return response

        return tus_handler


router = APIRouter(prefix=PREFIX, route_class=TusRoute)

SettingsDep = Annotated[Settings, Depends(request_settings)]
CallerDep = Annotated[Caller, Depends(upload_caller)]


def storage(settings: SettingsDep) -> BinaryStorage:
    """Return the object store of these settings."""
    return binary_storage(settings)


StorageDep = Annotated[BinaryStorage, Depends(storage)]


def tus_resumable(
    version: Annotated[str | None, Header(alias="Tus-Resumable")] = None,
) -> None:
    """Refuse requests of a tus version Waha does not speak (every request but OPTIONS)."""
    if version != TUS_VERSION:
        raise TusVersionUnsupported(f"Tus-Resumable must be {TUS_VERSION}")


TusRequest = Depends(tus_resumable)


def _http_date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _status_headers(status: service.UploadStatus) -> dict[str, str]:
    headers = {"Upload-Offset": str(status.offset), "Cache-Control": "no-store"}
    if status.expires_at is not None:
        headers["Upload-Expires"] = _http_date(status.expires_at)
    if status.binary_id is not None:
        headers[BINARY_HEADER] = f"Binary/{status.binary_id}"
    return headers


# What one hand-over from the event loop to the PATCH's worker thread carries at
# most: the server receives a body in pieces of up to 64 KiB, and a hand-over per
# piece cost more CPU than hashing it. On a slow link a block goes after a few
# seconds, whatever its size, so the PATCH keeps renewing its lease.
BODY_BLOCK_BYTES = 1024 * 1024
BODY_BLOCK_SECONDS = 2.0


def _body_chunks(request: Request) -> Iterator[bytes]:
    """Pull a request body into this worker thread in blocks of at most 1 MiB, never whole."""
    stream: AsyncIterator[bytes] = request.stream()

    async def next_block() -> tuple[bytes, str]:
        pieces: list[bytes] = []
        size = 0
        state = "more"
        deadline = time.monotonic() + BODY_BLOCK_SECONDS
        while size < BODY_BLOCK_BYTES and (not pieces or time.monotonic() < deadline):
            try:
                piece = await anext(stream)
            except StopAsyncIteration:
                state = "end"
                break
            except ClientDisconnect:
                # What arrived before the drop is kept (tus resumes after it).
                state = "dropped"
                break
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces), state

    while True:
        block, state = anyio.from_thread.run(next_block)
        if block:
            yield block
        if state == "dropped":
            raise UploadInterrupted("the connection closed before the body ended")
        if state == "end":
            return


@router.options("", response_model=None, status_code=204)
def describe_server(settings: SettingsDep) -> Response:
    """Tell clients the tus version, extensions, size limit and checksum algorithms."""
    return Response(
        status_code=204,
        headers={
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": TUS_EXTENSIONS,
            "Tus-Max-Size": str(settings.max_tus_upload_bytes),
            "Tus-Checksum-Algorithm": ",".join(service.CHECKSUM_ALGORITHMS),
        },
    )


def _offset_octet_stream(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == OFFSET_OCTET_STREAM


@router.post("", response_model=None, status_code=201, dependencies=[TusRequest])
def create_upload(
    request: Request,
    settings: SettingsDep,
    caller: CallerDep,
    upload_storage: StorageDep,
    upload_length: Annotated[str | None, Header(alias="Upload-Length")] = None,
    upload_defer_length: Annotated[str | None, Header(alias="Upload-Defer-Length")] = None,
    upload_metadata: Annotated[str | None, Header(alias="Upload-Metadata")] = None,
    content_type: Annotated[str | None, Header(alias="Content-Type")] = None,
    upload_checksum: Annotated[str | None, Header(alias="Upload-Checksum")] = None,
    content_length: Annotated[str | None, Header(alias="Content-Length")] = None,
) -> Response:
    """Start a resumable upload (tus creation), with its first bytes if the body has them."""
    # As tus servers do, a body is upload data only when typed as such; a
    # sized body of any other type is refused rather than silently dropped.
    carries_data = _offset_octet_stream(content_type) and content_length != "0"
    if not carries_data and content_length not in (None, "0"):
        raise NotOffsetOctetStream(f"a creation body must be {OFFSET_OCTET_STREAM}")
    upload_settings = service.upload_settings(settings)
    if not carries_data:
        with session_scope() as session:
            status = service.create_upload(
                session,
                caller=caller,
                upload_length=upload_length,
                defer_length=upload_defer_length,
                upload_metadata=upload_metadata,
                settings=upload_settings,
                now=datetime.now(UTC),
            )
        location = f"{PREFIX}/{status.id}"
    else:
        # creation-with-upload: a photo goes whole in one request, one round
        # trip less on a slow mobile link. The upload is committed, leased to
        # this request, before any byte is taken: its row then says how far
        # the bytes got, whatever happens to them.
        with session_scope() as session:
            held = service.create_upload_with_bytes(
                session,
                caller=caller,
                upload_length=upload_length,
                defer_length=upload_defer_length,
                upload_metadata=upload_metadata,
                upload_checksum=upload_checksum,
                content_length=content_length,
                settings=upload_settings,
                now=datetime.now(UTC),
            )
        location = f"{PREFIX}/{held.status.id}"
        try:
            status = service.receive_first_bytes(
                storage=upload_storage,
                held=held,
                caller=caller,
                chunks=_body_chunks(request),
                settings=upload_settings,
            )
        except WahaError as error:
            # The upload exists: the client resumes it by HEAD at this URL.
            error.headers["Location"] = location
            raise
    headers = _status_headers(status)
    # Relative, so it holds behind any proxy or port; tus clients resolve it
    # against the creation URL.
    headers["Location"] = location
    return Response(status_code=201, headers=headers)


@router.head("/{upload_id}", response_model=None, dependencies=[TusRequest])
def read_upload_offset(
    upload_id: str, settings: SettingsDep, caller: CallerDep, upload_storage: StorageDep
) -> Response:
    """Answer an upload's offset and length (and its Binary once finished)."""
    status = service.describe_upload(
        storage=upload_storage,
        upload_id=upload_id,
        caller=caller,
        settings=service.upload_settings(settings),
        now=datetime.now(UTC),
    )
    headers = _status_headers(status)
    headers["Upload-Length"] = str(status.length)
    if status.upload_metadata is not None:
        headers["Upload-Metadata"] = status.upload_metadata
    return Response(status_code=200, headers=headers)


@router.patch("/{upload_id}", response_model=None, dependencies=[TusRequest])
def append_to_upload(
    upload_id: str,
    request: Request,
    settings: SettingsDep,
    caller: CallerDep,
    upload_storage: StorageDep,
    content_type: Annotated[str | None, Header(alias="Content-Type")] = None,
    upload_offset: Annotated[str | None, Header(alias="Upload-Offset")] = None,
    upload_checksum: Annotated[str | None, Header(alias="Upload-Checksum")] = None,
    content_length: Annotated[str | None, Header(alias="Content-Length")] = None,
) -> Response:
    """Append a PATCH body at the upload's offset; the last one makes the Binary."""
    if not _offset_octet_stream(content_type):
        raise NotOffsetOctetStream(f"a PATCH body must be {OFFSET_OCTET_STREAM}")
    status = service.receive_chunk(
        storage=upload_storage,
        upload_id=upload_id,
        caller=caller,
        upload_offset=upload_offset,
        upload_checksum=upload_checksum,
        content_length=content_length,
        chunks=_body_chunks(request),
        settings=service.upload_settings(settings),
        now=datetime.now(UTC),
    )
    return Response(status_code=204, headers=_status_headers(status))


@router.delete("/{upload_id}", response_model=None, dependencies=[TusRequest])
def terminate_upload(
    upload_id: str, session: SessionDep, caller: CallerDep, upload_storage: StorageDep
) -> Response:
    """Drop an unfinished upload and its stored parts (tus termination)."""
    service.terminate_upload(
        session,
        storage=upload_storage,
        upload_id=upload_id,
        caller=caller,
        now=datetime.now(UTC),
    )
    return Response(status_code=204)
