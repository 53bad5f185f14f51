"""date-range GiST index for date prefixes; short GIN pending lists

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 12:25:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GIN_INDEXES = ("ix_fhir_resource_tokens", "ix_fhir_resource_refs", "ix_fhir_resource_patient_ids")


def upgrade() -> None:
    # btree_gist is a trusted extension: the schema owner may create it.
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
    op.create_index(
        "ix_fhir_search_date_range",
        "fhir_search_date",
        ["resource_type", "param", sa.text("tstzrange(least(low, high), greatest(low, high), '[]')")],
        postgresql_using="gist",
    )
    for index in GIN_INDEXES:
        op.execute(f"ALTER INDEX {index} SET (gin_pending_list_limit = 256)")


def downgrade() -> None:
    for index in GIN_INDEXES:
        op.execute(f"ALTER INDEX {index} RESET (gin_pending_list_limit)")
    op.drop_index("ix_fhir_search_date_range", table_name="fhir_search_date")
