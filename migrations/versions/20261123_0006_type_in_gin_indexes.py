"""resource type inside the token and reference GIN indexes

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 12:35:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Measured on 1.2M resources: `resource_type = 'Patient' AND tokens && …`
    # was planned as a BitmapAnd of the token GIN (0.1 ms, 1 row) with the type
    # btree (13 ms, 37k rows). With the type inside the GIN one scan answers
    # both. btree_gin is a trusted extension: the schema owner may create it.
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gin")
    for column in ("tokens", "refs"):
        op.drop_index(f"ix_fhir_resource_{column}", table_name="fhir_resource")
        op.create_index(
            f"ix_fhir_resource_{column}",
            "fhir_resource",
            ["resource_type", column],
            postgresql_using="gin",
            postgresql_with={"gin_pending_list_limit": 256},
        )


def downgrade() -> None:
    for column in ("tokens", "refs"):
        op.drop_index(f"ix_fhir_resource_{column}", table_name="fhir_resource")
        op.create_index(
            f"ix_fhir_resource_{column}",
            "fhir_resource",
            [column],
            postgresql_using="gin",
            postgresql_with={"gin_pending_list_limit": 256},
        )
