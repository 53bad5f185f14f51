"""tus_upload: the running digests at the recorded offset

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-05 21:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: a catalogue change only. Uploads in progress have
    # none, and their completion reads their object back, as before.
    op.add_column("tus_upload", sa.Column("digest_state", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("tus_upload", "digest_state")
