"""fhir_resource: a partial index of the resources with several patients

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "fhir_resource"
INDEX = "ix_fhir_resource_several_patients"


def upgrade() -> None:
    # A restricted search tests an index row's one patient before reading its
    # resource; this index tells which resources have others too. Built
    # concurrently, so units' bundles keep landing during the upgrade.
    with op.get_context().autocommit_block():
        invalid = (
            op.get_bind()
            .execute(
                sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:i)"),
                {"i": INDEX},
            )
            .scalar()
        )
        # IF NOT EXISTS would keep what an interrupted build left behind.
        if invalid:
            op.drop_index(INDEX, table_name=TABLE, postgresql_concurrently=True)
        op.create_index(
            INDEX,
            TABLE,
            ["resource_type", "id"],
            postgresql_where=sa.text("cardinality(patient_ids) > 1"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name=TABLE, postgresql_concurrently=True, if_exists=True)
