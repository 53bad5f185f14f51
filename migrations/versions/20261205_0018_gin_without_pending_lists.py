"""resource GIN indexes without pending lists: lookups no longer scan unmerged entries

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 04:55:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GIN_INDEXES = ("ix_fhir_resource_tokens", "ix_fhir_resource_refs", "ix_fhir_resource_patient_ids")


def upgrade() -> None:
    # See fhir_api.models.GIN_STORAGE for the measurements. Turning fastupdate
    # off leaves entries already pending in the list; merging them now means
    # no lookup scans them until the next vacuum. Setting fastupdate takes an
    # ACCESS EXCLUSIVE lock: waiting behind a long reader would queue every
    # write behind this statement, so the migration gives up instead and is
    # run again.
    op.execute("SET LOCAL lock_timeout = '10s'")
    for index in GIN_INDEXES:
        op.execute(f"ALTER INDEX {index} RESET (gin_pending_list_limit)")
        op.execute(f"ALTER INDEX {index} SET (fastupdate = off)")
        op.execute(f"SELECT gin_clean_pending_list('{index}'::regclass)")


def downgrade() -> None:
    for index in GIN_INDEXES:
        op.execute(f"ALTER INDEX {index} RESET (fastupdate)")
        op.execute(f"ALTER INDEX {index} SET (gin_pending_list_limit = 256)")
