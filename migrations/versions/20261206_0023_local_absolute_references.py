"""References written as this server's absolute URL count as the local ones they are

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06 02:30:00
"""

from collections.abc import Sequence
from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import op
from sqlalchemy.orm import Session

from fhir_api.repository import add_care_relationships
from fhir_api.search_index import extract_index
from fhir_api.writes import care_relationships
from fhir_api.search_index.encoding import localized
from hub.settings import get_settings

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIDE_TABLES = ("fhir_search_string", "fhir_search_date", "fhir_search_quantity", "fhir_search_uri")


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
            "SELECT resource_type, id, author, resource FROM fhir_resource"
            " WHERE NOT deleted AND resource IS NOT NULL"
            " AND EXISTS (SELECT 1 FROM unnest(refs) AS ref"
            "             WHERE strpos(lower(split_part(ref, '=', 2)), :server) > 0)"
        ),
        # Any spelling of this server's address; `localized` decides which name it.
        {"server": "://" + urlsplit(base_url).netloc.lower() + "/"},
    ).all()
    session = Session(bind=connection)
    pairs: set[tuple[str, str]] = set()
    for resource_type, resource_id, author, document in rows:
        index = extract_index(localized(document, base_url))
        # The care relationships the write would have given, had it named the
        # patient then: its unit's, and an Encounter's serviceProvider's.
        unit = author.removeprefix("Device/") if (author or "").startswith("Device/") else None
        pairs |= care_relationships(session, [(resource_type, index)], unit=unit)
        patient_ids = sorted(index.patient_ids)
        compartment_key = resource_id if resource_type == "Patient" else None
        if compartment_key is None and patient_ids:
            compartment_key = patient_ids[0]
        owner = {"type": resource_type, "id": resource_id, "key": compartment_key}
        connection.execute(
            sa.text(
                "UPDATE fhir_resource SET refs = CAST(:refs AS text[]),"
                " patient_ids = CAST(:patients AS text[]), compartment_key = :key"
                " WHERE resource_type = :type AND id = :id"
            ),
            {**owner, "refs": index.references, "patients": patient_ids},
        )
        for table in SIDE_TABLES:
            connection.execute(
                sa.text(
                    f"UPDATE {table} SET compartment_key = :key"
                    " WHERE resource_type = :type AND resource_id = :id"
                ),
                owner,
            )
        connection.execute(
            sa.text(
                "UPDATE fhir_resource_version SET compartment_key = :key"
                " WHERE resource_type = :type AND id = :id"
            ),
            owner,
        )
    add_care_relationships(session, pairs)
    session.flush()


def downgrade() -> None:
    # The derived keys are correct under the earlier code too: nothing to undo.
    pass
