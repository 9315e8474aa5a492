"""The ES setups the tests share: the grid the shipped ES pipeline resolves to, and a
twenty-minute ES session with a small experiment for end-to-end runs."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.silver import GridConfig
from qmachina.silver_build import grid_config_of
from qmachina.specs.pipeline import default_configs_root, resolve_pipeline

ES_PIPELINE = default_configs_root() / "pipelines" / "es_default.yaml"
ES_GRID: GridConfig = grid_config_of(resolve_pipeline(ES_PIPELINE, check_files=False))

SMALL_EXPERIMENT = """\
name: es_small
serving: serving/derivative_baseline.yaml
dataset: {train_fraction: 0.5}
eval:
  tp_ticks: [2, 4]
  sl_ticks: 2
  max_hold_bins: 300
  warmup_bins: 100
  cooldown_bins: [0, 20]
sweep:
  threshold: [0.2, 0.5]
  signal_params:
    k_ticks: [4, 8]
"""
"""16 points of the derivative baseline: small enough to sweep in seconds."""


def es_session_configs(root: Path, experiments: dict[str, str]) -> Path:
    """A copy of the shipped configs under ``root``, the ES pipeline cut to the first twenty
    minutes after the Globex open, plus ``experiments`` (name -> YAML text)."""
    configs = root / "configs"
    shutil.copytree(default_configs_root(), configs)
    pipeline = configs / "pipelines" / "es_default.yaml"
    pipeline.write_text(
        pipeline.read_text().replace(
            "  raw_symbol: ESH4\n",
            "  raw_symbol: ESH4\n  session: {start: '2023-12-25T17:00', end: '2023-12-25T17:20'}\n",
        )
    )
    for name, text in experiments.items():
        (configs / "experiments" / f"{name}.yaml").write_text(text)
    return configs
