"""Initial control-plane schema: workspaces, jobs, events, artifacts, runs, audit.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

JOB_STATUSES = "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')"
RUN_STATUSES = "status IN ('succeeded', 'failed')"
MEMBER_ROLES = "role IN ('owner', 'editor', 'viewer')"


def _id() -> sa.Column[str]:
    return sa.Column("id", sa.String(36), primary_key=True)


def _workspace_id() -> sa.Column[str]:
    return sa.Column(
        "workspace_id",
        sa.String(36),
        sa.ForeignKey("workspace.id", ondelete="CASCADE"),
        nullable=False,
    )


def _job_id() -> sa.Column[str]:
    return sa.Column("job_id", sa.String(36), nullable=False)


def _job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["workspace_id", "job_id"],
        ["experiment_job.workspace_id", "experiment_job.id"],
        ondelete="CASCADE",
        name=f"fk_{table}_job",
    )


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "workspace",
        _id(),
        sa.Column("slug", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.UniqueConstraint("slug", name="uq_workspace_slug"),
    )
    op.create_table(
        "workspace_member",
        _id(),
        _workspace_id(),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.UniqueConstraint(
            "workspace_id", "subject", name="uq_workspace_member_workspace_id_subject"
        ),
        sa.CheckConstraint(MEMBER_ROLES, name="ck_workspace_member_role"),
    )
    op.create_table(
        "experiment_job",
        _id(),
        _workspace_id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("experiment_spec_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("last_event_seq", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("started_at", nullable=True),
        _timestamp("finished_at", nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.UniqueConstraint("workspace_id", "id", name="uq_experiment_job_workspace_id_id"),
        sa.CheckConstraint(JOB_STATUSES, name="ck_experiment_job_status"),
    )
    op.create_index(
        "ix_experiment_job_workspace_id_status", "experiment_job", ["workspace_id", "status"]
    )
    op.create_table(
        "job_event",
        _id(),
        _workspace_id(),
        _job_id(),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.UniqueConstraint("job_id", "seq", name="uq_job_event_job_id_seq"),
        _job_fk("job_event"),
    )
    op.create_table(
        "job_artifact",
        _id(),
        _workspace_id(),
        _job_id(),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("uri", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _timestamp("created_at"),
        sa.UniqueConstraint("job_id", "uri", name="uq_job_artifact_job_id_uri"),
        sa.CheckConstraint("length(sha256) = 64", name="ck_job_artifact_sha256_length"),
        _job_fk("job_artifact"),
    )
    op.create_table(
        "experiment_run",
        _id(),
        _workspace_id(),
        _job_id(),
        sa.Column("point_hash", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec_hashes", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.UniqueConstraint("job_id", "point_hash", name="uq_experiment_run_job_id_point_hash"),
        sa.CheckConstraint(RUN_STATUSES, name="ck_experiment_run_status"),
        _job_fk("experiment_run"),
    )
    op.create_table(
        "audit_event",
        _id(),
        _workspace_id(),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        _timestamp("created_at"),
    )
    op.create_index(
        "ix_audit_event_workspace_id_created_at", "audit_event", ["workspace_id", "created_at"]
    )
    for table in (
        "workspace_member",
        "experiment_job",
        "job_event",
        "job_artifact",
        "experiment_run",
    ):
        op.create_index(f"ix_{table}_workspace_id", table, ["workspace_id"])
    for table in ("job_event", "job_artifact", "experiment_run"):
        op.create_index(f"ix_{table}_job_id", table, ["job_id"])


def downgrade() -> None:
    for table in (
        "audit_event",
        "experiment_run",
        "job_artifact",
        "job_event",
        "experiment_job",
        "workspace_member",
        "workspace",
    ):
        op.drop_table(table)
