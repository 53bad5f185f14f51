"""string index in byte order with the id as key: name searches walk (value, id) in order

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 19:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "fhir_search_string"


def upgrade() -> None:
    # A common family name matches thousands of entries of one value; with the id
    # only INCLUDEd, a page meant reading and sorting them all. Built before the
    # old index goes, and concurrently, so searches and writes go on meanwhile.
    with op.get_context().autocommit_block():
        _drop_if_invalid("ix_fhir_search_string_walk")
        op.create_index(
            "ix_fhir_search_string_walk",
            TABLE,
            ["resource_type", "param", sa.text('(value_normalized COLLATE "C")'), "resource_id"],
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


def _drop_if_invalid(index: str) -> None:
    """Drop an index a failed concurrent build left invalid; IF NOT EXISTS would keep it."""
    # Kept in the migration rather than shared: a migration must not change
    # when helper code does.
    invalid = (
        op.get_bind()
        .execute(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:index)"),
            {"index": index},
        )
        .scalar()
    )
    if invalid:
        op.drop_index(index, table_name=TABLE, postgresql_concurrently=True)


def downgrade() -> None:
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
            "ix_fhir_search_string_walk",
            table_name=TABLE,
            postgresql_concurrently=True,
            if_exists=True,
        )
