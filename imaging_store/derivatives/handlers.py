"""Outbox handler: derive previews, quality and studies from every created Binary."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache

from sqlalchemy.orm import Session

from fhir_api.writes import RESOURCE_CHANGED, WriteSettings
from hub.outbox import Handler, OutboxEvent
from hub.settings import Settings, get_settings
from imaging_store import media, retention
from imaging_store import service as binary_service
from imaging_store.derivatives import service
from imaging_store.sniffing import DICOM

TOPIC = RESOURCE_CHANGED


def resource_changed_handler(settings: Settings) -> Handler:
    """Return the handler of `fhir.resource_changed` events for these settings."""
    storage = binary_service.binary_storage(settings)
    write_settings = WriteSettings(
        base_url=settings.fhir_base_url,
        enforce_referential_integrity=settings.enforce_referential_integrity,
    )

    def handle(session: Session, event: OutboxEvent) -> None:
        """Make the derivatives of the Binary the event says was created."""
        # One event per written resource: {type, id, version, action}. Binary
        # content never changes (updates are refused), so only creation counts.
        payload = event.payload
        if payload.get("type") in media.LINKED_TYPES and payload.get("action") == "delete":
            # The Binaries only it cited become unreachable; retention purges them.
            retention.on_media_deleted(
                session,
                resource_type=str(payload["type"]),
                resource_id=str(payload["id"]),
                deleted_version=int(payload["version"]),
                now=datetime.now(UTC),
                base_url=write_settings.base_url,
            )
            return
        if payload.get("type") in media.LINKED_TYPES:
            media.complete_links_of(
                session, str(payload["type"]), str(payload["id"]), write_settings=write_settings
            )
            return
        if payload.get("type") != "Binary" or payload.get("action") != "create":
            return
        binary_id = str(payload["id"])
        content_type = service.make_derivatives(
            session, storage=storage, binary_id=binary_id, write_settings=write_settings
        )
        # A Media may cite the Binary before its checks ran: bring it the verdict and study.
        # Only a photo has a verdict and only a DICOM file a study, so other
        # content skips both look-ups (and the row lock the study step takes).
        if content_type in service.PHOTO_TYPES:
            media.apply_quality_to_linked_media(session, binary_id, write_settings=write_settings)
        elif content_type == DICOM:
            media.create_linked_imaging_study(session, binary_id, write_settings=write_settings)

    return handle


@cache
def _process_handler() -> Handler:
    return resource_changed_handler(get_settings())


def handle_resource_changed(session: Session, event: OutboxEvent) -> None:
    """Make the derivatives of a created Binary, with the process's settings."""
    _process_handler()(session, event)
