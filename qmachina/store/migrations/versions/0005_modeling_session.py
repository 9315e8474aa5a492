"""Modeling sessions: one row per Create-a-Model session, naming the workflow that runs it.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "modeling_session",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "workspace_id",
            sa.String(36),
            sa.ForeignKey("workspace.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("workspace_id", "id", name="uq_modeling_session_workspace_id_id"),
        sa.UniqueConstraint("workflow_id", name="uq_modeling_session_workflow_id"),
    )
    op.create_index("ix_modeling_session_workspace_id", "modeling_session", ["workspace_id"])
    op.create_index(
        "ix_modeling_session_workspace_id_created_at",
        "modeling_session",
        ["workspace_id", "created_at"],
    )


def downgrade() -> None:
    op.drop_table("modeling_session")
