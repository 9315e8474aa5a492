"""What the experiment job routes do: submit a sweep, read a job with its live progress, cancel
it, stream its events, and browse its runs.

A submission is validated in full before anything is written or started: Temporal retries a
workflow task whose input is invalid forever, so a bad spec must never reach a workflow. Every
function reads and writes inside the workspace it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import (
    Client,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.service import RPCError

from api.access import WorkspaceAccess
from api.dependencies import AppState, Sessions
from api.job_models import ExperimentSubmission
from api.problems import Issue, JobFinishedError, SpecRejectedError, TemporalUnavailableError
from api.quotas import reserve_job_slot
from qmachina.auth import Principal
from qmachina.authz.authorizer import AuthorizerUnavailableError
from qmachina.authz.evaluator import AuthzError
from qmachina.authz.relationships import owned_by
from qmachina.experiment_archive import INLINE_SPEC, AcceptedExperiment, ExperimentArchive
from qmachina.experiment_run import metric_at
from qmachina.settings import Settings
from qmachina.specs.errors import SpecError, SpecIssue
from qmachina.specs.pipeline import default_configs_root, default_data_root
from qmachina.store import repository as repo
from qmachina.store.models import ExperimentJob, ExperimentRun, JobEvent, Workspace
from qmachina.temporal_names import (
    SWEEP_JOB_KIND,
    SWEEP_TASK_QUEUE,
    job_search_attributes,
    sweep_workflow_id,
)
from workflows.experiment_sweep import (
    ExperimentSource,
    ExperimentSweep,
    SweepProgress,
    SweepRequest,
)

TERMINAL_EVENT = "sweep_finished"
"""The last event of a job (appended by the sweep's ``finish_sweep`` activity)."""
EVENTS_POLL_SECONDS = 0.5
EVENTS_PAGE = 1000
PROGRESS_QUERY_TIMEOUT = timedelta(seconds=5)


@dataclass(frozen=True)
class SweepRoots:
    """Where the API finds specs and data, and where the workers will (the same paths)."""

    configs: Path
    data: Path
    lake: Path
    archive: ExperimentArchive


def sweep_roots(settings: Settings) -> SweepRoots:
    """The settings' roots, absolute, so workers in any directory read the same files."""
    return SweepRoots(
        configs=(settings.configs_dir or default_configs_root()).resolve(),
        data=(settings.sample_data_dir or default_data_root()).resolve(),
        lake=settings.lake_dir.resolve(),
        archive=ExperimentArchive(settings.data_dir.resolve() / "specs" / "experiments"),
    )


@dataclass(frozen=True)
class JobView:
    """A job row, its workspace and its recorded runs by status."""

    job: ExperimentJob
    workspace: Workspace
    counts: Mapping[str, int]


@dataclass(frozen=True)
class Submission:
    """A job just created and the sweep its workflow was started with."""

    view: JobView
    accepted: AcceptedExperiment
    request: SweepRequest
    max_concurrent_chunks: int
    """The bound in force (the request's :attr:`SweepRequest.max_concurrent_chunks`)."""


@dataclass(frozen=True)
class LeadingRun:
    """The best succeeded run so far and its objective value on the training span."""

    run: ExperimentRun
    objective: str
    value: float


@dataclass(frozen=True)
class JobState:
    """A job with its live progress (while it runs) and its best run so far."""

    view: JobView
    objective: str | None
    progress: SweepProgress | None
    progress_error: str | None
    best: LeadingRun | None


@dataclass(frozen=True)
class RunQuery:
    """Which of a job's runs to list, and in what order."""

    sort: str
    descending: bool
    status: str | None
    min_value: float | None
    limit: int
    offset: int


def effective_concurrency(
    requested: int | None, spec_value: int, workspace_limit: int | None
) -> int:
    """The request's (else the spec's) bound on concurrent chunks, within the workspace's."""
    wanted = requested or spec_value
    return wanted if workspace_limit is None else min(wanted, workspace_limit)


def _issue(issue: SpecIssue, configs: Path, experiment: str | None) -> Issue:
    if issue.file == INLINE_SPEC:
        return Issue(field=f"spec.{issue.field}" if issue.field else "spec", message=issue.message)
    path = Path(issue.file)
    file = str(path.relative_to(configs)) if path.is_relative_to(configs) else issue.file
    field = issue.field or ("experiment" if file == experiment else "")
    return Issue(field=field, message=issue.message, file=file, line=issue.line)


def _accept(roots: SweepRoots, submission: ExperimentSubmission) -> AcceptedExperiment:
    """Validate and archive the submitted spec; a :class:`SpecRejectedError` names every
    problem."""
    try:
        if submission.experiment is not None:
            return roots.archive.accept_file(
                submission.experiment, configs_root=roots.configs, data_root=roots.data
            )
        assert submission.spec is not None  # the model requires exactly one of the two
        return roots.archive.accept_inline(
            submission.spec, configs_root=roots.configs, data_root=roots.data
        )
    except SpecError as error:
        raise SpecRejectedError(
            [_issue(issue, roots.configs, submission.experiment) for issue in error.issues]
        ) from None


async def submit_experiment(
    state: AppState, submission: ExperimentSubmission, access: WorkspaceAccess
) -> Submission:
    """Validate the spec, create the queued job (audited as the caller's subject) within the
    workspace's quotas, and start its sweep.

    Raises :class:`SpecRejectedError` and :class:`QuotaExceededError` before anything is
    written, and :class:`TemporalUnavailableError` (the job then failed) when the job cannot be
    registered with the authorizer or its workflow cannot start.
    """
    workspace, principal = access.workspace, access.principal
    roots = sweep_roots(state.settings)
    accepted = await asyncio.to_thread(_accept, roots, submission)
    max_chunks = effective_concurrency(
        submission.max_concurrent_chunks,
        accepted.spec.parallelism.max_concurrent_chunks,
        workspace.max_concurrent_chunks,
    )
    async with state.sessions.begin() as session:
        await reserve_job_slot(session, workspace)
        job = await repo.create_job(
            session, workspace.id, submission.name or accepted.spec.name, accepted.spec_hash
        )
        facts = {
            "experiment": accepted.experiment,
            "spec_hash": accepted.spec_hash,
            "chunk_points": submission.chunk_points,
            "max_concurrent_chunks": max_chunks,
        }
        await repo.append_job_event(session, workspace.id, job.id, "job_submitted", facts)
        await repo.write_audit(
            session,
            workspace.id,
            actor=principal.subject,
            action="experiment_job.submit",
            target=job.id,
            payload=facts,
        )
    request = SweepRequest(
        workspace.id,
        job.id,
        ExperimentSource(accepted.experiment, str(roots.configs), str(roots.data), str(roots.lake)),
        chunk_points=submission.chunk_points,
        max_concurrent_chunks=max_chunks,
    )
    try:
        await state.authorizer.write_tuples([owned_by(workspace.id, "experiment_job", job.id)])
    except AuthzError as error:
        message = f"the job could not be registered with the authorizer: {error}"
        job = await _fail_unstarted(state.sessions, workspace.id, job.id, message)
        raise AuthorizerUnavailableError(f"experiment job {job.id} failed: {message}") from error
    try:
        await state.temporal.start_workflow(
            ExperimentSweep.run,
            request,
            id=sweep_workflow_id(workspace.id, job.id),
            task_queue=SWEEP_TASK_QUEUE,
            search_attributes=job_search_attributes(
                workspace.id, SWEEP_JOB_KIND, accepted.spec_hash
            ),
        )
    except RPCError as error:
        message = f"the sweep's workflow could not be started: {error}"
        job = await _fail_unstarted(state.sessions, workspace.id, job.id, message)
        raise TemporalUnavailableError(f"experiment job {job.id} failed: {message}") from error
    view = JobView(job, workspace, {"succeeded": 0, "failed": 0})
    return Submission(view, accepted, request, max_chunks)


async def _fail_unstarted(
    sessions: Sessions, workspace_id: str, job_id: str, message: str
) -> ExperimentJob:
    async with sessions.begin() as session:
        job = await repo.set_job_status(session, workspace_id, job_id, "failed", error=message)
        await repo.append_job_event(
            session,
            workspace_id,
            job_id,
            TERMINAL_EVENT,
            {"state": "failed", "succeeded": 0, "failed": 0, "error": message},
        )
    return job


async def _live_progress(
    client: Client, workspace_id: str, job_id: str
) -> tuple[SweepProgress | None, str | None]:
    handle = client.get_workflow_handle_for(
        ExperimentSweep.run, sweep_workflow_id(workspace_id, job_id)
    )
    try:
        progress = await handle.query(ExperimentSweep.progress, rpc_timeout=PROGRESS_QUERY_TIMEOUT)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as error:
        return None, f"the sweep's workflow could not be queried: {error}"
    return progress, None


def _objective_of(archive: ExperimentArchive, experiment_hash: str) -> str | None:
    spec = archive.load(experiment_hash)
    return None if spec is None else spec.objective


async def job_state(state: AppState, workspace: Workspace, job_id: str) -> JobState:
    """The job, its runs so far, its best run by its spec's objective (training span) and,
    while it is not finished, its workflow's progress."""
    async with state.sessions() as session:
        job = await repo.get_job(session, workspace.id, job_id)
    progress: SweepProgress | None = None
    progress_error: str | None = None
    if job.status not in repo.TERMINAL_JOB_STATUSES:
        progress, progress_error = await _live_progress(state.temporal, workspace.id, job.id)
    archive = sweep_roots(state.settings).archive
    objective = await asyncio.to_thread(_objective_of, archive, job.experiment_spec_hash)
    async with state.sessions() as session:
        # Read again: a sweep that ended while it was queried shows its final state.
        job = await repo.get_job(session, workspace.id, job_id)
        counts = await repo.run_counts(session, workspace.id, [job.id])
        best = None if objective is None else await _leading_run(session, job, objective)
    view = JobView(job, workspace, counts[job.id])
    return JobState(view, objective, progress, progress_error, best)


async def _leading_run(
    session: AsyncSession, job: ExperimentJob, objective: str
) -> LeadingRun | None:
    metric = f"train.{objective}"
    leaders = await repo.list_runs(
        session, job.workspace_id, job.id, order_by=metric, status="succeeded", limit=1
    )
    # Runs without the metric sort last: when the first has none, none has it.
    value = run_metric(leaders[0], metric) if leaders else None
    return None if value is None else LeadingRun(leaders[0], objective, value)


def run_metric(run: ExperimentRun, path: str) -> float | None:
    """The run's metric at a dotted path (``"test.total_pnl_ticks"``), if it has a number
    there."""
    return metric_at(run.metrics, path)


async def cancel_job(
    state: AppState, workspace: Workspace, job_id: str, principal: Principal
) -> JobView:
    """Signal the sweep to cancel (audited as the principal's subject); :class:`JobFinishedError`
    if it already ended.

    The event and audit rows are written in the transaction that holds the job row while the
    signal is sent, so the cancel request precedes the job's final event and is recorded only
    if the signal was delivered.
    """
    async with state.sessions.begin() as session:
        job = await repo.get_job(session, workspace.id, job_id, for_update=True)
        if job.status in repo.TERMINAL_JOB_STATUSES:
            raise JobFinishedError(job.id, job.status)
        await repo.append_job_event(session, workspace.id, job.id, "cancel_requested", {})
        await repo.write_audit(
            session,
            workspace.id,
            actor=principal.subject,
            action="experiment_job.cancel",
            target=job.id,
        )
        handle = state.temporal.get_workflow_handle_for(
            ExperimentSweep.run, sweep_workflow_id(workspace.id, job.id)
        )
        try:
            await handle.signal(ExperimentSweep.cancel)
        except RPCError as error:
            raise TemporalUnavailableError(
                f"experiment job {job.id}: the cancel signal could not be sent: {error}"
            ) from error
        counts = await repo.run_counts(session, workspace.id, [job.id])
    return JobView(job, workspace, counts[job.id])


async def job_events(
    sessions: Sessions, workspace: Workspace, job_id: str, after_seq: int
) -> AsyncIterator[JobEvent]:
    """The job's events after ``after_seq`` in order, polling the store for new ones until the
    terminal event; a job already finished ends the stream once its history is replayed."""
    last = after_seq
    while True:
        async with sessions() as session:
            # The status is read first: events committed with a final status are then seen.
            job = await repo.get_job(session, workspace.id, job_id)
            events = await repo.job_events_after(
                session, workspace.id, job_id, last, limit=EVENTS_PAGE
            )
        for event in events:
            yield event
            last = event.seq
            if event.kind == TERMINAL_EVENT:
                return
        if len(events) < EVENTS_PAGE:
            if job.status in repo.TERMINAL_JOB_STATUSES:
                return
            await asyncio.sleep(EVENTS_POLL_SECONDS)


async def job_views(
    sessions: Sessions, workspace: Workspace, *, limit: int | None = None, offset: int = 0
) -> list[JobView]:
    """The workspace's jobs, newest first, with their run counts."""
    async with sessions() as session:
        jobs = await repo.list_jobs(session, workspace.id, limit=limit, offset=offset)
        counts = await repo.run_counts(session, workspace.id, [job.id for job in jobs])
    return [JobView(job, workspace, counts[job.id]) for job in jobs]


async def experiment_groups(
    sessions: Sessions, workspace: Workspace
) -> list[tuple[str, list[JobView]]]:
    """The workspace's jobs grouped by name; groups and jobs newest first."""
    groups: dict[str, list[JobView]] = {}
    for view in await job_views(sessions, workspace):
        groups.setdefault(view.job.name, []).append(view)
    return list(groups.items())


async def run_page(
    sessions: Sessions, workspace: Workspace, job_id: str, query: RunQuery
) -> tuple[int, list[ExperimentRun]]:
    """How many of the job's runs match the query, and the requested page of them."""
    async with sessions() as session:
        await repo.get_job(session, workspace.id, job_id)
        total = await repo.count_runs(
            session,
            workspace.id,
            job_id,
            metric=query.sort,
            status=query.status,
            min_value=query.min_value,
        )
        runs = await repo.list_runs(
            session,
            workspace.id,
            job_id,
            order_by=query.sort,
            descending=query.descending,
            limit=query.limit,
            offset=query.offset,
            status=query.status,
            min_value=query.min_value,
        )
    return total, runs


async def run_detail(
    sessions: Sessions, workspace: Workspace, job_id: str, point_hash: str
) -> ExperimentRun:
    """One point's run of the job."""
    async with sessions() as session:
        await repo.get_job(session, workspace.id, job_id)
        return await repo.get_run(session, workspace.id, job_id, point_hash)
