"""audit events (append-only for the application role)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GIN_STORAGE = {"gin_pending_list_limit": 256}


def upgrade() -> None:
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("recorded", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("subtype", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("agent_who", sa.Text(), nullable=True),
        sa.Column("agent_client", sa.Text(), nullable=True),
        sa.Column(
            "agent_roles",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.Column("source_address", sa.Text(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column(
            "patient_ids",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.Column(
            "entity_refs",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        sa.Column("resource", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.CheckConstraint(
            "action IN ('C', 'R', 'U', 'D', 'E')", name=op.f("ck_audit_event_action")
        ),
        sa.CheckConstraint("outcome IN ('0', '4', '8', '12')", name=op.f("ck_audit_event_outcome")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
    )
    op.create_index("ix_audit_event_recorded", "audit_event", ["recorded", "id"], unique=False)
    op.create_index(
        "ix_audit_event_agent_who", "audit_event", ["agent_who", "recorded"], unique=False
    )
    op.create_index(
        "ix_audit_event_patient_ids",
        "audit_event",
        ["patient_ids"],
        unique=False,
        postgresql_using="gin",
        postgresql_with=GIN_STORAGE,
    )
    op.create_index(
        "ix_audit_event_entity_refs",
        "audit_event",
        ["entity_refs"],
        unique=False,
        postgresql_using="gin",
        postgresql_with=GIN_STORAGE,
    )
    # The trail is append-only for the application (DESIGN.md "Access rules"):
    # even a compromised API process cannot rewrite or erase what it did.
    op.execute(
        """
        DO $$
        BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha_app') THEN
            REVOKE ALL ON audit_event FROM waha_app;
            GRANT SELECT, INSERT ON audit_event TO waha_app;
          END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    op.drop_index("ix_audit_event_entity_refs", table_name="audit_event", postgresql_using="gin")
    op.drop_index("ix_audit_event_patient_ids", table_name="audit_event", postgresql_using="gin")
    op.drop_index("ix_audit_event_agent_who", table_name="audit_event")
    op.drop_index("ix_audit_event_recorded", table_name="audit_event")
    op.drop_table("audit_event")
