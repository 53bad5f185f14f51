"""binary derivatives: previews, photo quality checks and DICOM studies made from Binaries

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The derived images live in object storage; only their state is kept here.
    op.create_table(
        "binary_derivative",
        sa.Column("binary_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("object_key", sa.Text(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("quality_code", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("imaging_study", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("imaging_study_id", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("binary_id", "kind", name=op.f("pk_binary_derivative")),
    )
    op.execute(
        """
        DO $$
        BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha_app') THEN
            GRANT SELECT, INSERT, UPDATE, DELETE ON binary_derivative TO waha_app;
          END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    op.drop_table("binary_derivative")
