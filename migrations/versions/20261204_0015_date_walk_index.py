"""date index in -date order with the id as key: sorted date searches read a page of it

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
INDEX = "ix_fhir_search_date_walk"


def upgrade() -> None:
    # Before, a week's encounters sorted by -date were all fetched and sorted to
    # find a page. Built concurrently, so searches and writes go on meanwhile.
    with op.get_context().autocommit_block():
        op.create_index(
            INDEX,
            TABLE,
            ["resource_type", "param", sa.text("high DESC"), "resource_id"],
            unique=False,
            postgresql_include=["low"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name=TABLE, postgresql_concurrently=True, if_exists=True)
