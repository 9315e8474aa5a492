"""Typed reads and writes of the control-plane store, each scoped to one workspace.

Every function takes the caller's ``AsyncSession`` and a ``workspace_id`` and filters by it, so
no query can reach another workspace's rows. Functions flush but never commit: the caller owns
the transaction, which is how an audit row commits or rolls back with the change it describes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from qmachina.store.models import (
    RUN_STATUSES,
    AuditEvent,
    ExperimentJob,
    ExperimentRun,
    JobArtifact,
    JobEvent,
    Workspace,
    WorkspaceMember,
    new_id,
    utc_now,
)

JOB_TRANSITIONS: Mapping[str, frozenset[str]] = {
    # A queued job may be canceled before any worker picks it up, or fail when its workflow
    # cannot be started.
    "queued": frozenset({"running", "failed", "canceled"}),
    "running": frozenset({"succeeded", "failed", "canceled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "canceled": frozenset(),
}
TERMINAL_JOB_STATUSES = frozenset(s for s, nexts in JOB_TRANSITIONS.items() if not nexts)


class StoreError(Exception):
    """Base of the store's own errors."""


class JobNotFoundError(StoreError):
    """No job with this id in this workspace (it may exist in another one)."""

    def __init__(self, workspace_id: str, job_id: str) -> None:
        super().__init__(f"experiment job {job_id} not found in workspace {workspace_id}")
        self.workspace_id = workspace_id
        self.job_id = job_id


class InvalidJobTransitionError(StoreError):
    """A status change the job lifecycle does not allow."""

    def __init__(self, job_id: str, current: str, requested: str) -> None:
        allowed = ", ".join(sorted(JOB_TRANSITIONS.get(current, ()))) or "none (terminal)"
        super().__init__(
            f"experiment job {job_id} cannot go from {current!r} to {requested!r}; "
            f"allowed from {current!r}: {allowed}"
        )
        self.job_id = job_id
        self.current = current
        self.requested = requested


class RunNotFoundError(StoreError):
    """No run of this point in this job of this workspace."""

    def __init__(self, workspace_id: str, job_id: str, point_hash: str) -> None:
        super().__init__(
            f"experiment run {point_hash} not found in job {job_id} of workspace {workspace_id}"
        )
        self.workspace_id = workspace_id
        self.job_id = job_id
        self.point_hash = point_hash


class NonFiniteMetricError(StoreError):
    """A run's metrics hold NaN or an infinity, which JSON cannot represent."""

    def __init__(self, point_hash: str, path: str, value: float) -> None:
        super().__init__(f"experiment run {point_hash}: metric {path} is {value!r}, not finite")


async def create_workspace(session: AsyncSession, slug: str, name: str) -> Workspace:
    """A new workspace; ``slug`` is unique across the store."""
    workspace = Workspace(id=new_id(), slug=slug, name=name)
    session.add(workspace)
    await session.flush()
    return workspace


async def add_member(
    session: AsyncSession, workspace_id: str, subject: str, role: str
) -> WorkspaceMember:
    """Give ``subject`` (an OIDC subject) ``role`` (owner, editor or viewer) in the workspace."""
    member = WorkspaceMember(id=new_id(), workspace_id=workspace_id, subject=subject, role=role)
    session.add(member)
    await session.flush()
    return member


async def list_members(session: AsyncSession, workspace_id: str) -> list[WorkspaceMember]:
    """The workspace's members, by subject."""
    rows = await session.scalars(
        sa.select(WorkspaceMember)
        .where(WorkspaceMember.workspace_id == workspace_id)
        .order_by(WorkspaceMember.subject)
    )
    return list(rows)


async def create_job(
    session: AsyncSession,
    workspace_id: str,
    name: str,
    experiment_spec_hash: str,
    *,
    job_id: str | None = None,
) -> ExperimentJob:
    """A new queued experiment job; ``job_id`` names it when its creator must be able to find
    it again (a retried activity), else it gets a fresh id."""
    job = ExperimentJob(
        id=job_id or new_id(),
        workspace_id=workspace_id,
        name=name,
        experiment_spec_hash=experiment_spec_hash,
        status="queued",
        last_event_seq=0,
    )
    session.add(job)
    await session.flush()
    return job


async def get_job(
    session: AsyncSession, workspace_id: str, job_id: str, *, for_update: bool = False
) -> ExperimentJob:
    """The job, or :class:`JobNotFoundError` if the workspace has no such job."""
    query = sa.select(ExperimentJob).where(
        ExperimentJob.workspace_id == workspace_id, ExperimentJob.id == job_id
    )
    if for_update:
        query = query.with_for_update()
    job = await session.scalar(query)
    if job is None:
        raise JobNotFoundError(workspace_id, job_id)
    return job


async def list_jobs(
    session: AsyncSession, workspace_id: str, *, limit: int | None = None, offset: int = 0
) -> list[ExperimentJob]:
    """The workspace's jobs, newest first."""
    rows = await session.scalars(
        sa.select(ExperimentJob)
        .where(ExperimentJob.workspace_id == workspace_id)
        .order_by(ExperimentJob.created_at.desc(), ExperimentJob.id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows)


async def run_counts(
    session: AsyncSession, workspace_id: str, job_ids: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Recorded runs per job and status: ``{job_id: {"succeeded": n, "failed": m}}``, every
    given job present (with zeros when it has no runs)."""
    counts = {job_id: dict.fromkeys(RUN_STATUSES, 0) for job_id in job_ids}
    if not counts:
        return counts
    rows = await session.execute(
        sa.select(ExperimentRun.job_id, ExperimentRun.status, sa.func.count())
        .where(ExperimentRun.workspace_id == workspace_id, ExperimentRun.job_id.in_(counts))
        .group_by(ExperimentRun.job_id, ExperimentRun.status)
    )
    for job_id, status, count in rows:
        counts[job_id][status] = count
    return counts


async def set_job_status(
    session: AsyncSession,
    workspace_id: str,
    job_id: str,
    status: str,
    *,
    error: str | None = None,
) -> ExperimentJob:
    """Move the job to ``status`` along ``queued -> running -> succeeded|failed|canceled``.

    The row is locked (PostgreSQL) while the transition is checked; terminal states are final.
    Raises :class:`InvalidJobTransitionError` for any other change.
    """
    job = await get_job(session, workspace_id, job_id, for_update=True)
    if status not in JOB_TRANSITIONS[job.status]:
        raise InvalidJobTransitionError(job.id, job.status, status)
    now = utc_now()
    job.status = status
    if status == "running":
        job.started_at = now
    if status in TERMINAL_JOB_STATUSES:
        job.finished_at = now
        job.error = error
    await session.flush()
    return job


async def append_job_event(
    session: AsyncSession,
    workspace_id: str,
    job_id: str,
    kind: str,
    payload: Mapping[str, Any],
) -> JobEvent:
    """Append an event with the job's next sequence number (1, 2, ...), assigned atomically.

    The job's counter is incremented with ``UPDATE ... RETURNING``, which holds the job row's
    write lock until the transaction ends, so concurrent appends never share a number.
    """
    seq = await session.scalar(
        sa.update(ExperimentJob)
        .where(ExperimentJob.workspace_id == workspace_id, ExperimentJob.id == job_id)
        .values(last_event_seq=ExperimentJob.last_event_seq + 1)
        .returning(ExperimentJob.last_event_seq)
    )
    if seq is None:
        raise JobNotFoundError(workspace_id, job_id)
    job_event = JobEvent(
        id=new_id(),
        workspace_id=workspace_id,
        job_id=job_id,
        seq=seq,
        kind=kind,
        payload=dict(payload),
    )
    session.add(job_event)
    await session.flush()
    return job_event


async def job_events_after(
    session: AsyncSession, workspace_id: str, job_id: str, after_seq: int, limit: int = 1000
) -> list[JobEvent]:
    """The job's events with ``seq > after_seq`` in order (an SSE client's resume point)."""
    rows = await session.scalars(
        sa.select(JobEvent)
        .where(
            JobEvent.workspace_id == workspace_id,
            JobEvent.job_id == job_id,
            JobEvent.seq > after_seq,
        )
        .order_by(JobEvent.seq)
        .limit(limit)
    )
    return list(rows)


async def add_artifact(
    session: AsyncSession,
    workspace_id: str,
    job_id: str,
    kind: str,
    uri: str,
    sha256: str,
    size_bytes: int | None = None,
) -> JobArtifact:
    """Reference a lake file produced by the job, with its sha256 hex digest and size."""
    artifact = JobArtifact(
        id=new_id(),
        workspace_id=workspace_id,
        job_id=job_id,
        kind=kind,
        uri=uri,
        sha256=sha256,
        size_bytes=size_bytes,
    )
    session.add(artifact)
    await session.flush()
    return artifact


async def list_artifacts(
    session: AsyncSession, workspace_id: str, job_id: str
) -> list[JobArtifact]:
    """The job's artifacts, by URI."""
    rows = await session.scalars(
        sa.select(JobArtifact)
        .where(JobArtifact.workspace_id == workspace_id, JobArtifact.job_id == job_id)
        .order_by(JobArtifact.uri)
    )
    return list(rows)


def _check_finite(point_hash: str, metrics: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _check_finite(point_hash, value, f"{path}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteMetricError(point_hash, path, value)


def _upsert_run(dialect_name: str, values: dict[str, Any] | list[dict[str, Any]]) -> sa.Insert:
    """``INSERT ... ON CONFLICT (job_id, point_hash) DO UPDATE`` in the backend's dialect."""
    replaced = ("params", "metrics", "status", "spec_hashes", "updated_at")
    key = ["job_id", "point_hash"]
    if dialect_name == "postgresql":
        pg_insert = postgresql.insert(ExperimentRun).values(values)
        return pg_insert.on_conflict_do_update(
            index_elements=key, set_={name: pg_insert.excluded[name] for name in replaced}
        )
    if dialect_name == "sqlite":
        sqlite_insert = sqlite.insert(ExperimentRun).values(values)
        return sqlite_insert.on_conflict_do_update(
            index_elements=key, set_={name: sqlite_insert.excluded[name] for name in replaced}
        )
    raise StoreError(f"record_run supports postgresql and sqlite, not {dialect_name}")


async def record_run(
    session: AsyncSession,
    workspace_id: str,
    job_id: str,
    point_hash: str,
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    status: str,
    spec_hashes: Mapping[str, str],
) -> ExperimentRun:
    """Record the result of one sweep point; idempotent per ``(job_id, point_hash)``.

    Recording a point again keeps one row (same id and ``created_at``): the latest params,
    metrics, status and spec hashes replace the earlier ones, so a point retried after a
    failure ends with its final result. Metrics must be finite (NaN is not JSON).
    """
    _check_finite(point_hash, metrics)
    await get_job(session, workspace_id, job_id)
    now = utc_now()
    statement = _upsert_run(
        session.get_bind().dialect.name,
        {
            "id": new_id(),
            "workspace_id": workspace_id,
            "job_id": job_id,
            "point_hash": point_hash,
            "params": dict(params),
            "metrics": dict(metrics),
            "status": status,
            "spec_hashes": dict(spec_hashes),
            "created_at": now,
            "updated_at": now,
        },
    )
    run: ExperimentRun | None = await session.scalar(
        statement.returning(ExperimentRun), execution_options={"populate_existing": True}
    )
    if run is None:
        raise StoreError(f"experiment run {point_hash} of job {job_id}: upsert returned no row")
    return run


@dataclass(frozen=True)
class RunRecord:
    """One sweep point's result, for :func:`record_runs`."""

    point_hash: str
    params: Mapping[str, Any]
    metrics: Mapping[str, Any]
    status: str


RECORD_RUNS_ROWS_PER_STATEMENT = 500
"""Keeps a statement's bound parameters (10 per row) far below SQLite's and asyncpg's limits."""


async def record_runs(
    session: AsyncSession,
    workspace_id: str,
    job_id: str,
    records: Sequence[RunRecord],
    *,
    spec_hashes: Mapping[str, str],
) -> int:
    """Record many sweep points with multi-row upserts: the same rows and the same idempotence
    per ``(job_id, point_hash)`` as :func:`record_run` once per point, in a fraction of the
    round trips. Every record is checked before anything is written. Returns the count."""
    for record in records:
        _check_finite(record.point_hash, record.metrics)
    await get_job(session, workspace_id, job_id)
    now = utc_now()
    rows = [
        {
            "id": new_id(),
            "workspace_id": workspace_id,
            "job_id": job_id,
            "point_hash": record.point_hash,
            "params": dict(record.params),
            "metrics": dict(record.metrics),
            "status": record.status,
            "spec_hashes": dict(spec_hashes),
            "created_at": now,
            "updated_at": now,
        }
        for record in records
    ]
    dialect = session.get_bind().dialect.name
    for start in range(0, len(rows), RECORD_RUNS_ROWS_PER_STATEMENT):
        await session.execute(
            _upsert_run(dialect, rows[start : start + RECORD_RUNS_ROWS_PER_STATEMENT])
        )
    return len(rows)


def metric_value(metric: str) -> sa.ColumnElement[float]:
    """A run's metric as a number (NULL when the run has none): ``metric`` is a metric name or
    a dotted path into nested metrics (``"test.total_pnl_ticks"``)."""
    path: str | tuple[str, ...] = tuple(metric.split(".")) if "." in metric else metric
    value: sa.ColumnElement[float] = ExperimentRun.metrics[path].as_float()
    return value


def _runs_where(
    workspace_id: str,
    job_id: str,
    metric: sa.ColumnElement[float],
    status: str | None,
    min_value: float | None,
) -> list[sa.ColumnElement[bool]]:
    conditions = [ExperimentRun.workspace_id == workspace_id, ExperimentRun.job_id == job_id]
    if status is not None:
        conditions.append(ExperimentRun.status == status)
    if min_value is not None:
        conditions.append(metric >= min_value)
    return conditions


async def list_runs(
    session: AsyncSession,
    workspace_id: str,
    job_id: str,
    *,
    order_by: str,
    descending: bool = True,
    limit: int | None = None,
    offset: int = 0,
    status: str | None = None,
    min_value: float | None = None,
) -> list[ExperimentRun]:
    """The job's runs ordered numerically by a metric; runs without it come last, ties by
    point hash.

    ``order_by`` is a metric name, or a dotted path into nested metrics (``"test.sharpe"``).
    ``status`` keeps the runs with that status; ``min_value`` those whose metric is at least it.
    """
    metric = metric_value(order_by)
    direction = metric.desc() if descending else metric.asc()
    query = (
        sa.select(ExperimentRun)
        .where(*_runs_where(workspace_id, job_id, metric, status, min_value))
        .order_by(direction.nulls_last(), ExperimentRun.point_hash)
        .limit(limit)
        .offset(offset)
    )
    return list(await session.scalars(query))


async def count_runs(
    session: AsyncSession,
    workspace_id: str,
    job_id: str,
    *,
    metric: str,
    status: str | None = None,
    min_value: float | None = None,
) -> int:
    """How many runs :func:`list_runs` finds with the same filters, before paging."""
    conditions = _runs_where(workspace_id, job_id, metric_value(metric), status, min_value)
    count = await session.scalar(
        sa.select(sa.func.count()).select_from(ExperimentRun).where(*conditions)
    )
    return count or 0


async def get_run(
    session: AsyncSession, workspace_id: str, job_id: str, point_hash: str
) -> ExperimentRun:
    """The run of a point, or :class:`RunNotFoundError` if the job has no such run."""
    run = await session.scalar(
        sa.select(ExperimentRun).where(
            ExperimentRun.workspace_id == workspace_id,
            ExperimentRun.job_id == job_id,
            ExperimentRun.point_hash == point_hash,
        )
    )
    if run is None:
        raise RunNotFoundError(workspace_id, job_id, point_hash)
    return run


async def write_audit(
    session: AsyncSession,
    workspace_id: str,
    *,
    actor: str,
    action: str,
    target: str,
    payload: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit row in the session's transaction, so it commits only with the change."""
    audit_event = AuditEvent(
        id=new_id(),
        workspace_id=workspace_id,
        actor=actor,
        action=action,
        target=target,
        payload=dict(payload or {}),
    )
    session.add(audit_event)
    await session.flush()
    return audit_event


async def audit_trail(session: AsyncSession, workspace_id: str) -> list[AuditEvent]:
    """The workspace's audit rows, oldest first."""
    rows = await session.scalars(
        sa.select(AuditEvent)
        .where(AuditEvent.workspace_id == workspace_id)
        .order_by(AuditEvent.created_at, AuditEvent.id)
    )
    return list(rows)


async def workspace_by_slug(session: AsyncSession, slug: str) -> Workspace | None:
    """The workspace with this slug, if any."""
    found: Workspace | None = await session.scalar(
        sa.select(Workspace).where(Workspace.slug == slug)
    )
    return found


async def ensure_workspace(session: AsyncSession, slug: str, name: str) -> Workspace:
    """The workspace with this slug, created first if the store has none (idempotent)."""
    found = await workspace_by_slug(session, slug)
    if found is not None:
        return found
    return await create_workspace(session, slug, name)
