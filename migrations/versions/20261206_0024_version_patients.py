"""Each version keeps its patients; a deletion keeps those of the version it ends

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-06 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fhir_api.rederive import rederive_history
from hub.settings import get_settings

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Before, a deletion's current row named no patient, so every unit could
    # see a deleted resource's history, and re-create a deleted Patient to open
    # its record; and old versions were shown to whoever saw the current one.
    # IF NOT EXISTS: a database stamped back to an older revision runs it again.
    op.execute(
        "ALTER TABLE fhir_resource_version"
        " ADD COLUMN IF NOT EXISTS patient_ids text[] DEFAULT '{}' NOT NULL"
    )
    connection = op.get_bind()
    # The current version of a live resource: its patients are on its row.
    connection.execute(
        sa.text(
            "UPDATE fhir_resource_version AS v SET patient_ids = r.patient_ids"
            " FROM fhir_resource AS r"
            " WHERE v.resource_type = r.resource_type AND v.id = r.id"
            " AND v.version_id = r.version_id AND NOT r.deleted"
            " AND cardinality(r.patient_ids) > 0"
        )
    )
    # Older versions and deletions: derived from each version's document, as
    # the indexer derives them (references to this server made local first).
    base_url = get_settings().fhir_base_url
    owners = connection.execute(
        sa.text("SELECT resource_type, id FROM fhir_resource WHERE deleted OR version_id > 1")
    ).all()
    rederive_history(connection, owners, base_url=base_url)


def downgrade() -> None:
    op.drop_column("fhir_resource_version", "patient_ids")
