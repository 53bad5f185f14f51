"""care relationships: who may see which patient's record

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SID_REGION = "https://waha.health/fhir/sid/region"


def upgrade() -> None:
    op.create_table(
        "care_relationship",
        sa.Column("grantee", sa.Text(), nullable=False),
        sa.Column("patient_id", sa.Text(), nullable=False),
        sa.Column(
            "granted_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("grantee", "patient_id", name=op.f("pk_care_relationship")),
    )
    op.execute(
        """
        DO $$
        BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha_app') THEN
            GRANT SELECT, INSERT, UPDATE, DELETE ON care_relationship TO waha_app;
          END IF;
        END
        $$
        """
    )
    # Records written before access control existed: a unit's own writes
    # (author Device/<unit>) and Encounters naming a unit as serviceProvider
    # give that unit, and the unit's region, the care relationship.
    op.execute(
        """
        INSERT INTO care_relationship (grantee, patient_id)
        SELECT DISTINCT 'unit:' || substr(r.author, 8), p.patient_id
        FROM fhir_resource AS r, unnest(r.patient_ids) AS p(patient_id)
        WHERE r.author LIKE 'Device/%' AND NOT r.deleted
        ON CONFLICT DO NOTHING
        """
    )
    op.execute(
        """
        INSERT INTO care_relationship (grantee, patient_id)
        SELECT DISTINCT 'unit:' || split_part(ref, '/', 2), p.patient_id
        FROM fhir_resource AS r, unnest(r.refs) AS ref, unnest(r.patient_ids) AS p(patient_id)
        WHERE r.resource_type = 'Encounter' AND NOT r.deleted
          AND ref LIKE 'service-provider=Organization/%'
        ON CONFLICT DO NOTHING
        """
    )
    op.execute(
        f"""
        INSERT INTO care_relationship (grantee, patient_id)
        SELECT DISTINCT 'region:' || region.value, c.patient_id
        FROM care_relationship AS c
        JOIN fhir_resource AS unit_org
          ON unit_org.resource_type = 'Organization' AND unit_org.id = substr(c.grantee, 6)
        JOIN fhir_resource AS region_org
          ON region_org.resource_type = 'Organization'
         AND region_org.id = split_part(unit_org.resource #>> '{{partOf,reference}}', '/', 2)
        CROSS JOIN LATERAL (
          SELECT i ->> 'value' AS value
          FROM jsonb_array_elements(region_org.resource -> 'identifier') AS i
          WHERE i ->> 'system' = '{SID_REGION}'
        ) AS region
        WHERE c.grantee LIKE 'unit:%'
        ON CONFLICT DO NOTHING
        """
    )


def downgrade() -> None:
    op.drop_table("care_relationship")
