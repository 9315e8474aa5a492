"""Control-plane tables: workspaces, experiment jobs and their events, artifacts and runs, the
serving registry (versions, aliases and their history), modeling and live sessions, contract
rolls, audit.

Every row carries ``workspace_id``. Rows that belong to a job reference it through the composite
key ``(workspace_id, job_id)``, so the database itself refuses an event, artifact or run whose
workspace differs from its job's; aliases and their events reference serving versions the same
way, through ``(workspace_id, version_id)``. The schema is created by the Alembic migrations,
never by ``create_all``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
RUN_STATUSES = ("succeeded", "failed")
MEMBER_ROLES = ("owner", "admin", "editor", "viewer")
"""Widest first; the authorization model (``qmachina/authz/model.fga``) gives each its rights."""
SHAREABLE_TYPES = (
    "dataset",
    "experiment_job",
    "serving_version",
    "serving_alias",
    "live_session",
    "modeling_session",
)
"""The resource types of the authorization model, each shareable with another workspace."""
QUOTA_COLUMNS = ("max_concurrent_jobs", "max_streams", "max_storage_bytes")
ALIAS_EVENT_KINDS = ("set", "rollback")
"""How an alias was repointed: set to a version, or rolled back to the one before."""

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
        sa.CheckConstraint(
            "max_concurrent_jobs IS NULL OR max_concurrent_jobs >= 0",
            name="max_concurrent_jobs_not_negative",
        ),
        sa.CheckConstraint(
            "max_streams IS NULL OR max_streams >= 0", name="max_streams_not_negative"
        ),
        sa.CheckConstraint(
            "max_storage_bytes IS NULL OR max_storage_bytes >= 0",
            name="max_storage_bytes_not_negative",
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    slug: Mapped[str] = mapped_column(sa.String(64), unique=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    max_concurrent_chunks: Mapped[int | None]
    """At most this many chunks of one of the workspace's sweeps run at once; None: no bound
    beyond the sweep's own."""
    max_concurrent_jobs: Mapped[int | None]
    """Quota: jobs queued or running at once; None: unlimited, 0: none may be submitted."""
    max_streams: Mapped[int | None]
    """Quota: serving streams open at once."""
    max_storage_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    """Quota: bytes of lake artifacts the workspace's jobs reference."""
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
    size_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    """The file's size when it was referenced (what it counts against the storage quota)."""
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


class ResourceShare(Base):
    """A resource of one workspace made readable in another (``shared_with`` in the model)."""

    __tablename__ = "resource_share"
    __table_args__ = (
        sa.UniqueConstraint(
            "resource_type", "resource_id", "shared_with_workspace_id", name="uq_resource_share"
        ),
        sa.CheckConstraint(in_list("resource_type", SHAREABLE_TYPES), name="resource_type"),
        sa.CheckConstraint("shared_with_workspace_id <> workspace_id", name="not_with_itself"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    resource_type: Mapped[str] = mapped_column(sa.String(32))
    resource_id: Mapped[str] = mapped_column(sa.String(200))
    shared_with_workspace_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("workspace.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


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


def _version_fk(table: str, column: str) -> sa.ForeignKeyConstraint:
    """``(workspace_id, column)`` names a serving version of the same workspace."""
    return sa.ForeignKeyConstraint(
        ["workspace_id", column],
        ["serving_version.workspace_id", "serving_version.version_id"],
        name=f"fk_{table}_{column}",
    )


class ServingVersion(Base):
    """An immutable serving snapshot registered in a workspace, addressed by ``version_id``, the
    hash of its content (:mod:`qmachina.serving.snapshot`).

    A row is never updated: the ORM refuses to flush a change to one
    (:class:`ImmutableRowError`) and the database refuses an ``UPDATE`` (a trigger made by the
    migration). ``id`` names it to the authorizer (``serving_version:<id>``): the same content
    registered in two workspaces is two resources.
    """

    __tablename__ = "serving_version"
    __table_args__ = (
        sa.UniqueConstraint("workspace_id", "version_id"),
        sa.CheckConstraint("length(version_id) = 64", name="version_id_length"),
        sa.Index("ix_serving_version_workspace_id_created_at", "workspace_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    version_id: Mapped[str] = mapped_column(sa.String(64))
    model_id: Mapped[str] = mapped_column(sa.String(100))
    source: Mapped[str] = mapped_column(sa.String(32))
    snapshot: Mapped[dict[str, Any]]
    registered_by: Mapped[str] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ServingAlias(Base):
    """A name in a workspace (``es-vp-prod``) pointing at one of its serving versions.

    Repointing it (activation, rollback) is the only change it knows; each one appends a
    :class:`ServingAliasEvent` numbered by ``last_event_seq``.
    """

    __tablename__ = "serving_alias"
    __table_args__ = (
        sa.UniqueConstraint("workspace_id", "name"),
        sa.UniqueConstraint("workspace_id", "id"),
        _version_fk("serving_alias", "version_id"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    name: Mapped[str] = mapped_column(sa.String(64))
    version_id: Mapped[str] = mapped_column(sa.String(64))
    last_event_seq: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)


class ServingAliasEvent(Base):
    """One repoint of an alias: who moved it from which version to which, why, and when.
    Append-only, like :class:`ServingVersion` (the ORM and a trigger refuse updates)."""

    __tablename__ = "serving_alias_event"
    __table_args__ = (
        sa.UniqueConstraint("alias_id", "seq"),
        sa.CheckConstraint(in_list("kind", ALIAS_EVENT_KINDS), name="kind"),
        sa.ForeignKeyConstraint(
            ["workspace_id", "alias_id"],
            ["serving_alias.workspace_id", "serving_alias.id"],
            ondelete="CASCADE",
            name="fk_serving_alias_event_alias",
        ),
        _version_fk("serving_alias_event", "from_version_id"),
        _version_fk("serving_alias_event", "to_version_id"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    alias_id: Mapped[str] = mapped_column(sa.String(36), index=True)
    seq: Mapped[int]
    kind: Mapped[str] = mapped_column(sa.String(16))
    from_version_id: Mapped[str | None] = mapped_column(sa.String(64))
    to_version_id: Mapped[str] = mapped_column(sa.String(64))
    actor: Mapped[str] = mapped_column(sa.String(200))
    reason: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ModelingSession(Base):
    """A Create-a-Model session: the record that it exists, who opened it and which workflow
    runs it. Its steps, decisions and state live in that workflow (``ModelingSession``); the row
    makes the session a resource the authorizer and the listing know."""

    __tablename__ = "modeling_session"
    __table_args__ = (
        sa.UniqueConstraint("workspace_id", "id"),
        sa.Index("ix_modeling_session_workspace_id_created_at", "workspace_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    title: Mapped[str] = mapped_column(sa.String(200))
    created_by: Mapped[str] = mapped_column(sa.String(200))
    workflow_id: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class LiveSession(Base):
    """A live ingestion session: what it ingests, who started it and which workflow runs it.
    Its state and progress live in that workflow (``LiveIngestionSession``)."""

    __tablename__ = "live_session"
    __table_args__ = (
        sa.UniqueConstraint("workspace_id", "id"),
        sa.Index("ix_live_session_workspace_id_created_at", "workspace_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    dataset: Mapped[str] = mapped_column(sa.String(64))
    subscription: Mapped[dict[str, Any]]
    """Symbols, their symbology, schema and the roll policy, as started."""
    created_by: Mapped[str] = mapped_column(sa.String(200))
    workflow_id: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ContractRollEvent(Base):
    """A session's active contract changed: from which instrument to which, why, and at which
    market time. Written once per roll (a retried ingestion finds it recorded)."""

    __tablename__ = "contract_roll_event"
    __table_args__ = (
        sa.UniqueConstraint("session_id", "ts_event", "to_instrument_id"),
        sa.ForeignKeyConstraint(
            ["workspace_id", "session_id"],
            ["live_session.workspace_id", "live_session.id"],
            ondelete="CASCADE",
            name="fk_contract_roll_event_session",
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = _workspace_fk()
    session_id: Mapped[str] = mapped_column(sa.String(36), index=True)
    symbol: Mapped[str] = mapped_column(sa.String(64))
    """The subscribed symbol that rolled (``ES.c.0``)."""
    from_instrument_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    from_symbol: Mapped[str | None] = mapped_column(sa.String(64))
    to_instrument_id: Mapped[int] = mapped_column(sa.BigInteger)
    to_symbol: Mapped[str] = mapped_column(sa.String(64))
    reason: Mapped[str] = mapped_column(sa.String(200))
    ts_event: Mapped[int] = mapped_column(sa.BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ImmutableRowError(RuntimeError):
    """A change to a row that is never changed (a serving version, an alias event)."""


IMMUTABLE_TABLES = (ServingVersion.__tablename__, ServingAliasEvent.__tablename__)
"""Tables whose rows the database refuses to update (the 0004 migration's triggers)."""


def _refuse_update(mapper: Mapper[Any], connection: sa.Connection, target: Base) -> None:
    raise ImmutableRowError(
        f"{type(target).__tablename__} {getattr(target, 'id', '?')} is immutable; register a "
        "new version (or repoint the alias) instead"
    )


for _immutable in (ServingVersion, ServingAliasEvent):
    event.listen(_immutable, "before_update", _refuse_update)
