"""resumable (tus) uploads in progress

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # State only: the bytes are parts of an S3 multipart upload, never in PostgreSQL.
    op.create_table(
        "tus_upload",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("owner_client_id", sa.Text(), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("upload_offset", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("upload_metadata", sa.Text(), nullable=True),
        sa.Column("security_context", sa.Text(), nullable=True),
        sa.Column("state", sa.Text(), server_default=sa.text("'receiving'"), nullable=False),
        sa.Column("binary_id", sa.Text(), nullable=False),
        sa.Column("multipart_upload_id", sa.Text(), nullable=False),
        sa.Column(
            "parts",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'"),
            nullable=False,
        ),
        sa.Column("tail_key", sa.Text(), nullable=True),
        sa.Column("tail_size", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_token", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('receiving', 'assembling', 'completed')",
            name=op.f("ck_tus_upload_state_known"),
        ),
        sa.CheckConstraint(
            "upload_offset >= 0 AND upload_offset <= length",
            name=op.f("ck_tus_upload_offset_in_range"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tus_upload")),
        sa.UniqueConstraint("binary_id", name=op.f("uq_tus_upload_binary_id")),
    )
    op.create_index("ix_tus_upload_expires_at", "tus_upload", ["expires_at"], unique=False)
    op.execute(
        """
        DO $$
        BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha_app') THEN
            GRANT SELECT, INSERT, UPDATE, DELETE ON tus_upload TO waha_app;
          END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    op.drop_index("ix_tus_upload_expires_at", table_name="tus_upload")
    op.drop_table("tus_upload")
