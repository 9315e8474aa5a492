"""The spec chain end to end in one process: experiment → serving → pipeline silver → gold →
signal → sweep core, ranked on the training span and reported on the test span."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.gold.runtime import GoldFrame, run_gold
from qmachina import experiment_run
from qmachina.cli import app
from tests.es_grid import SMALL_EXPERIMENT, es_session_configs

runner = CliRunner()


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    return es_session_configs(tmp_path, {"es_small": SMALL_EXPERIMENT})


def test_experiment_runs_every_point_with_gold_once(
    configs: Path, tmp_path: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gold_runs: list[int] = []

    def counting_run_gold(*args: object, **kwargs: object) -> GoldFrame:
        gold_runs.append(1)
        return run_gold(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment_run, "run_gold", counting_run_gold)
    result = experiment_run.run_experiment(
        configs / "experiments" / "es_small.yaml",
        lake_root=tmp_path / "lake",
        configs_root=configs,
        data_root=sample_dir,
    )
    assert len(result.leaderboard) == 2 * 2 * 2 * 2  # k_ticks x threshold x tp x cooldown
    assert len(gold_runs) == 1  # one dataset, one gold spec: gold computed once
    assert len({row.point.point_hash for row in result.leaderboard}) == 16
    train_pnl = [row.train["total_pnl_ticks"] for row in result.leaderboard]
    assert train_pnl == sorted(train_pnl, reverse=True)
    assert sum(row.test["signals"] for row in result.leaderboard) > 0
    assert (tmp_path / "lake").is_dir()


def test_experiment_cli_prints_the_leaderboard_as_json(
    configs: Path, tmp_path: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(experiment_run, "default_configs_root", lambda: configs)
    monkeypatch.setattr(experiment_run, "default_data_root", lambda: sample_dir)
    result = runner.invoke(
        app,
        [
            "experiment",
            "run",
            str(configs / "experiments" / "es_small.yaml"),
            "--lake",
            str(tmp_path / "lake"),
            "--top",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3
    assert {"train", "test", "point_hash", "threshold"} <= set(rows[0])
    assert np.isfinite(rows[0]["train"]["total_pnl_ticks"])
