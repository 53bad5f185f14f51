"""leaner index tables: no surrogate keys on date/quantity rows, one history time index

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Measured: each extra index or sequence on these write-hot tables costs
    # every ingested resource; rows are found only through the lookup indexes.
    op.drop_index("ix_fhir_resource_version_type_updated", table_name="fhir_resource_version")
    op.drop_constraint("pk_fhir_search_date", "fhir_search_date", type_="primary")
    op.drop_column("fhir_search_date", "row_id")
    op.drop_constraint("pk_fhir_search_quantity", "fhir_search_quantity", type_="primary")
    op.drop_column("fhir_search_quantity", "row_id")


def downgrade() -> None:
    op.add_column(
        "fhir_search_quantity",
        sa.Column("row_id", sa.BigInteger(), sa.Identity(), nullable=False),
    )
    op.create_primary_key("pk_fhir_search_quantity", "fhir_search_quantity", ["row_id"])
    op.add_column(
        "fhir_search_date", sa.Column("row_id", sa.BigInteger(), sa.Identity(), nullable=False)
    )
    op.create_primary_key("pk_fhir_search_date", "fhir_search_date", ["row_id"])
    op.create_index(
        "ix_fhir_resource_version_type_updated",
        "fhir_resource_version",
        ["resource_type", "last_updated"],
    )
