"""``/v1/jobs/experiments``: submit an experiment sweep, follow it (state, progress, events),
cancel it, and browse the runs it recorded."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response, status
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api import jobs_service, sharing
from api.access import InWorkspace, JobAccess, OnJob, WorkspaceAccess
from api.bounds import MAX_INT64, Limit, Offset
from api.dependencies import State
from api.job_models import (
    JOBS_PATH,
    BestRun,
    ExperimentSubmission,
    Job,
    JobDetail,
    JobList,
    MetricPath,
    RunCounts,
    RunDetail,
    RunPage,
    RunStatus,
    RunSummary,
    SortOrder,
    SubmittedJob,
    job_links,
)
from api.problems import PROBLEM_JSON, problem_responses
from qmachina.store.models import ExperimentRun
from qmachina.temporal_names import sweep_workflow_id

router = APIRouter(prefix=JOBS_PATH, tags=["experiment jobs"])

Submitter = Annotated[WorkspaceAccess, Depends(InWorkspace("can_mutate"))]
Reader = Annotated[WorkspaceAccess, Depends(InWorkspace("can_read"))]
JobReader = Annotated[JobAccess, Depends(OnJob("can_read"))]
JobMutator = Annotated[JobAccess, Depends(OnJob("can_mutate"))]
JobSharer = Annotated[JobAccess, Depends(OnJob("can_share"))]


def job_fields(view: jobs_service.JobView, seen_from: str | None = None) -> dict[str, Any]:
    """The fields every job response shares; links are addressed from ``seen_from`` (the
    workspace acted in, which differs from the job's own for a shared job)."""
    job, slug = view.job, view.workspace.slug
    return {
        "id": job.id,
        "workspace": slug,
        "name": job.name,
        "status": job.status,
        "spec_hash": job.experiment_spec_hash,
        "workflow_id": sweep_workflow_id(view.workspace.id, job.id),
        "error": job.error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "counts": RunCounts(succeeded=view.counts["succeeded"], failed=view.counts["failed"]),
        "links": job_links(job.id, seen_from or slug),
    }


def job_of(view: jobs_service.JobView) -> Job:
    """A job as listed."""
    return Job(**job_fields(view))


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SubmittedJob,
    responses=problem_responses(403, 404, 422, 429, 503),
)
async def submit_experiment_job(
    submission: ExperimentSubmission, state: State, access: Submitter
) -> SubmittedJob:
    """Validate the spec in full (as ``qmachina config validate`` does), create the queued job
    and start its sweep. A bad spec answers 422 naming every field, and nothing is started; so
    does a workspace at its job or storage quota (429, stating the limit and current use); a
    workflow that cannot be started fails the job and answers 503. Needs ``can_mutate`` on the
    workspace (editors and above)."""
    submitted = await jobs_service.submit_experiment(state, submission, access)
    return SubmittedJob(
        **job_fields(submitted.view),
        experiment=submitted.accepted.experiment,
        chunk_points=submitted.request.chunk_points,
        max_concurrent_chunks=submitted.max_concurrent_chunks,
    )


@router.get("", response_model=JobList, responses=problem_responses(404, 422))
async def list_experiment_jobs(
    state: State,
    access: Reader,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JobList:
    """The workspace's experiment jobs, newest first, with their run counts."""
    views = await jobs_service.job_views(
        state.sessions, access.workspace, limit=limit, offset=offset
    )
    return JobList(jobs=[job_of(view) for view in views])


@router.get("/{job_id}", response_model=JobDetail, responses=problem_responses(404, 422))
async def get_experiment_job(state: State, access: JobReader) -> JobDetail:
    """The job, its recorded runs, its best run so far and, while it runs, its workflow's
    progress."""
    found = await jobs_service.job_state(state, access.owner, access.job.id)
    best = found.best
    return JobDetail(
        **job_fields(found.view, access.workspace.slug),
        objective=found.objective,
        progress=found.progress,
        progress_error=found.progress_error,
        best_run=None
        if best is None
        else BestRun(
            point_hash=best.run.point_hash,
            objective=best.objective,
            value=best.value,
            params=best.run.params,
            metrics=best.run.metrics,
        ),
    )


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Job,
    responses=problem_responses(403, 404, 409, 422, 503),
)
async def cancel_experiment_job(state: State, access: JobMutator) -> Job:
    """Ask the sweep to stop: running chunks are canceled, finished points kept, and the job
    ends ``canceled``. 409 when the job has already ended."""
    return job_of(
        await jobs_service.cancel_job(state, access.owner, access.job.id, access.principal)
    )


@router.put(
    "/{job_id}/shares/{target}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problem_responses(403, 404, 409, 422),
)
async def share_experiment_job(target: str, state: State, access: JobSharer) -> None:
    """Make the job (its runs and events) readable, and nothing more, in workspace ``target``.
    Sharing twice is a no-op. Needs ``can_share`` (admins of the owning workspace)."""
    await sharing.set_shared(
        state, access.principal, access.owner, ("experiment_job", access.job.id), target, True
    )


@router.delete(
    "/{job_id}/shares/{target}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problem_responses(403, 404, 422),
)
async def unshare_experiment_job(target: str, state: State, access: JobSharer) -> None:
    """Withdraw the job from workspace ``target``; withdrawing what was not shared is a no-op."""
    await sharing.set_shared(
        state, access.principal, access.owner, ("experiment_job", access.job.id), target, False
    )


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        404: {"description": "No such workspace or job", "content": PROBLEM_JSON},
        422: {"description": "Invalid request", "content": PROBLEM_JSON},
    },
)
async def stream_experiment_job_events(
    state: State,
    access: JobReader,
    last_event_id: Annotated[
        int,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=MAX_INT64,
            description="Resume after this event: only events with a greater `id` are sent",
        ),
    ] = 0,
) -> AsyncIterable[ServerSentEvent]:
    """Server-Sent Events of the job: ``id`` is the event's sequence number, ``event`` its kind
    (``job_submitted``, ``sweep_planned``, ``progress``, ``cancel_requested``,
    ``sweep_finished``, ...), ``data`` its JSON payload. The stream ends after
    ``sweep_finished``, or once the history is replayed when the job has already ended."""
    events = jobs_service.job_events(state.sessions, access.owner, access.job.id, last_event_id)
    async for event in events:
        yield ServerSentEvent(id=str(event.seq), event=event.kind, data=event.payload)


@router.get("/{job_id}/runs", response_model=RunPage, responses=problem_responses(404, 422))
async def list_experiment_job_runs(
    state: State,
    access: JobReader,
    sort: Annotated[
        MetricPath, Query(description="A metric on a span: `train.<metric>` or `test.<metric>`")
    ] = "test.total_pnl_ticks",
    order: SortOrder = "desc",
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    min_value: Annotated[
        float | None,
        Query(allow_inf_nan=False, description="Keep runs whose `sort` metric is at least this"),
    ] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> RunPage:
    """The job's runs sorted by a metric (runs without it last, ties by point hash), filtered
    by status and a minimum value of that metric, one page at a time."""
    query = jobs_service.RunQuery(sort, order == "desc", run_status, min_value, limit, offset)
    total, runs = await jobs_service.run_page(state.sessions, access.owner, access.job.id, query)
    return RunPage(
        job_id=access.job.id,
        sort=sort,
        order=order,
        total=total,
        limit=limit,
        offset=offset,
        runs=[_summary(run, sort) for run in runs],
    )


def _summary(run: ExperimentRun, sort: str) -> RunSummary:
    return RunSummary.model_validate(
        {
            "point_hash": run.point_hash,
            "status": run.status,
            "value": jobs_service.run_metric(run, sort),
            "params": run.params,
            "metrics": run.metrics,
        }
    )


@router.get(
    "/{job_id}/runs/{point_hash}", response_model=RunDetail, responses=problem_responses(404, 422)
)
async def get_experiment_job_run(point_hash: str, state: State, access: JobReader) -> RunDetail:
    """One sweep point's run: parameters, metrics per span, the specs it ran, and the error
    with its traceback when the point failed."""
    run = await jobs_service.run_detail(state.sessions, access.owner, access.job.id, point_hash)
    return RunDetail.model_validate(
        {
            "job_id": run.job_id,
            "point_hash": run.point_hash,
            "status": run.status,
            "params": run.params,
            "metrics": run.metrics,
            "spec_hashes": run.spec_hashes,
            "error": run.metrics.get("error") if run.status == "failed" else None,
            "created_at": run.created_at,
            "updated_at": run.updated_at,
        }
    )
