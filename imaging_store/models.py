"""Tables of the imaging store: a metadata row per stored Binary (never its bytes), its links."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, LargeBinary, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from hub.db import Base


class BinaryObjectRow(Base):
    """Where a Binary's bytes live in object storage and what they hash to."""

    __tablename__ = "binary_object"

    # The FHIR id of the Binary (a UUID chosen by Waha), also in the object key.
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    content_type: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[bytes] = mapped_column(LargeBinary)
    # R4 Attachment.hash is SHA-1; kept so Media.content.hash can be filled and checked.
    sha1: Mapped[bytes] = mapped_column(LargeBinary)
    object_key: Mapped[str] = mapped_column(Text, unique=True)
    owner_client_id: Mapped[str] = mapped_column(Text)
    security_context: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BinaryLinkRow(Base):
    """A Media or DocumentReference that cites a Binary, and the patient it is about."""

    __tablename__ = "binary_link"
    # A rewritten Media replaces its own links, found by the citing resource.
    __table_args__ = (Index("ix_binary_link_resource", "resource_type", "resource_id"),)

    # No foreign keys: the citing resource lives in the record store, and the
    # retention purge and test truncation empty the tables independently.
    binary_id: Mapped[str] = mapped_column(Text, primary_key=True)
    # Media | DocumentReference
    resource_type: Mapped[str] = mapped_column(Text, primary_key=True)
    resource_id: Mapped[str] = mapped_column(Text, primary_key=True)
    # The patient the citing resource is about (its subject), None when not a Patient:
    # from the first link on, the Binary follows this patient's record.
    patient_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
