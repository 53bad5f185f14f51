"""Location positions indexed for `near`: latitude and longitude as number rows

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 00:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The indexer now writes Location.position as `near$latitude` and
    # `near$longitude` rows (fhir_api.search_index.extract._position). Locations
    # stored before get theirs from the stored document; a position without
    # both coordinates is not indexed, as the indexer does.
    op.execute(
        """
        INSERT INTO fhir_search_quantity
            (resource_type, resource_id, compartment_key, param, value, low, high, system, code)
        SELECT r.resource_type, r.id, r.compartment_key, coordinate.param,
               coordinate.value, coordinate.value, coordinate.value, NULL, NULL
        FROM fhir_resource AS r
        CROSS JOIN LATERAL (
            VALUES ('near$latitude', (r.resource #>> '{position,latitude}')::numeric),
                   ('near$longitude', (r.resource #>> '{position,longitude}')::numeric)
        ) AS coordinate (param, value)
        WHERE r.resource_type = 'Location'
          AND NOT r.deleted
          AND jsonb_typeof(r.resource #> '{position,latitude}') = 'number'
          AND jsonb_typeof(r.resource #> '{position,longitude}') = 'number'
          AND NOT EXISTS (
              SELECT 1 FROM fhir_search_quantity AS done
              WHERE done.resource_type = r.resource_type AND done.resource_id = r.id
                AND done.param = coordinate.param
          )
        """
    )


def downgrade() -> None:
    op.execute(
        "DELETE FROM fhir_search_quantity WHERE resource_type = 'Location'"
        " AND param IN ('near$latitude', 'near$longitude')"
    )
