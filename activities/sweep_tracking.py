"""The MLflow side of a sweep: stored runs turned into leaderboard rows and logged in batches.

The SQL store is the source of truth; MLflow gets a copy once the points are evaluated, off the
evaluation path. Logging is idempotent per point (:class:`qmachina.tracking.SweepTracker`), so a
retried activity continues where the previous attempt stopped.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.sweep_core import SweepPoint
from qmachina.experiment_run import LeaderboardRow, leaderboard_order
from qmachina.specs.experiment import ExperimentSpec
from qmachina.store.models import ExperimentRun
from qmachina.tracking import SilverRef, SweepTracker

LOG_BATCH_POINTS = 50
"""Child runs logged between two heartbeats (a child run costs ~15-35 ms on SQLite)."""

MLFLOW_STATUS: Mapping[str, Literal["FINISHED", "FAILED", "KILLED"]] = {
    "succeeded": "FINISHED",
    "failed": "FAILED",
    "canceled": "KILLED",
}


@dataclass(frozen=True)
class TrackingTarget:
    """Where a worker logs sweeps: an MLflow tracking URI and the artifact root of new
    experiments."""

    tracking_uri: str
    artifact_root: Path


def _as_float(metrics: Mapping[str, Any]) -> dict[str, float]:
    # The store keeps NaN as null; the tracker and the ranking expect NaN.
    return {name: math.nan if value is None else float(value) for name, value in metrics.items()}


def leaderboard_of(
    points: Iterable[SweepPoint], runs: Iterable[ExperimentRun], objective: str
) -> list[LeaderboardRow]:
    """The succeeded runs as leaderboard rows, ranked by ``objective`` on the training span."""
    by_hash = {point.point_hash: point for point in points}
    rows = [
        LeaderboardRow(
            by_hash[run.point_hash], _as_float(run.metrics["train"]), _as_float(run.metrics["test"])
        )
        for run in runs
        if run.status == "succeeded" and run.point_hash in by_hash
    ]
    return leaderboard_order(rows, objective)


async def log_sweep(
    target: TrackingTarget,
    experiment: ExperimentSpec,
    spec_hashes: Mapping[str, str],
    rows: Sequence[LeaderboardRow],
    silver_refs: Sequence[SilverRef],
    *,
    state: str,
    sweep_key: str,
    on_batch: Callable[[int], Awaitable[None]],
) -> str:
    """Log the parent run, a child run per row (``on_batch`` after each batch, with the count
    logged so far), the leaderboard and the silver references; returns the parent run id."""
    tracker = SweepTracker(target.tracking_uri, target.artifact_root)
    await asyncio.to_thread(
        tracker.start,
        experiment.tracking.experiment_name or experiment.name,
        spec_hashes,
        {
            "objective": experiment.objective,
            "train_fraction": experiment.dataset.train_fraction,
            "points": len(rows),
        },
        sweep_key=sweep_key,
    )
    for start in range(0, len(rows), LOG_BATCH_POINTS):
        await asyncio.to_thread(tracker.log_points, rows[start : start + LOG_BATCH_POINTS])
        await on_batch(min(start + LOG_BATCH_POINTS, len(rows)))
    await asyncio.to_thread(tracker.log_leaderboard, rows)
    await asyncio.to_thread(tracker.log_silver_refs, silver_refs)
    await asyncio.to_thread(tracker.finish, MLFLOW_STATUS[state])
    return tracker.parent_run_id
