"""``/v1/jobs/experiments``: submit an experiment sweep, follow it (state, progress, events),
cancel it, and browse the runs it recorded."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, status
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api import jobs_service
from api.auth import CurrentPrincipal
from api.dependencies import CurrentWorkspace, State
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
from qmachina.store.models import ExperimentJob, ExperimentRun
from qmachina.temporal_names import sweep_workflow_id

router = APIRouter(prefix=JOBS_PATH, tags=["experiment jobs"])


def job_fields(view: jobs_service.JobView) -> dict[str, Any]:
    """The fields every job response shares."""
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
        "links": job_links(job.id, slug),
    }


def job_of(view: jobs_service.JobView) -> Job:
    """A job as listed."""
    return Job(**job_fields(view))


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SubmittedJob,
    responses=problem_responses(404, 422, 503),
)
async def submit_experiment_job(
    submission: ExperimentSubmission, state: State, principal: CurrentPrincipal
) -> SubmittedJob:
    """Validate the spec in full (as ``qmachina config validate`` does), create the queued job
    and start its sweep. A bad spec answers 422 naming every field, and nothing is started; a
    workflow that cannot be started fails the job and answers 503."""
    submitted = await jobs_service.submit_experiment(state, submission, principal)
    return SubmittedJob(
        **job_fields(submitted.view),
        experiment=submitted.accepted.experiment,
        chunk_points=submitted.request.chunk_points,
        max_concurrent_chunks=submitted.max_concurrent_chunks,
    )


@router.get("", response_model=JobList, responses=problem_responses(404, 422))
async def list_experiment_jobs(
    state: State,
    workspace: CurrentWorkspace,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    """The workspace's experiment jobs, newest first, with their run counts."""
    views = await jobs_service.job_views(state.sessions, workspace, limit=limit, offset=offset)
    return JobList(jobs=[job_of(view) for view in views])


@router.get("/{job_id}", response_model=JobDetail, responses=problem_responses(404, 422))
async def get_experiment_job(job_id: str, state: State, workspace: CurrentWorkspace) -> JobDetail:
    """The job, its recorded runs, its best run so far and, while it runs, its workflow's
    progress."""
    found = await jobs_service.job_state(state, workspace, job_id)
    best = found.best
    return JobDetail(
        **job_fields(found.view),
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
    responses=problem_responses(404, 409, 422, 503),
)
async def cancel_experiment_job(
    job_id: str, state: State, workspace: CurrentWorkspace, principal: CurrentPrincipal
) -> Job:
    """Ask the sweep to stop: running chunks are canceled, finished points kept, and the job
    ends ``canceled``. 409 when the job has already ended."""
    return job_of(await jobs_service.cancel_job(state, workspace, job_id, principal))


async def existing_job(job_id: str, state: State, workspace: CurrentWorkspace) -> ExperimentJob:
    """The job a stream follows, looked up before the stream starts so a bad id is a 404."""
    return await jobs_service.find_job(state.sessions, workspace, job_id)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    dependencies=[Depends(existing_job)],
    responses={
        404: {"description": "No such workspace or job", "content": PROBLEM_JSON},
        422: {"description": "Invalid request", "content": PROBLEM_JSON},
    },
)
async def stream_experiment_job_events(
    job_id: str,
    state: State,
    workspace: CurrentWorkspace,
    last_event_id: Annotated[
        int,
        Header(
            alias="Last-Event-ID",
            ge=0,
            description="Resume after this event: only events with a greater `id` are sent",
        ),
    ] = 0,
) -> AsyncIterable[ServerSentEvent]:
    """Server-Sent Events of the job: ``id`` is the event's sequence number, ``event`` its kind
    (``job_submitted``, ``sweep_planned``, ``progress``, ``cancel_requested``,
    ``sweep_finished``, ...), ``data`` its JSON payload. The stream ends after
    ``sweep_finished``, or once the history is replayed when the job has already ended."""
    async for event in jobs_service.job_events(state.sessions, workspace, job_id, last_event_id):
        yield ServerSentEvent(id=str(event.seq), event=event.kind, data=event.payload)


@router.get("/{job_id}/runs", response_model=RunPage, responses=problem_responses(404, 422))
async def list_experiment_job_runs(
    job_id: str,
    state: State,
    workspace: CurrentWorkspace,
    sort: Annotated[
        MetricPath, Query(description="A metric on a span: `train.<metric>` or `test.<metric>`")
    ] = "test.total_pnl_ticks",
    order: SortOrder = "desc",
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    min_value: Annotated[
        float | None,
        Query(allow_inf_nan=False, description="Keep runs whose `sort` metric is at least this"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> RunPage:
    """The job's runs sorted by a metric (runs without it last, ties by point hash), filtered
    by status and a minimum value of that metric, one page at a time."""
    query = jobs_service.RunQuery(sort, order == "desc", run_status, min_value, limit, offset)
    total, runs = await jobs_service.run_page(state.sessions, workspace, job_id, query)
    return RunPage(
        job_id=job_id,
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
async def get_experiment_job_run(
    job_id: str, point_hash: str, state: State, workspace: CurrentWorkspace
) -> RunDetail:
    """One sweep point's run: parameters, metrics per span, the specs it ran, and the error
    with its traceback when the point failed."""
    run = await jobs_service.run_detail(state.sessions, workspace, job_id, point_hash)
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
