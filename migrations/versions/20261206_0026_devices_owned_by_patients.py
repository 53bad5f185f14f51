"""A Device, Contract or GuidanceResponse naming its patient belongs to that patient

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-06 03:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fhir_api.rederive import rederive_current, rederive_history
from fhir_api.search_index.definitions import OWNED_BY_PATIENT
from hub.settings import get_settings

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # R4's patient compartment leaves these types out, so they named no
    # patient and every unit could read a patient's implant or glucose meter.
    connection = op.get_bind()
    rows = connection.execute(
        sa.text(
            "SELECT resource_type, id, version_id, author, resource FROM fhir_resource"
            " WHERE resource_type = ANY(CAST(:types AS text[]))"
            " AND NOT deleted AND resource IS NOT NULL"
            " AND EXISTS (SELECT 1 FROM unnest(refs) AS ref WHERE ref LIKE 'patient=%')"
        ),
        {"types": sorted(OWNED_BY_PATIENT)},
    ).all()
    base_url = get_settings().fhir_base_url
    rederive_current(connection, rows, base_url=base_url, version_patients=True)
    # Their older versions and deletions too: each shown only to its patient's.
    owners = connection.execute(
        sa.text(
            "SELECT resource_type, id FROM fhir_resource"
            " WHERE resource_type = ANY(CAST(:types AS text[])) AND (deleted OR version_id > 1)"
        ),
        {"types": sorted(OWNED_BY_PATIENT)},
    ).all()
    rederive_history(connection, owners, base_url=base_url)


def downgrade() -> None:
    # The derived keys are correct under the earlier code too: nothing to undo.
    pass
