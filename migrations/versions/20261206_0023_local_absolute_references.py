"""References written as this server's absolute URL count as the local ones they are

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06 02:30:00
"""

from collections.abc import Sequence
from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import op

from fhir_api.rederive import rederive_current
from hub.settings import get_settings

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

def upgrade() -> None:
    # The write engine now stores `{base}/Patient/x` as `Patient/x`. Resources
    # stored before kept the absolute form, so their index named no patient:
    # every unit could see them. Their stored documents stay as they were
    # written (a version is immutable); their keys, patients and compartment
    # are derived again as the indexer derives them from the local form.
    base_url = get_settings().fhir_base_url
    connection = op.get_bind()
    rows = connection.execute(
        sa.text(
            "SELECT resource_type, id, version_id, author, resource FROM fhir_resource"
            " WHERE NOT deleted AND resource IS NOT NULL"
            " AND EXISTS (SELECT 1 FROM unnest(refs) AS ref"
            "             WHERE strpos(lower(split_part(ref, '=', 2)), :server) > 0)"
        ),
        # Any spelling of this server's address; `localized` decides which name it.
        {"server": "://" + urlsplit(base_url).netloc.lower() + "/"},
    ).all()
    # History rows get their own patients in 0024, which reads these.
    rederive_current(connection, rows, base_url=base_url, version_patients=False)


def downgrade() -> None:
    # The derived keys are correct under the earlier code too: nothing to undo.
    pass
