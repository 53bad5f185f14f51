"""binary links: which Media or DocumentReference cites a Binary, for which patient

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-23 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Written with the citing resource, in its transaction: from then on the
    # Binary follows the patient's record (DESIGN.md "Access rules").
    op.create_table(
        "binary_link",
        sa.Column("binary_id", sa.Text(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("resource_id", sa.Text(), nullable=False),
        sa.Column("patient_id", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "binary_id", "resource_type", "resource_id", name=op.f("pk_binary_link")
        ),
    )
    op.create_index(
        "ix_binary_link_resource", "binary_link", ["resource_type", "resource_id"], unique=False
    )
    op.execute(
        """
        DO $$
        BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha_app') THEN
            GRANT SELECT, INSERT, UPDATE, DELETE ON binary_link TO waha_app;
          END IF;
        END
        $$
        """
    )


def downgrade() -> None:
    op.drop_index("ix_binary_link_resource", table_name="binary_link")
    op.drop_table("binary_link")
