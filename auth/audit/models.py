"""The audit_event table: one row per audited interaction, never updated or deleted."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, DateTime, Index, Text, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from hub.db import Base

# Every request adds a row, so the GIN indexes take inserts all the time: a
# short pending list keeps lookups from scanning megabytes of unmerged entries.
GIN_STORAGE = {"gin_pending_list_limit": 256}


class AuditEventRow(Base):
    """One FHIR AuditEvent with the columns the admin search filters on."""

    __tablename__ = "audit_event"
    __table_args__ = (
        CheckConstraint("action IN ('C', 'R', 'U', 'D', 'E')", name="action"),
        CheckConstraint("outcome IN ('0', '4', '8', '12')", name="outcome"),
        # Newest first with the id as tie-breaker: the keyset of every search page.
        Index("ix_audit_event_recorded", "recorded", "id"),
        Index("ix_audit_event_agent_who", "agent_who", "recorded"),
        Index(
            "ix_audit_event_patient_ids",
            "patient_ids",
            postgresql_using="gin",
            postgresql_with=GIN_STORAGE,
        ),
        Index(
            "ix_audit_event_entity_refs",
            "entity_refs",
            postgresql_using="gin",
            postgresql_with=GIN_STORAGE,
        ),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    recorded: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    action: Mapped[str] = mapped_column(Text)
    subtype: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    agent_who: Mapped[str | None] = mapped_column(Text)
    agent_client: Mapped[str | None] = mapped_column(Text)
    agent_roles: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    source_address: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    patient_ids: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    entity_refs: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    resource: Mapped[dict[str, Any]] = mapped_column(JSONB)
