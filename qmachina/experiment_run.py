"""Run an ExperimentSpec in this process: the spec chain resolved, the sweep core evaluated.

Silver comes from the lake (built first when the pipeline's directory is missing), gold is
computed once per dataset (the gold spec is fixed by the serving spec), each signal parameter set
is scored once, and every point is evaluated on the training span and on the later test span. The
leaderboard ranks by the training span only; the test span is what it reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from engine.gold.runtime import GoldFrame, run_gold
from engine.signals.builtin import load_builtin_signals
from engine.signals.registry import SignalInputs, get_signal
from engine.silver_frame import SilverFrame
from engine.sweep_core import (
    ScoreRequest,
    SweepCoreResult,
    SweepPoint,
    SweepSpace,
    expand_points,
    run_sweep_core,
)
from qmachina.silver_build import MANIFEST_FILE, SILVER_FILE, build_silver
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.gold import GoldSpec, load_gold_spec
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import (
    ResolvedPipeline,
    default_configs_root,
    default_data_root,
    resolve_pipeline,
)
from qmachina.specs.serving import ServingSpec
from qmachina.specs.yaml_loader import load_spec


@dataclass(frozen=True)
class LeaderboardRow:
    """One sweep point: its parameters, training-span and test-span metrics."""

    point: SweepPoint
    train: dict[str, float]
    test: dict[str, float]


@dataclass(frozen=True)
class ExperimentResult:
    experiment: ExperimentSpec
    serving: ServingSpec
    gold_hash: str
    sweep: SweepCoreResult
    leaderboard: tuple[LeaderboardRow, ...]


def _metrics_dict(row: np.void) -> dict[str, float]:
    return {name: float(row[name]) for name in row.dtype.names or ()}


def silver_frame_of(pipeline: ResolvedPipeline, lake_root: Path) -> SilverFrame:
    """The pipeline's silver from the lake, built first if it is not there."""
    directory = lake_root / pipeline.pipeline_hash
    if not (directory / MANIFEST_FILE).is_file():
        build_silver(pipeline, lake_root)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    table = pq.read_table(directory / manifest.get("silver_file", SILVER_FILE))
    return SilverFrame(table, pipeline.instrument.tick_size_raw)


def sweep_space(experiment: ExperimentSpec, serving: ServingSpec) -> SweepSpace:
    params: dict[str, tuple[object, ...]] = {k: (v,) for k, v in serving.signal.params.items()}
    params.update(experiment.sweep.signal_params)
    return SweepSpace(
        datasets=experiment.dataset.pipelines or (serving.pipeline,),
        signals={serving.signal.name: params},  # type: ignore[dict-item]
        thresholds=experiment.sweep.threshold or (serving.scoring.threshold,),
        tp_ticks=experiment.eval.tp_ticks,
        sl_ticks=experiment.eval.sl_ticks,
        cooldown_bins=experiment.eval.cooldown_bins,
        max_hold_bins=experiment.eval.max_hold_bins,
        warmup_bins=experiment.eval.warmup_bins,
    )


def run_experiment(
    path: Path,
    *,
    lake_root: Path,
    configs_root: Path | None = None,
    data_root: Path | None = None,
) -> ExperimentResult:
    """Resolve the experiment at ``path`` and evaluate every point of its sweep."""
    configs = configs_root or default_configs_root()
    data = data_root or default_data_root()
    load_builtin_signals()
    experiment = load_spec(path, ExperimentSpec)
    serving = load_spec(configs / experiment.serving, ServingSpec)
    gold_spec: GoldSpec = load_gold_spec(configs / serving.gold)
    graph = gold_spec.graph()
    points = expand_points(sweep_space(experiment, serving))
    gold_of: dict[str, GoldFrame] = {}

    def load_frame(dataset: str) -> SilverFrame:
        gold_of.clear()  # one dataset's gold at a time, like its silver
        return silver_frame_of(resolve_pipeline(configs / dataset, configs, data), lake_root)

    def score(frame: SilverFrame, request: ScoreRequest) -> np.ndarray:
        key = str(id(frame))
        if key not in gold_of:
            gold_of[key] = run_gold(graph, frame)
        inputs = SignalInputs(
            frame=frame,
            gold=gold_of[key].outputs,
            tp_ticks=request.tp_ticks,
            sl_ticks=request.sl_ticks,
            max_hold_bins=request.max_hold_bins,
        )
        return get_signal(request.signal).score(inputs, request.params)

    sweep = run_sweep_core(
        load_frame, score, points, train_fraction=experiment.dataset.train_fraction
    )
    rows = [
        LeaderboardRow(point, _metrics_dict(train), _metrics_dict(test))
        for point, train, test in zip(
            sweep.points, sweep.metrics["train"], sweep.metrics["test"], strict=True
        )
    ]
    return ExperimentResult(
        experiment,
        serving,
        spec_hash(gold_spec),
        sweep,
        tuple(leaderboard_order(rows, experiment.objective)),
    )


def metric_at(metrics: Mapping[str, object], path: str) -> float | None:
    """The number at a dotted path of a run's metrics (``test.hit_rate``), if there is one."""
    value: object = metrics
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def leaderboard_order(rows: Iterable[LeaderboardRow], objective: str) -> list[LeaderboardRow]:
    """Rows ranked by ``objective`` on the training span, best first; NaN last, ties by hash."""
    return sorted(
        rows,
        key=lambda row: (
            -np.nan_to_num(row.train[objective], nan=-np.inf),
            row.point.point_hash,
        ),
    )
