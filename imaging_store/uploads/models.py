"""Table of resumable uploads in progress (state only; the bytes are in object storage)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    LargeBinary,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from hub.db import Base

RECEIVING = "receiving"
# Every byte is received; the multipart object is being completed, checked
# and recorded. A failure here (store down) is retried by the next HEAD or PATCH.
ASSEMBLING = "assembling"
COMPLETED = "completed"


class TusUploadRow(Base):
    """One resumable upload: how far it got and where its parts are."""

    __tablename__ = "tus_upload"
    __table_args__ = (
        CheckConstraint("state IN ('receiving', 'assembling', 'completed')", name="state_known"),
        CheckConstraint("upload_offset >= 0 AND upload_offset <= length", name="offset_in_range"),
        Index("ix_tus_upload_expires_at", "expires_at"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    owner_client_id: Mapped[str] = mapped_column(Text)
    length: Mapped[int] = mapped_column(BigInteger)
    # "offset" is an SQL keyword; tus calls it Upload-Offset.
    upload_offset: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    # The raw Upload-Metadata header, echoed by HEAD as the client sent it.
    upload_metadata: Mapped[str | None] = mapped_column(Text)
    security_context: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text, server_default=text("'receiving'"))
    # Chosen at creation: the object is stored (or assembled) straight under the
    # Binary's own key, so completion copies nothing.
    binary_id: Mapped[str] = mapped_column(Text, unique=True)
    # Opened when the first part goes out; an upload whose bytes all arrive
    # before that (most photos) is stored with one PUT and never has one.
    multipart_upload_id: Mapped[str | None] = mapped_column(Text)
    # [{"number": n, "etag": "...", "size": bytes}] of the parts stored so far.
    parts: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'"))
    # Bytes past the last part (fewer than S3's 5 MiB part minimum), staged as an object.
    tail_key: Mapped[str | None] = mapped_column(Text)
    tail_size: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    # The running digests (ContentDigests.state) at upload_offset, so that the
    # next PATCH goes on hashing in whichever API process it reaches. No
    # content but an unfinished hash block's bytes (under 64); cleared when done.
    digest_state: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Set while one PATCH streams; keeps a second PATCH out without holding a
    # transaction open for the whole body.
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
