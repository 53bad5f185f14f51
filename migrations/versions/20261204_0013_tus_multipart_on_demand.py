"""tus uploads open their S3 multipart upload only when a first part goes out

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 19:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL until the upload has a part to send: an upload that arrives whole in
    # one PATCH (a photo) is stored with one PUT and never opens one.
    op.alter_column("tus_upload", "multipart_upload_id", nullable=True)


def downgrade() -> None:
    # The older schema cannot describe an upload without one: such uploads go
    # (a finished one's Binary stays; an unfinished one is sent again). Their
    # staged tails, and an object put whole but not yet recorded, stay in the
    # bucket: run the expiry sweep before downgrading to leave none.
    op.execute("DELETE FROM tus_upload WHERE multipart_upload_id IS NULL")
    op.alter_column("tus_upload", "multipart_upload_id", nullable=False)
