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
    # stored before get theirs from the stored document, as the indexer would:
    # both coordinates needed (JSON numbers, or strings that are decimals), no
    # latitude past ±90, a longitude past ±180 wrapped.
    op.execute(
        r"""
        INSERT INTO fhir_search_quantity
            (resource_type, resource_id, compartment_key, param, value, low, high, system, code)
        SELECT r.resource_type, r.id, r.compartment_key, coordinate.param,
               coordinate.value, coordinate.value, coordinate.value, NULL, NULL
        FROM fhir_resource AS r
        CROSS JOIN LATERAL (
            -- CASE, not WHERE: PostgreSQL may test a flattened WHERE's parts in
            -- any order, and a cast of a non-decimal would fail the migration.
            SELECT CASE WHEN text.latitude ~ '^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$'
                        THEN text.latitude::numeric END AS latitude,
                   CASE WHEN text.longitude ~ '^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$'
                        THEN text.longitude::numeric END AS longitude
            FROM (
                SELECT r.resource #>> '{position,latitude}' AS latitude,
                       r.resource #>> '{position,longitude}' AS longitude
            ) AS text
        ) AS position
        CROSS JOIN LATERAL (
            VALUES ('near$latitude', position.latitude),
                   ('near$longitude', CASE
                        WHEN position.longitude BETWEEN -180 AND 180 THEN position.longitude
                        ELSE ((position.longitude + 180) % 360 + 360) % 360 - 180
                    END)
        ) AS coordinate (param, value)
        WHERE r.resource_type = 'Location'
          AND NOT r.deleted
          AND position.longitude IS NOT NULL
          AND position.latitude BETWEEN -90 AND 90
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
