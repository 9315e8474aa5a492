"""Control-plane tables: workspaces, experiment jobs and their events, artifacts and runs, audit.

Every row carries ``workspace_id``. Rows that belong to a job reference it through the composite
key ``(workspace_id, job_id)``, so the database itself refuses an event, artifact or run whose
workspace differs from its job's. The schema is created by the Alembic migrations, never by
``create_all``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
RUN_STATUSES = ("succeeded", "failed")
MEMBER_ROLES = ("owner", "editor", "viewer")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    """A fresh row id: a random UUID as text, made in Python so both backends agree."""
    return str(uuid.uuid4())


def utc_now() -> datetime:
    """The current instant, timezone-aware UTC."""
    return datetime.now(UTC)


def in_list(column: str, values: tuple[str, ...]) -> str:
    """CHECK constraint text: ``column`` is one of ``values``."""
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that only accepts aware values and always returns UTC.

    SQLite stores datetimes without an offset; converting to UTC on the way in and attaching
    UTC on the way out gives the same aware values as PostgreSQL's ``timestamptz``.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; store aware UTC values")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention so migrations name constraints predictably."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: sa.JSON(),
    }


def _workspace_fk() -> Mapped[str]:
    return mapped_column(
        sa.String(36), sa.ForeignKey("workspace.id", ondelete="CASCADE"), index=True
    )


def _job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["workspace_id", "job_id"],
        ["experiment_job.workspace_id", "experiment_job.id"],
        ondelete="CASCADE",
        name=f"fk_{table}_job",
    )


class Workspace(Base):
    """A tenant: every other row belongs to exactly one workspace."""

    __tablename__ = "workspace"
    __table_args__ = (
        sa.CheckConstraint(
            "max_concurrent_chunks IS NULL OR max_concurrent_chunks > 0",
            name="max_concurrent_chunks_positive",
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    slug: Mapped[str] = mapped_column(sa.String(64), unique=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    max_concurrent_chunks: Mapped[int | None]
    """At most this many chunks of one of the workspace's sweeps run at once; None: no bound
    beyond the sweep's own."""
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)


class WorkspaceMember(Base):
    """A principal's role in a workspace (the OpenFGA model decides what a role may do)."""

    __tablename__ = "workspace_member"
    __table_args__ = (
        sa.UniqueConstraint("workspace_id", "subject"),
        sa.CheckConstraint(in_list("role", MEMBER_ROLES), name="role"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    subject: Mapped[str] = mapped_column(sa.String(200))
    role: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)


class ExperimentJob(Base):
    """One experiment sweep submitted to the orchestrator.

    ``last_event_seq`` is the counter that numbers the job's events; incrementing it with
    ``UPDATE ... RETURNING`` hands out sequence numbers atomically on both backends.
    """

    __tablename__ = "experiment_job"
    __table_args__ = (
        sa.UniqueConstraint("workspace_id", "id"),
        sa.CheckConstraint(in_list("status", JOB_STATUSES), name="status"),
        sa.Index("ix_experiment_job_workspace_id_status", "workspace_id", "status"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    name: Mapped[str] = mapped_column(sa.String(200))
    experiment_spec_hash: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16), default="queued")
    last_event_seq: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(sa.Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)


class JobEvent(Base):
    """A progress event of a job; ``seq`` counts from 1 per job so SSE clients can resume."""

    __tablename__ = "job_event"
    __table_args__ = (sa.UniqueConstraint("job_id", "seq"), _job_fk("job_event"))

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    job_id: Mapped[str] = mapped_column(sa.String(36), index=True)
    seq: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(64))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class JobArtifact(Base):
    """A heavy output of a job kept in the lake, referenced by URI and checksum."""

    __tablename__ = "job_artifact"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "uri"),
        sa.CheckConstraint("length(sha256) = 64", name="sha256_length"),
        _job_fk("job_artifact"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    job_id: Mapped[str] = mapped_column(sa.String(36), index=True)
    kind: Mapped[str] = mapped_column(sa.String(64))
    uri: Mapped[str] = mapped_column(sa.String(1024))
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ExperimentRun(Base):
    """The result of one sweep point of a job, keyed by the point's ``point_hash``."""

    __tablename__ = "experiment_run"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "point_hash"),
        sa.CheckConstraint(in_list("status", RUN_STATUSES), name="status"),
        _job_fk("experiment_run"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    job_id: Mapped[str] = mapped_column(sa.String(36), index=True)
    point_hash: Mapped[str] = mapped_column(sa.String(64))
    params: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(16))
    spec_hashes: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)


class AuditEvent(Base):
    """Who did what to which record; written in the transaction of the change it describes."""

    __tablename__ = "audit_event"
    __table_args__ = (
        sa.Index("ix_audit_event_workspace_id_created_at", "workspace_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("workspace.id", ondelete="CASCADE")
    )
    actor: Mapped[str] = mapped_column(sa.String(200))
    action: Mapped[str] = mapped_column(sa.String(64))
    target: Mapped[str] = mapped_column(sa.String(200))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
