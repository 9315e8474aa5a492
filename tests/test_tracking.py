"""MLflow tracking of a sweep, against a real SQLite tracking store."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from engine.evaluation import INTEGER_METRICS, METRIC_NAMES
from engine.signals.builtin import load_builtin_signals
from engine.sweep_core import SweepSpace, expand_points
from qmachina.experiment_run import LeaderboardRow
from qmachina.silver_build import MANIFEST_FILE
from qmachina.tracking import (
    LAKE_REFS_FILE,
    LEADERBOARD_FILE,
    PARENT_TAG,
    POINT_HASH_TAG,
    SilverRef,
    SweepTracker,
    TrackingError,
    silver_ref,
)

SILVER_SHA = "a" * 64
GOLD_SHA = "b" * 64


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One SQLite tracking store for the module (creating its tables takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.sqlite3'}", root / "mlartifacts"


def sweep_rows(
    k_ticks: Sequence[int], thresholds: Sequence[float], tp_ticks: Sequence[int]
) -> list[LeaderboardRow]:
    """Rows of a flow_threshold sweep with made-up metrics; a point without trades has a NaN
    hit rate, as the evaluation reports it."""
    load_builtin_signals()
    space = SweepSpace(
        datasets=("pipelines/es_default.yaml",),
        signals={"flow_threshold": {"k_ticks": k_ticks}},
        thresholds=thresholds,
        tp_ticks=tp_ticks,
        sl_ticks=(4,),
    )
    rows = []
    for index, point in enumerate(expand_points(space)):
        train = {name: float(index) if name in INTEGER_METRICS else 0.5 for name in METRIC_NAMES}
        test = {name: float(index + 1) for name in METRIC_NAMES}
        if index % 2:
            test["hit_rate"] = math.nan
        rows.append(LeaderboardRow(point, train, test))
    return rows


def children(client: MlflowClient, parent: Run) -> list[Run]:
    return list(
        client.search_runs(
            [parent.info.experiment_id],
            f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
            max_results=10_000,
        )
    )


def refs() -> list[SilverRef]:
    return [
        SilverRef("silver", "p" * 64, "lake/p/silver.parquet", SILVER_SHA),
        SilverRef("gold", "g" * 64, "lake/p/gold.parquet", GOLD_SHA),
    ]


def test_sweep_is_a_parent_run_with_one_child_per_point(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    rows = sweep_rows((3, 5, 8, 10, 12), (0.1, 0.2, 0.3, 0.4), (2, 4, 6, 8, 10))
    assert len(rows) == 100
    tracker = SweepTracker(uri, artifacts)
    parent_id = tracker.start("es_flow_sweep", {"experiment": "e" * 64}, {"objective": "pnl"})

    started = time.perf_counter()
    assert tracker.log_points(rows) == 100
    per_point_ms = (time.perf_counter() - started) / len(rows) * 1000
    print(f"\nMLflow child run: {per_point_ms:.1f} ms per point (100 points, SQLite store)")
    assert per_point_ms < 250  # ~30 ms here; a regression to seconds per point fails

    tracker.log_leaderboard(rows)
    tracker.log_silver_refs(refs())
    tracker.finish()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("es_flow_sweep")
    assert experiment is not None
    top_level = [
        run
        for run in client.search_runs([experiment.experiment_id], max_results=1000)
        if PARENT_TAG not in run.data.tags
    ]
    assert [run.info.run_id for run in top_level] == [parent_id]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["spec.experiment"] == "e" * 64
    assert parent.data.params == {"objective": "pnl"}

    runs = children(client, parent)
    assert len(runs) == 100
    by_hash = {run.data.tags[POINT_HASH_TAG]: run for run in runs}
    assert set(by_hash) == {row.point.point_hash for row in rows}
    for index, row in enumerate(rows):
        run = by_hash[row.point.point_hash]
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["point_hash"] == row.point.point_hash
        assert params["signal"] == "flow_threshold"
        assert params["signal.k_ticks"] == str(dict(row.point.signal_params)["k_ticks"])
        assert params["signal.weighting"] == "uniform"  # defaults filled in are params too
        assert float(params["threshold"]) == row.point.threshold
        assert int(params["tp_ticks"]) == row.point.tp_ticks
        assert params["sl_ticks"] == "4"
        assert (params["cooldown_bins"], params["max_hold_bins"]) == ("0", "600")
        assert params["warmup_bins"] == "0"
        expected = {f"train_{k}": v for k, v in row.train.items()}
        expected |= {f"test_{k}": v for k, v in row.test.items() if not math.isnan(v)}
        assert run.data.metrics == expected
        assert ("test_hit_rate" in run.data.metrics) == (index % 2 == 0)

    local = Path(client.download_artifacts(parent_id, LEADERBOARD_FILE))
    board = json.loads(local.read_text())["rows"]
    assert [entry["point_hash"] for entry in board] == [row.point.point_hash for row in rows]
    assert board[0]["rank"] == 1
    assert board[1]["test"]["hit_rate"] is None
    assert board[2]["train"] == rows[2].train
    lake = json.loads(Path(client.download_artifacts(parent_id, LAKE_REFS_FILE)).read_text())
    assert lake["refs"] == [
        {"layer": "silver", "key": "p" * 64, "path": "lake/p/silver.parquet", "sha256": SILVER_SHA},
        {"layer": "gold", "key": "g" * 64, "path": "lake/p/gold.parquet", "sha256": GOLD_SHA},
    ]
    assert len(list(artifacts.rglob(LEADERBOARD_FILE))) == 1  # artifacts live under the root


def test_a_retried_sweep_creates_no_duplicate_runs(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    rows = sweep_rows((3, 5), (0.1, 0.2), (2, 4, 6))
    first = SweepTracker(uri, artifacts)
    parent_id = first.start("es_retry", {}, {}, sweep_key="sweep-w1-job7")
    assert first.log_points(rows[:5]) == 5
    assert first.log_points(rows[:8]) == 3  # chunks may overlap

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    # A crash between create_run and set_terminated leaves a running child behind.
    crashed = client.create_run(
        parent.info.experiment_id,
        tags={PARENT_TAG: parent_id, POINT_HASH_TAG: rows[8].point.point_hash},
    )

    # The retried activity: a new tracker finds the same parent by its sweep key.
    retry = SweepTracker(uri, artifacts)
    assert retry.start("es_retry", {}, {}, sweep_key="sweep-w1-job7") == parent_id
    assert retry.log_points(rows[:2]) == 0  # the crashed point comes in a later chunk
    assert retry.log_points(rows) == len(rows) - 8
    assert retry.log_points(rows) == 0
    assert SweepTracker(uri, artifacts, parent_run_id=parent_id).log_points(rows) == 0

    runs = children(client, parent)
    assert len(runs) == len(rows)
    assert sorted(run.data.tags[POINT_HASH_TAG] for run in runs) == sorted(
        row.point.point_hash for row in rows
    )
    completed = client.get_run(crashed.info.run_id)
    assert completed.info.status == "FINISHED"
    assert completed.data.params["point_hash"] == rows[8].point.point_hash


def test_threaded_logging_writes_the_same_runs(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    rows = sweep_rows((3, 5), (0.1, 0.2, 0.3), (2, 4))
    tracker = SweepTracker(uri, artifacts, workers=4)
    tracker.start("es_threads", {}, {})
    started = time.perf_counter()
    assert tracker.log_points(rows) == len(rows)
    per_point_ms = (time.perf_counter() - started) / len(rows) * 1000
    print(f"\nMLflow child run, 4 threads: {per_point_ms:.1f} ms per point (SQLite store)")
    client = MlflowClient(tracking_uri=uri)
    runs = children(client, client.get_run(tracker.parent_run_id))
    assert sorted(run.data.params["point_hash"] for run in runs) == sorted(
        row.point.point_hash for row in rows
    )
    assert all(run.info.status == "FINISHED" for run in runs)


def test_points_need_a_parent_run(store: tuple[str, Path]) -> None:
    uri, artifacts = store
    with pytest.raises(TrackingError, match="no parent run"):
        SweepTracker(uri, artifacts).log_points([])


def test_a_lake_reference_needs_a_sha256(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"lake/x\.parquet: sha256"):
        SilverRef("silver", "x", "lake/x.parquet", "not-a-digest")
    directory = tmp_path / ("c" * 64)
    directory.mkdir()
    (directory / MANIFEST_FILE).write_text(
        json.dumps({"silver_file": "silver.parquet", "silver_sha256": SILVER_SHA})
    )
    ref = silver_ref(tmp_path, "c" * 64)
    assert ref == SilverRef("silver", "c" * 64, str(directory / "silver.parquet"), SILVER_SHA)
