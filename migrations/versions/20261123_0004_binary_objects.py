"""binary objects: where each Binary's bytes live in object storage

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-23 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Metadata only: the bytes are in object storage, never in PostgreSQL.
    op.create_table(
        "binary_object",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.LargeBinary(), nullable=False),
        sa.Column("sha1", sa.LargeBinary(), nullable=False),
        sa.Column("object_key", sa.Text(), nullable=False),
        sa.Column("owner_client_id", sa.Text(), nullable=False),
        sa.Column("security_context", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_binary_object")),
        sa.UniqueConstraint("object_key", name=op.f("uq_binary_object_object_key")),
    )
    op.execute(
        """
        DO $$
        BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha_app') THEN
            GRANT SELECT, INSERT, UPDATE, DELETE ON binary_object TO waha_app;
          END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    op.drop_table("binary_object")
