"""outbox: the partial index of pending events is on id, the order the drain takes them in

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 13:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The drain asks for the oldest due events by id. On available_at, the
    # index could not give that order: once the statistics counted a few
    # thousand pending events, the planner walked the primary key through
    # every delivered one instead (1.1 million rows, 200 ms a poll). Building
    # the index blocks writes to the outbox; give up rather than queue them
    # behind a long reader.
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.drop_index("ix_outbox_event_pending", table_name="outbox_event")
    op.create_index(
        "ix_outbox_event_pending",
        "outbox_event",
        ["id"],
        postgresql_where="status = 'pending'",
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_event_pending", table_name="outbox_event")
    op.create_index(
        "ix_outbox_event_pending",
        "outbox_event",
        ["available_at"],
        postgresql_where="status = 'pending'",
    )
