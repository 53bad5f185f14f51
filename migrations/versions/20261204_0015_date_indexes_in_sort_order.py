"""date indexes in sort order with the id as key: sorted date searches read a page of them

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 22:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "fhir_search_date"


def upgrade() -> None:
    # Before, a week's encounters sorted by date were all fetched and sorted to
    # find a page: (low, high) order is not (low, id) order, and the id was not
    # in the index. Not covering (the other bound stays in the heap): a generic
    # plan, blind to the instants, would find an index-only scan of every row of
    # a parameter cheap. Built before the old index goes, and concurrently, so
    # searches and writes go on meanwhile.
    with op.get_context().autocommit_block():
        for index in ("ix_fhir_search_date_by_start", "ix_fhir_search_date_by_end"):
            _drop_if_invalid(index)
        op.create_index(
            "ix_fhir_search_date_by_start",
            TABLE,
            ["resource_type", "param", "low", "resource_id"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_fhir_search_date_by_end",
            TABLE,
            ["resource_type", "param", sa.text("high DESC"), "resource_id"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_fhir_search_date_lookup",
            table_name=TABLE,
            postgresql_concurrently=True,
            if_exists=True,
        )


def _drop_if_invalid(index: str) -> None:
    """Drop an index a failed concurrent build left invalid; IF NOT EXISTS would keep it."""
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
            "ix_fhir_search_date_lookup",
            TABLE,
            ["resource_type", "param", "low", "high"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        for index in ("ix_fhir_search_date_by_end", "ix_fhir_search_date_by_start"):
            op.drop_index(index, table_name=TABLE, postgresql_concurrently=True, if_exists=True)
