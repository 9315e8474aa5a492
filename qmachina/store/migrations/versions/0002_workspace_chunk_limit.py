"""Per-workspace bound on concurrent sweep chunks: ``workspace.max_concurrent_chunks``.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

CHUNK_LIMIT_POSITIVE = "max_concurrent_chunks IS NULL OR max_concurrent_chunks > 0"


def upgrade() -> None:
    # Batch mode: SQLite cannot add a CHECK constraint to an existing table in place.
    with op.batch_alter_table("workspace") as batch:
        batch.add_column(sa.Column("max_concurrent_chunks", sa.Integer(), nullable=True))
        batch.create_check_constraint(
            "ck_workspace_max_concurrent_chunks_positive", CHUNK_LIMIT_POSITIVE
        )


def downgrade() -> None:
    with op.batch_alter_table("workspace") as batch:
        batch.drop_constraint("ck_workspace_max_concurrent_chunks_positive", type_="check")
        batch.drop_column("max_concurrent_chunks")
