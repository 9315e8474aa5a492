"""Governance: the admin role, workspace quotas, artifact sizes and shared resources.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

ROLES_BEFORE = "role IN ('owner', 'editor', 'viewer')"
ROLES_AFTER = "role IN ('owner', 'admin', 'editor', 'viewer')"
QUOTA_CHECKS = {
    "max_concurrent_jobs": "ck_workspace_max_concurrent_jobs_not_negative",
    "max_streams": "ck_workspace_max_streams_not_negative",
    "max_storage_bytes": "ck_workspace_max_storage_bytes_not_negative",
}
SHAREABLE_TYPES = (
    "resource_type IN ('dataset', 'experiment_job', 'serving_version', 'serving_alias', "
    "'live_session', 'modeling_session')"
)


def upgrade() -> None:
    # Batch mode throughout: SQLite cannot change CHECK constraints of an existing table.
    with op.batch_alter_table("workspace_member") as batch:
        batch.drop_constraint("ck_workspace_member_role", type_="check")
        batch.create_check_constraint("ck_workspace_member_role", ROLES_AFTER)
    with op.batch_alter_table("workspace") as batch:
        batch.add_column(sa.Column("max_concurrent_jobs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_streams", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True))
        for column, name in QUOTA_CHECKS.items():
            batch.create_check_constraint(name, f"{column} IS NULL OR {column} >= 0")
    with op.batch_alter_table("job_artifact") as batch:
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    op.create_table(
        "resource_share",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "workspace_id",
            sa.String(36),
            sa.ForeignKey("workspace.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("resource_type", sa.String(32), nullable=False),
        sa.Column("resource_id", sa.String(200), nullable=False),
        sa.Column(
            "shared_with_workspace_id",
            sa.String(36),
            sa.ForeignKey("workspace.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint(
            "resource_type",
            "resource_id",
            "shared_with_workspace_id",
            name="uq_resource_share",
        ),
        sa.CheckConstraint(SHAREABLE_TYPES, name="ck_resource_share_resource_type"),
        sa.CheckConstraint(
            "shared_with_workspace_id <> workspace_id", name="ck_resource_share_not_with_itself"
        ),
    )
    op.create_index("ix_resource_share_workspace_id", "resource_share", ["workspace_id"])
    op.create_index(
        "ix_resource_share_shared_with_workspace_id",
        "resource_share",
        ["shared_with_workspace_id"],
    )


def downgrade() -> None:
    op.drop_table("resource_share")
    with op.batch_alter_table("job_artifact") as batch:
        batch.drop_column("size_bytes")
    with op.batch_alter_table("workspace") as batch:
        for column, name in QUOTA_CHECKS.items():
            batch.drop_constraint(name, type_="check")
            batch.drop_column(column)
    op.execute("DELETE FROM workspace_member WHERE role = 'admin'")
    with op.batch_alter_table("workspace_member") as batch:
        batch.drop_constraint("ck_workspace_member_role", type_="check")
        batch.create_check_constraint("ck_workspace_member_role", ROLES_BEFORE)
