"""A worker's chunks share one dataset's silver and gold instead of each loading its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from activities.lake_frames import LakeFrames
from engine.gold.runtime import run_gold
from qmachina.experiment_run import silver_frame_of
from qmachina.silver_build import build_silver
from qmachina.specs.gold import load_gold_spec
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import resolve_pipeline
from tests.sweep_stack import Roots


def test_chunks_share_the_held_silver_and_gold_and_a_new_dataset_replaces_them(
    sweep_roots: Roots, tmp_path: Path
) -> None:
    pipeline = resolve_pipeline(
        sweep_roots.configs / "pipelines" / "es_default.yaml", sweep_roots.configs, sweep_roots.data
    )
    gold_spec = load_gold_spec(sweep_roots.configs / "gold" / "vp_default.yaml")
    graph = gold_spec.graph()
    frames = LakeFrames()

    silver = frames.silver(pipeline, sweep_roots.lake)
    assert frames.silver(pipeline, sweep_roots.lake) is silver
    gold = frames.gold(spec_hash(gold_spec), graph, silver)
    assert frames.gold(spec_hash(gold_spec), graph, silver) is gold
    # The shared gold is the gold of that silver, value for value.
    fresh = run_gold(graph, silver_frame_of(pipeline, sweep_roots.lake))
    for name, values in fresh.outputs.items():
        np.testing.assert_array_equal(gold.outputs[name], values)

    # Another gold spec over the same silver is computed, not mistaken for the held one.
    assert frames.gold("another-gold-hash", graph, silver) is not gold
    # A silver that is not the held one gets its own gold.
    other = silver_frame_of(pipeline, sweep_roots.lake)
    assert frames.gold(spec_hash(gold_spec), graph, other) is not gold

    # Another dataset replaces the held one: one dataset in memory at a time.
    source = sweep_roots.configs / "pipelines" / "es_default.yaml"
    ten_minutes = tmp_path / "es_ten_minutes.yaml"
    ten_minutes.write_text(source.read_text().replace("'2023-12-25T17:20'", "'2023-12-25T17:10'"))
    other_pipeline = resolve_pipeline(ten_minutes, sweep_roots.configs, sweep_roots.data)
    assert other_pipeline.pipeline_hash != pipeline.pipeline_hash
    build_silver(other_pipeline, tmp_path / "lake")
    other_silver = frames.silver(other_pipeline, tmp_path / "lake")
    assert other_silver.n_bins < silver.n_bins
    assert frames.silver(pipeline, sweep_roots.lake) is not silver  # read again
