"""Request and response models of the experiment jobs API: the schemas of the OpenAPI document.

A job's live progress is the workflow's own :class:`SweepProgress` dataclass, so its schema and
its fields are defined once, in the workflow module.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from workflows.experiment_sweep import SweepProgress

JOBS_PATH = "/v1/jobs/experiments"

WorkspaceSlug = Annotated[str, StringConstraints(min_length=1, max_length=64)]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
RunStatus = Literal["succeeded", "failed"]
MetricPath = Annotated[str, StringConstraints(pattern=r"^(train|test)\.[A-Za-z_][A-Za-z0-9_]*$")]
"""A metric on a span: runs store their metrics as ``{"train": {...}, "test": {...}}``."""
SortOrder = Literal["asc", "desc"]
PositiveInt = Annotated[int, Field(gt=0)]


class ExperimentSubmission(BaseModel):
    """A sweep to run: exactly one of ``experiment`` or ``spec``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"experiment": "experiments/es_derivative_sweep.yaml"}]},
    )

    experiment: str | None = Field(
        default=None,
        min_length=1,
        description="An ExperimentSpec file, relative to the configs root",
        examples=["experiments/es_derivative_sweep.yaml"],
    )
    spec: dict[str, Any] | None = Field(
        default=None,
        description="The ExperimentSpec itself, as in its YAML file; its references (serving "
        "spec, pipelines) are relative to the configs root",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="The job's name; default: the spec's name",
    )
    chunk_points: PositiveInt | None = Field(
        default=None, description="Points per chunk; default: the spec's parallelism"
    )
    max_concurrent_chunks: PositiveInt | None = Field(
        default=None,
        description="Chunks evaluated at once; default: the spec's parallelism. Never more "
        "than the workspace's limit, when it has one",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.experiment is None) == (self.spec is None):
            raise ValueError(
                "give exactly one of `experiment` (a spec file under the configs root) "
                "or `spec` (the ExperimentSpec inline)"
            )
        return self


class RunCounts(BaseModel):
    """Runs recorded in the store so far, by status."""

    succeeded: int
    failed: int


class JobLinks(BaseModel):
    job: str
    events: str
    runs: str
    cancel: str


def job_links(job_id: str, workspace: str) -> JobLinks:
    """The job's resources, each scoped to its workspace."""
    base = f"{JOBS_PATH}/{job_id}"
    query = "?" + urlencode({"workspace": workspace})
    return JobLinks(
        job=base + query,
        events=f"{base}/events{query}",
        runs=f"{base}/runs{query}",
        cancel=f"{base}/cancel{query}",
    )


class Job(BaseModel):
    """An experiment sweep job and the runs it has recorded."""

    id: str
    workspace: str
    name: str
    status: JobStatus
    spec_hash: str = Field(description="The canonical sha256 of the ExperimentSpec")
    workflow_id: str = Field(description="The Temporal workflow running the sweep")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    counts: RunCounts
    links: JobLinks


class SubmittedJob(Job):
    """A job just submitted: queued, its workflow started."""

    experiment: str = Field(
        description="The spec file the sweep loads: relative to the configs root, or the "
        "absolute path of an archived inline spec"
    )
    chunk_points: int | None = Field(description="null: the spec's parallelism")
    max_concurrent_chunks: int = Field(
        description="The bound in force: the request's or the spec's, within the workspace's"
    )


class BestRun(BaseModel):
    """The best succeeded run so far by the spec's objective on the training span."""

    point_hash: str
    objective: str
    value: float
    params: dict[str, Any]
    metrics: dict[str, Any]


class JobDetail(Job):
    """A job with its live progress and its best run so far."""

    objective: str | None = Field(description="null when the job's spec is not archived")
    progress: SweepProgress | None = Field(
        description="The workflow's progress while the job is queued or running; null once "
        "it is finished (see `counts`) or when the workflow could not be queried"
    )
    progress_error: str | None = Field(description="Why the workflow could not be queried")
    best_run: BestRun | None


class JobList(BaseModel):
    jobs: list[Job] = Field(description="Newest first")


class ExperimentJobs(BaseModel):
    """The jobs sharing a name, newest first."""

    name: str
    jobs: list[Job]


class ExperimentList(BaseModel):
    experiments: list[ExperimentJobs] = Field(description="The most recently run first")


class RunSummary(BaseModel):
    point_hash: str
    status: RunStatus
    value: float | None = Field(description="The sorted-by metric; null when the run has none")
    params: dict[str, Any]
    metrics: dict[str, Any]


class RunPage(BaseModel):
    """One page of a job's runs, filtered and sorted by a metric."""

    job_id: str
    sort: str
    order: SortOrder
    total: int = Field(description="Runs matching the filters, before paging")
    limit: int
    offset: int
    runs: list[RunSummary]


class RunError(BaseModel):
    """Why a point failed."""

    type: str
    message: str
    traceback: str


class RunDetail(BaseModel):
    """One sweep point's run: its parameters, metrics per span, and the specs it ran."""

    job_id: str
    point_hash: str
    status: RunStatus
    params: dict[str, Any]
    metrics: dict[str, Any]
    spec_hashes: dict[str, Any]
    error: RunError | None = Field(description="Set for a failed point")
    created_at: datetime
    updated_at: datetime
