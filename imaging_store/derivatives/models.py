"""Tables of the derivatives: one row per (Binary, kind of derivative)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from hub.db import Base

THUMBNAIL = "thumbnail"
PREVIEW = "preview"
QUALITY_CHECK = "quality-check"
IMAGING_STUDY = "imaging-study"

PENDING = "pending"
READY = "ready"
FAILED = "failed"
NOT_APPLICABLE = "not-applicable"


class BinaryDerivativeRow(Base):
    """What was made from one Binary: a preview image, a quality verdict or a study."""

    __tablename__ = "binary_derivative"

    # No foreign key to binary_object: derivatives are written by the worker
    # after the upload committed, and the retention purge and test truncation
    # empty the two tables independently.
    binary_id: Mapped[str] = mapped_column(Text, primary_key=True)
    # thumbnail | preview | quality-check | imaging-study
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    # pending (an ImagingStudy waiting for its patient) | ready | failed | not-applicable
    status: Mapped[str] = mapped_column(Text)
    # derivatives/<binary id>/<kind>.jpg: the Binary's id only, never patient data.
    object_key: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    size: Mapped[int | None] = mapped_column(BigInteger)
    quality_code: Mapped[str | None] = mapped_column(Text)
    # A stable reason code (never a message that could quote the content).
    error: Mapped[str | None] = mapped_column(Text)
    # The ImagingStudy extracted from a DICOM file, kept until its patient is known.
    imaging_study: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    imaging_study_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
