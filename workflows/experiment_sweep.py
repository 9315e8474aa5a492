"""ExperimentSweep: an experiment's sweep points evaluated in chunks, durably.

The workflow plans the sweep (an activity expands the points and marks the job running), then
fans ``evaluate_chunk`` activities out with at most ``max_concurrent_chunks`` in flight. Each
chunk records its points in the store itself (idempotent per point hash) and heartbeats its
progress, so a chunk retried after a worker loss resumes where it stopped. A ``cancel`` signal or
a Temporal cancellation stops scheduling, cancels the running chunks and ends the job
``canceled`` with the finished points kept. After ``chunks_per_run`` chunks the workflow
continues as new, carrying the plan and the set of finished chunks forward. At the end, whatever
the outcome, ``finish_sweep`` ends the job and then ``track_sweep`` logs its recorded points to
MLflow.
The ``progress`` query reports done/total, the best point so far and an ETA.

This module holds the workflow and its input/output types; the activities import both, and the
workflow knows the activities only by name.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

PLAN_SWEEP = "plan_sweep"
EVALUATE_CHUNK = "evaluate_chunk"
TRACK_SWEEP = "track_sweep"
FINISH_SWEEP = "finish_sweep"
TRACKING_PATCH = "track-sweep-in-mlflow"

SweepState = Literal["planning", "running", "canceling", "succeeded", "failed", "canceled"]
FinalState = Literal["succeeded", "failed", "canceled"]


@dataclass(frozen=True)
class ExperimentSource:
    """Where an experiment and its inputs live on the workers' file system."""

    experiment: str
    """The experiment spec, relative to ``configs_root``."""
    configs_root: str
    data_root: str
    lake_root: str


@dataclass(frozen=True)
class ChunkBounds:
    """Points ``start .. end - 1`` of the expanded sweep."""

    start: int
    end: int


@dataclass(frozen=True)
class SweepPlan:
    """The expanded sweep: its size, a digest of its point hashes and its chunks."""

    points_total: int
    points_digest: str
    chunks: list[ChunkBounds]
    max_concurrent_chunks: int
    objective: str = ""
    """The metric the leaderboard ranks by, on the training span."""


@dataclass(frozen=True)
class BestPoint:
    """The best point so far by the objective on the training span."""

    point_hash: str
    objective_value: float


@dataclass(frozen=True)
class SweepCheckpoint:
    """What a sweep carries into its next run when it continues as new."""

    plan: SweepPlan
    chunks_done: list[int]
    points_done: int
    points_failed: int
    best: BestPoint | None = None
    started_at: datetime | None = None


@dataclass(frozen=True)
class SweepRequest:
    """The workflow's input; ``chunk_points`` and ``max_concurrent_chunks`` override the spec's
    parallelism. ``point_delay_seconds`` slows every point down (tests of crashes and cancel)."""

    workspace_id: str
    job_id: str
    source: ExperimentSource
    chunk_points: int | None = None
    max_concurrent_chunks: int | None = None
    chunks_per_run: int = 500
    heartbeat_timeout_seconds: float = 30.0
    point_delay_seconds: float = 0.0
    checkpoint: SweepCheckpoint | None = None


@dataclass(frozen=True)
class PlanRequest:
    workspace_id: str
    job_id: str
    source: ExperimentSource
    chunk_points: int | None
    max_concurrent_chunks: int | None


@dataclass(frozen=True)
class ChunkRequest:
    workspace_id: str
    job_id: str
    source: ExperimentSource
    chunk_index: int
    bounds: ChunkBounds
    points_digest: str
    """The plan's digest: a chunk refuses to run if the spec now expands differently."""
    point_delay_seconds: float = 0.0
    points_total: int = 0
    objective: str = ""


@dataclass(frozen=True)
class ChunkResult:
    """Points of the chunk recorded (by any attempt), and how many of them failed."""

    chunk_index: int
    points_done: int
    points_failed: int
    best: BestPoint | None = None
    """The chunk's best succeeded point, if it has one with a finite objective."""


@dataclass(frozen=True)
class TrackRequest:
    workspace_id: str
    job_id: str
    source: ExperimentSource
    state: FinalState
    sweep_key: str
    """The workflow id: a retried tracking finds the MLflow parent run it already created."""


@dataclass(frozen=True)
class TrackResult:
    """The MLflow parent run, or why the sweep was not tracked."""

    parent_run_id: str | None
    skipped_reason: str | None = None


@dataclass(frozen=True)
class FinishRequest:
    workspace_id: str
    job_id: str
    state: FinalState
    error: str | None = None
    tracking_error: str | None = None


@dataclass(frozen=True)
class SweepOutcome:
    """The job's final state and its recorded runs, counted in the store."""

    state: FinalState
    points_recorded: int
    points_failed: int


@dataclass(frozen=True)
class SweepProgress:
    state: SweepState
    points_total: int
    points_done: int
    points_failed: int
    chunks_total: int
    chunks_done: int
    chunks_in_flight: int
    objective: str = ""
    best: BestPoint | None = None
    elapsed_seconds: float = 0.0
    """Since the first chunk started (workflow time, across continue-as-new)."""
    eta_seconds: float | None = None
    """Remaining points at the pace so far; None until a point is done."""


def better(current: BestPoint | None, candidate: BestPoint | None) -> BestPoint | None:
    """The better of two best points: the higher objective, ties to the smaller point hash."""
    if candidate is None:
        return current
    if current is None:
        return candidate
    if (candidate.objective_value, current.point_hash) > (
        current.objective_value,
        candidate.point_hash,
    ):
        return candidate
    return current


def _cause(error: BaseException) -> BaseException:
    """The activity's own error behind an ``ActivityError``."""
    if isinstance(error, ActivityError) and error.cause is not None:
        return error.cause
    return error


PLAN_RETRY = RetryPolicy(maximum_attempts=3)
TRACK_RETRY = RetryPolicy(maximum_attempts=3)
CHUNK_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
)


@workflow.defn
class ExperimentSweep:
    """Evaluates every point of an experiment once, in chunks, with bounded concurrency."""

    def __init__(self) -> None:
        self._state: SweepState = "planning"
        self._plan: SweepPlan | None = None
        self._chunks_done: set[int] = set()
        self._points_done = 0
        self._points_failed = 0
        self._in_flight: dict[int, workflow.ActivityHandle[ChunkResult]] = {}
        self._cancel_requested = False
        self._chunk_error: str | None = None
        self._best: BestPoint | None = None
        self._started_at: datetime | None = None
        self._points_at_start = 0

    @workflow.run
    async def run(self, request: SweepRequest) -> SweepOutcome:
        try:
            plan = await self._load_plan(request)
            await self._fan_out(request, plan)
        except (asyncio.CancelledError, ActivityError) as err:
            if not is_cancelled_exception(err):
                error = f"sweep planning failed: {_cause(err)}"
                await self._finish(request, "failed", error)
                raise ApplicationError(error, non_retryable=True) from err
            # Temporal cancellation: the same cooperative stop as the signal, then the job ends
            # canceled and the workflow reports itself canceled.
            self._request_cancel()
            await self._drain()
            await self._finish_and_track(request, "canceled")
            raise
        if self._cancel_requested:
            return await self._finish_and_track(request, "canceled")
        if self._chunk_error is not None:
            await self._finish_and_track(request, "failed", self._chunk_error)
            raise ApplicationError(self._chunk_error, non_retryable=True)
        if len(self._chunks_done) < len(plan.chunks):
            workflow.continue_as_new(
                replace(
                    request,
                    checkpoint=SweepCheckpoint(
                        plan,
                        sorted(self._chunks_done),
                        self._points_done,
                        self._points_failed,
                        self._best,
                        self._started_at,
                    ),
                )
            )
        return await self._finish_and_track(request, "succeeded")

    @workflow.query
    def progress(self) -> SweepProgress:
        plan = self._plan
        points_total = plan.points_total if plan else 0
        elapsed = 0.0
        eta: float | None = None
        if self._started_at is not None:
            elapsed = (workflow.now() - self._started_at).total_seconds()
            if self._points_done > 0:
                eta = elapsed / self._points_done * (points_total - self._points_done)
        return SweepProgress(
            state=self._state,
            points_total=points_total,
            points_done=self._points_done,
            points_failed=self._points_failed,
            chunks_total=len(plan.chunks) if plan else 0,
            chunks_done=len(self._chunks_done),
            chunks_in_flight=len(self._in_flight),
            objective=plan.objective if plan else "",
            best=self._best,
            elapsed_seconds=elapsed,
            eta_seconds=eta,
        )

    @workflow.signal
    def cancel(self) -> None:
        """Stop scheduling chunks, cancel the running ones, end the job canceled."""
        self._request_cancel()

    async def _load_plan(self, request: SweepRequest) -> SweepPlan:
        if request.checkpoint is not None:
            checkpoint = request.checkpoint
            self._chunks_done = set(checkpoint.chunks_done)
            self._points_done = checkpoint.points_done
            self._points_failed = checkpoint.points_failed
            self._best = checkpoint.best
            self._started_at = checkpoint.started_at
            plan = checkpoint.plan
        else:
            plan = await workflow.execute_activity(
                PLAN_SWEEP,
                PlanRequest(
                    request.workspace_id,
                    request.job_id,
                    request.source,
                    request.chunk_points,
                    request.max_concurrent_chunks,
                ),
                result_type=SweepPlan,
                start_to_close_timeout=timedelta(hours=1),
                heartbeat_timeout=timedelta(seconds=request.heartbeat_timeout_seconds),
                retry_policy=PLAN_RETRY,
            )
        self._plan = plan
        if not self._cancel_requested:
            self._state = "running"
        return plan

    async def _fan_out(self, request: SweepRequest, plan: SweepPlan) -> None:
        if self._started_at is None:
            self._started_at = workflow.now()
        started = 0
        for index, bounds in enumerate(plan.chunks):
            if index in self._chunks_done:
                continue
            await workflow.wait_condition(
                lambda: self._stopping or len(self._in_flight) < plan.max_concurrent_chunks
            )
            if self._stopping or self._continue_as_new_due(request, started):
                break
            self._start_chunk(request, plan, index, bounds)
            started += 1
        await self._drain()

    @property
    def _stopping(self) -> bool:
        return self._cancel_requested or self._chunk_error is not None

    def _continue_as_new_due(self, request: SweepRequest, started: int) -> bool:
        return started >= request.chunks_per_run or workflow.info().is_continue_as_new_suggested()

    def _start_chunk(
        self, request: SweepRequest, plan: SweepPlan, index: int, bounds: ChunkBounds
    ) -> None:
        handle = workflow.start_activity(
            EVALUATE_CHUNK,
            ChunkRequest(
                request.workspace_id,
                request.job_id,
                request.source,
                index,
                bounds,
                plan.points_digest,
                request.point_delay_seconds,
                plan.points_total,
                plan.objective,
            ),
            result_type=ChunkResult,
            start_to_close_timeout=timedelta(hours=4),
            heartbeat_timeout=timedelta(seconds=request.heartbeat_timeout_seconds),
            retry_policy=CHUNK_RETRY,
            # A canceled chunk reports back only once it stopped, so the job ends canceled
            # after its last point is recorded, never before.
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        self._in_flight[index] = handle
        handle.add_done_callback(lambda done: self._chunk_finished(index, done))

    def _chunk_finished(self, index: int, handle: asyncio.Future[ChunkResult]) -> None:
        del self._in_flight[index]
        if handle.cancelled():
            return
        error = handle.exception()
        if error is None:
            result = handle.result()
            self._chunks_done.add(index)
            self._points_done += result.points_done
            self._points_failed += result.points_failed
            self._best = better(self._best, result.best)
        elif not self._cancel_requested:
            self._chunk_error = f"chunk {index} failed: {_cause(error)}"

    def _request_cancel(self) -> None:
        self._cancel_requested = True
        self._state = "canceling"
        for handle in self._in_flight.values():
            handle.cancel()

    async def _drain(self) -> None:
        await workflow.wait_condition(lambda: not self._in_flight)

    async def _finish_and_track(
        self, request: SweepRequest, state: FinalState, error: str | None = None
    ) -> SweepOutcome:
        """End the job, then log it to MLflow (whatever its state: partial results are kept).

        The job is final as soon as its points are recorded: the SQL store is the source of
        truth and MLflow a view of it that follows (~15-30 ms per point on SQLite). A tracking
        failure is reported on the job (a ``tracking_failed`` event); it never changes the
        job's state."""
        outcome = await self._finish(request, state, error)
        if workflow.patched(TRACKING_PATCH):
            try:
                await workflow.execute_activity(
                    TRACK_SWEEP,
                    TrackRequest(
                        request.workspace_id,
                        request.job_id,
                        request.source,
                        state,
                        workflow.info().workflow_id,
                    ),
                    result_type=TrackResult,
                    start_to_close_timeout=timedelta(hours=1),
                    heartbeat_timeout=timedelta(seconds=request.heartbeat_timeout_seconds),
                    retry_policy=TRACK_RETRY,
                )
            except ActivityError as err:
                await self._finish(
                    request, state, error, tracking_error=f"MLflow tracking failed: {_cause(err)}"
                )
        return outcome

    async def _finish(
        self,
        request: SweepRequest,
        state: FinalState,
        error: str | None = None,
        tracking_error: str | None = None,
    ) -> SweepOutcome:
        outcome: SweepOutcome = await workflow.execute_activity(
            FINISH_SWEEP,
            FinishRequest(request.workspace_id, request.job_id, state, error, tracking_error),
            result_type=SweepOutcome,
            start_to_close_timeout=timedelta(minutes=1),
        )
        self._state = state
        return outcome
