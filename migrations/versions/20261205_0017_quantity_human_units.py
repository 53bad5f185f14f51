"""quantity rows for human units: `number||unit` finds a Quantity whose unit differs from its code

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 04:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The indexer now adds a (no system, unit) row beside the coded row when a
    # Quantity's human unit differs from its code
    # (fhir_api.search_index.extract._quantity_units). Rows written before are
    # completed from the stored resources: each coded row's unit is read from
    # the Quantity (or Range bound) holding that code, system and value.
    # Contained resources are left out: the indexer never reads them for the
    # container's parameters, so their units must not become its rows.
    op.execute(
        """
        INSERT INTO fhir_search_quantity
            (resource_type, resource_id, compartment_key, param, value, low, high, system, code)
        SELECT DISTINCT q.resource_type, q.resource_id, q.compartment_key, q.param,
               q.value, q.low, q.high, NULL, found.unit
        FROM fhir_search_quantity AS q
        JOIN fhir_resource AS r ON r.resource_type = q.resource_type AND r.id = q.resource_id
        CROSS JOIN LATERAL (
            SELECT quantity ->> 'unit' AS unit
            FROM jsonb_path_query(
                r.resource - 'contained',
                'lax $.** ? (@.code == $code && @.value == $value && @.unit != $code'
                ' && @.unit.type() == "string")',
                jsonb_build_object('code', q.code, 'value', q.value),
                true
            ) AS quantity
            WHERE (quantity ->> 'system') IS NOT DISTINCT FROM q.system
        ) AS found
        WHERE q.code IS NOT NULL
          AND r.resource IS NOT NULL
          AND found.unit <> ''
          AND NOT EXISTS (
              SELECT 1 FROM fhir_search_quantity AS done
              WHERE done.resource_type = q.resource_type AND done.resource_id = q.resource_id
                AND done.param = q.param AND done.value = q.value
                AND done.system IS NULL AND done.code = found.unit
          )
        """
    )


def downgrade() -> None:
    # Not undone: the extra rows cannot be told from rows of Quantities that
    # carry only a unit, and the revisions before this one ignore them harmlessly
    # (a search by system and code never meets a row without a system).
    pass
