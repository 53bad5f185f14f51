"""string lookup index covers resource_id: name prefix searches read the index only

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-23 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "fhir_search_string"
COLUMNS = ["resource_type", "param", sa.literal_column("value_normalized text_pattern_ops")]


def upgrade() -> None:
    # A prefix search reads every matching entry to order the ids; with resource_id
    # in the index it does not visit the table's heap once per match. Built before
    # the old index goes, and concurrently, so searches and writes go on meanwhile.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_fhir_search_string_prefix",
            TABLE,
            ["resource_type", "param", "value_normalized"],
            unique=False,
            postgresql_ops={"value_normalized": "text_pattern_ops"},
            postgresql_include=["resource_id"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_fhir_search_string_lookup",
            table_name=TABLE,
            postgresql_concurrently=True,
            if_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_fhir_search_string_lookup",
            TABLE,
            COLUMNS,
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_fhir_search_string_prefix",
            table_name=TABLE,
            postgresql_concurrently=True,
            if_exists=True,
        )
