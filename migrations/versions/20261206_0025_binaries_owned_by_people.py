"""A person's uploads are theirs, not the shared browser or CLI client's

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-06 03:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Owners were the OAuth client, which every person shares (waha-cli,
    # waha-web). A Binary's first version names who uploaded it: units as
    # their Device (their owner stays their client), people by name. People's
    # unfinished tus uploads and bundle receipts name no person: the uploads
    # expire, and such a bundle sent again is processed again.
    op.execute(
        "UPDATE binary_object AS b SET owner_client_id = 'user:' || v.author"
        " FROM fhir_resource_version AS v"
        " WHERE v.resource_type = 'Binary' AND v.id = b.id AND v.version_id = 1"
        " AND v.author IS NOT NULL AND v.author NOT LIKE 'Device/%'"
        " AND b.owner_client_id NOT LIKE 'user:%'"
    )


def downgrade() -> None:
    # Which client a person used is not recorded: uploads stay theirs.
    pass
