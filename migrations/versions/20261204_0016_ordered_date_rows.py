"""date rows are ordered ranges: a period whose start is after its end is stored swapped

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 22:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The indexer now stores such a period as the span between its bounds
    # (fhir_api.search_index.extract._period_bounds); rows written before are
    # brought in line, so that searches walking a date in sort order find them.
    # Both sides of SET read the old row, so this swaps.
    op.execute("UPDATE fhir_search_date SET low = high, high = low WHERE low > high")


def downgrade() -> None:
    # Not undone: which rows were swapped is not recorded, and the indexer of
    # the revisions before this one searches ordered rows just as well.
    pass
