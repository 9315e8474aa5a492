"""Activities of the ExperimentSweep workflow: plan the sweep, evaluate a chunk, finish the job.

Points are expanded exactly as :func:`qmachina.experiment_run.run_experiment` expands them, so a
sweep run in-process and one run by Temporal have the same points and point hashes. Every write
is idempotent: runs are upserted per ``(job_id, point_hash)`` and status changes that already
happened are skipped, so any activity may be retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import Heartbeat, last_heartbeat
from activities.lake_frames import LakeFrames
from activities.sweep_tracking import TrackingTarget, leaderboard_of, log_sweep
from engine.evaluation import metrics_of
from engine.gold.graph import GoldGraph
from engine.signals.builtin import load_builtin_signals
from engine.signals.registry import SignalInputs, get_signal
from engine.silver_frame import SilverFrame
from engine.sweep_core import ScoreRequest, SweepPoint, expand_points, run_sweep_core, score_key
from qmachina.experiment_run import sweep_space
from qmachina.silver_build import MANIFEST_FILE, build_silver
from qmachina.specs.errors import SpecError
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.gold import load_gold_spec
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import ResolvedPipeline, resolve_pipeline
from qmachina.specs.serving import ServingSpec
from qmachina.specs.yaml_loader import load_spec
from qmachina.store import repository as repo
from qmachina.store.models import ExperimentRun, JobEvent, utc_now
from qmachina.tracking import silver_ref
from workflows.experiment_sweep import (
    EVALUATE_CHUNK,
    FINISH_SWEEP,
    PLAN_SWEEP,
    TRACK_SWEEP,
    BestPoint,
    ChunkBounds,
    ChunkRequest,
    ChunkResult,
    ExperimentSource,
    FinishRequest,
    PlanRequest,
    SweepOutcome,
    SweepPlan,
    TrackRequest,
    TrackResult,
    better,
)

Sessions = async_sessionmaker[AsyncSession]

PROGRESS_EVENT_INTERVAL_SECONDS = 1.0
"""A chunk appends a ``progress`` job event at most this often, and once when it ends."""
RECORD_BATCH_POINTS = 100
RECORD_BATCH_SECONDS = 0.5
"""A chunk commits its evaluated points (and heartbeats) every this many points or seconds,
whichever comes first: one transaction per batch instead of one per point."""


@dataclass(frozen=True)
class ChunkProgress:
    """Heartbeat details of ``evaluate_chunk``: the chunk's first ``points_done`` points are
    recorded, ``points_failed`` of them as failed; ``best`` is the best of them."""

    points_done: int
    points_failed: int
    best: BestPoint | None = None


@dataclass(frozen=True)
class LoadedSweep:
    """An experiment's spec chain and its expanded points."""

    experiment: ExperimentSpec
    gold_graph: GoldGraph
    points: list[SweepPoint]
    spec_hashes: dict[str, str]
    configs_root: Path
    data_root: Path
    lake_root: Path

    @property
    def points_digest(self) -> str:
        """sha256 of the point hashes in sweep order: equal digests, equal chunks."""
        return hashlib.sha256("\n".join(p.point_hash for p in self.points).encode()).hexdigest()

    def pipeline(self, dataset: str) -> ResolvedPipeline:
        return resolve_pipeline(self.configs_root / dataset, self.configs_root, self.data_root)


def load_sweep(source: ExperimentSource) -> LoadedSweep:
    """Resolve the experiment at ``source`` and expand its points."""
    configs = Path(source.configs_root)
    load_builtin_signals()
    experiment = load_spec(configs / source.experiment, ExperimentSpec)
    serving = load_spec(configs / experiment.serving, ServingSpec)
    gold_spec = load_gold_spec(configs / serving.gold)
    return LoadedSweep(
        experiment=experiment,
        gold_graph=gold_spec.graph(),
        points=expand_points(sweep_space(experiment, serving)),
        spec_hashes={
            "experiment": spec_hash(experiment),
            "serving": spec_hash(serving),
            "gold": spec_hash(gold_spec),
        },
        configs_root=configs,
        data_root=Path(source.data_root),
        lake_root=Path(source.lake_root),
    )


def chunk_bounds(points_total: int, chunk_points: int) -> list[ChunkBounds]:
    """Consecutive chunks of at most ``chunk_points`` points; points sharing a score are
    adjacent in sweep order, so a chunk mostly computes each score once."""
    return [
        ChunkBounds(start, min(start + chunk_points, points_total))
        for start in range(0, points_total, chunk_points)
    ]


@dataclass
class PointOutcome:
    """One point's metrics per span, or the error that stopped it."""

    metrics: dict[str, Any]
    failed: bool


def _finite(metrics: Mapping[str, float | int]) -> dict[str, float | int | None]:
    # NaN (e.g. a hit rate without trades) is not JSON; the store keeps it as null.
    return {
        name: None if isinstance(value, float) and not math.isfinite(value) else value
        for name, value in metrics.items()
    }


def _failure(error: BaseException) -> PointOutcome:
    trace = "".join(traceback.format_exception(error))
    return PointOutcome(
        {"error": {"type": type(error).__name__, "message": str(error), "traceback": trace}},
        failed=True,
    )


@dataclass
class ChunkEvaluator:
    """Evaluates a chunk's points with shared work: silver and gold from the worker's
    :class:`LakeFrames`, each score computed once for all the points sharing it."""

    sweep: LoadedSweep
    points: Sequence[SweepPoint]
    frames: LakeFrames
    _outcomes: dict[str, PointOutcome] = field(default_factory=dict)

    def outcome(self, point: SweepPoint) -> PointOutcome:
        if point.point_hash not in self._outcomes:
            key = score_key(point)
            self._evaluate([p for p in self.points if score_key(p) == key])
        return self._outcomes.pop(point.point_hash)

    def _evaluate(self, group: Sequence[SweepPoint]) -> None:
        try:
            self._outcomes.update(self._evaluate_together(group))
        except Exception:
            # One bad point must not sink the others sharing its score: evaluate each alone.
            for point in group:
                try:
                    self._outcomes.update(self._evaluate_together([point]))
                except Exception as error:
                    self._outcomes[point.point_hash] = _failure(error)

    def _evaluate_together(self, group: Sequence[SweepPoint]) -> dict[str, PointOutcome]:
        result = run_sweep_core(
            self._load_frame,
            self._score,
            group,
            train_fraction=self.sweep.experiment.dataset.train_fraction,
        )
        return {
            point.point_hash: PointOutcome(
                {
                    "train": _finite(metrics_of(train)),
                    "test": _finite(metrics_of(test)),
                },
                failed=False,
            )
            for point, train, test in zip(
                result.points, result.metrics["train"], result.metrics["test"], strict=True
            )
        }

    def _load_frame(self, dataset: str) -> SilverFrame:
        return self.frames.silver(self.sweep.pipeline(dataset), self.sweep.lake_root)

    def _score(self, frame: SilverFrame, request: ScoreRequest) -> np.ndarray:
        gold = self.frames.gold(self.sweep.spec_hashes["gold"], self.sweep.gold_graph, frame)
        inputs = SignalInputs(
            frame=frame,
            gold=gold.outputs,
            tp_ticks=request.tp_ticks,
            sl_ticks=request.sl_ticks,
            max_hold_bins=request.max_hold_bins,
        )
        return get_signal(request.signal).score(inputs, request.params)


def point_params(point: SweepPoint) -> dict[str, Any]:
    """A point's fields as stored with its run."""
    params = asdict(point)
    params["signal_params"] = dict(point.signal_params)
    return params


def _ensure_silver(sweep: LoadedSweep) -> None:
    # Built here, once, so concurrent chunks only ever read the lake.
    for dataset in dict.fromkeys(p.dataset for p in sweep.points):
        pipeline = sweep.pipeline(dataset)
        if not (sweep.lake_root / pipeline.pipeline_hash / MANIFEST_FILE).is_file():
            build_silver(pipeline, sweep.lake_root)


def objective_value(outcome: PointOutcome, objective: str) -> float | None:
    """The point's training-span objective, if it succeeded with a finite one."""
    if outcome.failed:
        return None
    value = outcome.metrics["train"].get(objective)
    return None if value is None else float(value)


class SweepActivities:
    """The sweep's activities, bound to the control-plane store the worker holds and, when
    given, the MLflow tracking target."""

    def __init__(self, sessions: Sessions, tracking: TrackingTarget | None = None) -> None:
        self._sessions = sessions
        self._tracking = tracking
        self._frames = LakeFrames()

    @activity.defn(name=PLAN_SWEEP)
    async def plan_sweep(self, request: PlanRequest) -> SweepPlan:
        """Expand the points, build missing silver, cut the chunks and mark the job running."""
        async with Heartbeat(None):
            try:
                sweep = await asyncio.to_thread(load_sweep, request.source)
            except SpecError as error:
                # The same spec fails the same way on every attempt: do not retry.
                raise ApplicationError(str(error), type="SpecError", non_retryable=True) from error
            await asyncio.to_thread(_ensure_silver, sweep)
        parallelism = sweep.experiment.parallelism
        plan = SweepPlan(
            points_total=len(sweep.points),
            points_digest=sweep.points_digest,
            chunks=chunk_bounds(
                len(sweep.points), request.chunk_points or parallelism.chunk_points
            ),
            max_concurrent_chunks=request.max_concurrent_chunks
            or parallelism.max_concurrent_chunks,
            objective=sweep.experiment.objective,
        )
        async with self._sessions.begin() as session:
            job = await repo.get_job(session, request.workspace_id, request.job_id)
            if job.status == "queued":
                await repo.set_job_status(session, request.workspace_id, request.job_id, "running")
                await repo.append_job_event(
                    session,
                    request.workspace_id,
                    request.job_id,
                    "sweep_planned",
                    {"points_total": plan.points_total, "chunks": len(plan.chunks)},
                )
            elif job.status != "running":
                raise ApplicationError(
                    f"experiment job {job.id} is {job.status}; it cannot be swept",
                    non_retryable=True,
                )
        return plan

    @activity.defn(name=EVALUATE_CHUNK)
    async def evaluate_chunk(self, request: ChunkRequest) -> ChunkResult:
        """Evaluate and record the chunk's points, resuming after the last heartbeat and skipping
        points an earlier attempt recorded after it."""
        sweep = await asyncio.to_thread(load_sweep, request.source)
        if sweep.points_digest != request.points_digest:
            raise ApplicationError(
                f"experiment {request.source.experiment} no longer expands to the planned points "
                f"(digest {sweep.points_digest[:12]}, planned {request.points_digest[:12]})",
                non_retryable=True,
            )
        points = sweep.points[request.bounds.start : request.bounds.end]
        progress = last_heartbeat(ChunkProgress) or ChunkProgress(0, 0)
        remaining = points[progress.points_done :]
        recorded = await self._recorded_runs(request, remaining)
        evaluator = ChunkEvaluator(
            sweep, [p for p in remaining if p.point_hash not in recorded], self._frames
        )
        objective = request.objective or sweep.experiment.objective
        pending: list[tuple[SweepPoint, PointOutcome, bool]] = []  # (point, outcome, new)
        last_flush = last_event = time.monotonic()
        async with Heartbeat(progress) as heartbeat:
            for index, point in enumerate(remaining):
                run = recorded.get(point.point_hash)
                if run is None:
                    if request.point_delay_seconds > 0:
                        await asyncio.sleep(request.point_delay_seconds)
                    pending.append((point, await asyncio.to_thread(evaluator.outcome, point), True))
                else:  # an earlier attempt recorded it after its last heartbeat
                    outcome = PointOutcome(run.metrics, failed=run.status == "failed")
                    pending.append((point, outcome, False))
                last = index == len(remaining) - 1
                if (
                    last
                    or len(pending) >= RECORD_BATCH_POINTS
                    or time.monotonic() - last_flush >= RECORD_BATCH_SECONDS
                ):
                    await self._record_batch(request, sweep, pending, objective, heartbeat)
                    pending = []
                    last_flush = time.monotonic()
                    if last or last_flush - last_event >= PROGRESS_EVENT_INTERVAL_SECONDS:
                        await self._progress_event(request, objective)
                        last_event = time.monotonic()
            if not remaining:
                await self._progress_event(request, objective)
        done = heartbeat.details
        return ChunkResult(request.chunk_index, done.points_done, done.points_failed, done.best)

    @activity.defn(name=TRACK_SWEEP)
    async def track_sweep(self, request: TrackRequest) -> TrackResult:
        """Log the job's recorded points to MLflow: a parent run, a child run per succeeded
        point, the leaderboard and the silver it read (also kept as job artifacts)."""
        if self._tracking is None:
            return TrackResult(None, "this worker has no MLflow tracking target")
        sweep = await asyncio.to_thread(load_sweep, request.source)
        if not sweep.experiment.tracking.mlflow:
            return TrackResult(None, "the experiment turns MLflow tracking off")
        async with self._sessions() as session:
            runs = await repo.list_runs(
                session,
                request.workspace_id,
                request.job_id,
                order_by=f"train.{sweep.experiment.objective}",
            )
        rows = leaderboard_of(sweep.points, runs, sweep.experiment.objective)
        refs = [
            silver_ref(sweep.lake_root, sweep.pipeline(dataset).pipeline_hash)
            for dataset in dict.fromkeys(p.dataset for p in sweep.points)
        ]
        async with Heartbeat(0) as heartbeat:

            async def logged(count: int) -> None:
                heartbeat.report(count)

            parent_run_id = await log_sweep(
                self._tracking,
                sweep.experiment,
                sweep.spec_hashes,
                rows,
                refs,
                state=request.state,
                sweep_key=request.sweep_key,
                on_batch=logged,
            )
        async with self._sessions.begin() as session:
            known = {
                a.uri
                for a in await repo.list_artifacts(session, request.workspace_id, request.job_id)
            }
            for ref in refs:
                if ref.path not in known:
                    await repo.add_artifact(
                        session,
                        request.workspace_id,
                        request.job_id,
                        "silver",
                        ref.path,
                        ref.sha256,
                        Path(ref.path).stat().st_size,
                    )
            await repo.append_job_event(
                session,
                request.workspace_id,
                request.job_id,
                "tracked",
                {
                    "mlflow_parent_run_id": parent_run_id,
                    "mlflow_tracking_uri": self._tracking.tracking_uri,
                    "child_runs": len(rows),
                },
            )
        return TrackResult(parent_run_id)

    @activity.defn(name=FINISH_SWEEP)
    async def finish_sweep(self, request: FinishRequest) -> SweepOutcome:
        """Move the job to its final state (once) and count its recorded runs; with a
        ``tracking_error`` (the job already final), report that MLflow tracking failed."""
        workspace_id, job_id = request.workspace_id, request.job_id
        async with self._sessions.begin() as session:
            job = await repo.get_job(session, workspace_id, job_id)
            if job.status == "queued" and request.state != "canceled":
                await repo.set_job_status(session, workspace_id, job_id, "running")
            counts = await _run_counts(session, workspace_id, job_id)
            if job.status != request.state:
                await repo.set_job_status(
                    session, workspace_id, job_id, request.state, error=request.error
                )
                await repo.append_job_event(
                    session,
                    workspace_id,
                    job_id,
                    "sweep_finished",
                    {"state": request.state, **counts, "error": request.error},
                )
            if request.tracking_error is not None:
                reported = await session.scalar(
                    sa.select(sa.func.count())
                    .select_from(JobEvent)
                    .where(
                        JobEvent.workspace_id == workspace_id,
                        JobEvent.job_id == job_id,
                        JobEvent.kind == "tracking_failed",
                    )
                )
                if not reported:  # once, across retries
                    await repo.append_job_event(
                        session,
                        workspace_id,
                        job_id,
                        "tracking_failed",
                        {"error": request.tracking_error},
                    )
        return SweepOutcome(
            request.state,
            points_recorded=counts["succeeded"] + counts["failed"],
            points_failed=counts["failed"],
        )

    async def _recorded_runs(
        self, request: ChunkRequest, points: Sequence[SweepPoint]
    ) -> dict[str, ExperimentRun]:
        hashes = [p.point_hash for p in points]
        async with self._sessions() as session:
            rows = await session.scalars(
                sa.select(ExperimentRun).where(
                    ExperimentRun.workspace_id == request.workspace_id,
                    ExperimentRun.job_id == request.job_id,
                    ExperimentRun.point_hash.in_(hashes),
                )
            )
            return {run.point_hash: run for run in rows}

    async def _progress_event(self, request: ChunkRequest, objective: str) -> None:
        """Append a ``progress`` job event: done/total, the best point so far and an ETA, all
        read from the store (the source of truth whichever worker wrote the points)."""
        async with self._sessions.begin() as session:
            job = await repo.get_job(session, request.workspace_id, request.job_id)
            counts = await _run_counts(session, request.workspace_id, request.job_id)
            best = await repo.list_runs(
                session,
                request.workspace_id,
                request.job_id,
                order_by=f"train.{objective}",
                limit=1,
            )
            done = counts["succeeded"] + counts["failed"]
            elapsed = (utc_now() - job.started_at).total_seconds() if job.started_at else 0.0
            remaining = max(request.points_total - done, 0)
            best_value = best[0].metrics.get("train", {}).get(objective) if best else None
            await repo.append_job_event(
                session,
                request.workspace_id,
                request.job_id,
                "progress",
                {
                    "points_total": request.points_total,
                    "points_done": done,
                    "points_failed": counts["failed"],
                    "objective": objective,
                    "best": None
                    if best_value is None
                    else {"point_hash": best[0].point_hash, "objective_value": best_value},
                    "elapsed_seconds": round(elapsed, 3),
                    "eta_seconds": round(elapsed / done * remaining, 3) if done else None,
                    "chunk": request.chunk_index,
                },
            )

    async def _record_batch(
        self,
        request: ChunkRequest,
        sweep: LoadedSweep,
        batch: Sequence[tuple[SweepPoint, PointOutcome, bool]],
        objective: str,
        heartbeat: Heartbeat[ChunkProgress],
    ) -> None:
        """Record the batch's new points in one transaction, then heartbeat the progress they
        make: a heartbeat never claims a point that is not committed."""
        records = [
            repo.RunRecord(
                point.point_hash,
                point_params(point),
                outcome.metrics,
                "failed" if outcome.failed else "succeeded",
            )
            for point, outcome, new in batch
            if new
        ]
        if records:
            async with self._sessions.begin() as session:
                await repo.record_runs(
                    session,
                    request.workspace_id,
                    request.job_id,
                    records,
                    spec_hashes=sweep.spec_hashes,
                )
        done = heartbeat.details
        best = done.best
        for point, outcome, _ in batch:
            value = objective_value(outcome, objective)
            best = better(best, None if value is None else BestPoint(point.point_hash, value))
        heartbeat.report(
            ChunkProgress(
                done.points_done + len(batch),
                done.points_failed + sum(outcome.failed for _, outcome, _ in batch),
                best,
            )
        )


async def _run_counts(session: AsyncSession, workspace_id: str, job_id: str) -> dict[str, int]:
    rows = await session.execute(
        sa.select(ExperimentRun.status, sa.func.count())
        .where(ExperimentRun.workspace_id == workspace_id, ExperimentRun.job_id == job_id)
        .group_by(ExperimentRun.status)
    )
    counts = {"succeeded": 0, "failed": 0}
    counts.update(dict(rows.all()))
    return counts
