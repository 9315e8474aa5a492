"""Modeling-step previews: silver of a pipeline section from the lake, gold statistics over it."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from engine.gold.runtime import run_gold
from engine.silver_frame import SilverFrame
from qmachina.modeling import preview as preview_module
from qmachina.modeling.preview import (
    OutputStats,
    PreviewError,
    SilverPreview,
    evenly_spaced,
    preview_gold,
    preview_silver,
)
from qmachina.silver_build import MANIFEST_FILE, SILVER_FILE, SilverBuildResult, build_silver
from qmachina.specs.gold import load_gold_spec
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import ResolvedPipeline, default_configs_root, resolve_pipeline

CONFIGS = default_configs_root()
ES_PIPELINE_FILE = CONFIGS / "pipelines" / "es_default.yaml"
VP_GOLD_FILE = CONFIGS / "gold" / "vp_default.yaml"
# Five minutes from the Globex open: the ES sample's busiest stretch, small enough to build fast.
ES_SESSION = {"start": "2023-12-25T17:00", "end": "2023-12-25T17:05"}


def es_section(session: dict[str, str] | None = None) -> dict[str, Any]:
    """The shipped ES pipeline as a section (the file's content), cut to ``session``."""
    section: dict[str, Any] = yaml.safe_load(ES_PIPELINE_FILE.read_text())
    section["capture"]["session"] = dict(session or ES_SESSION)
    return section


@dataclass(frozen=True)
class EsPreview:
    section: dict[str, Any]
    data: Path
    lake: Path
    cold: SilverPreview
    direct: SilverBuildResult
    direct_silver: Path


@pytest.fixture(scope="module")
def es_preview(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> EsPreview:
    """One cold preview into a fresh lake, and the same pipeline built directly elsewhere."""
    base = tmp_path_factory.mktemp("preview")
    section = es_section()
    cold = preview_silver(
        section, configs_root=CONFIGS, data_root=sample_dir, lake_root=base / "lake"
    )
    spec_file = base / "es_session.yaml"
    spec_file.write_text(yaml.safe_dump(section))
    pipeline = resolve_pipeline(spec_file, CONFIGS, sample_dir)
    direct = build_silver(pipeline, base / "direct")
    return EsPreview(
        section, sample_dir, base / "lake", cold, direct, direct.output_dir / SILVER_FILE
    )


def silver_of(setup: EsPreview, **kwargs: Any) -> SilverPreview:
    return preview_silver(
        setup.section, configs_root=CONFIGS, data_root=setup.data, lake_root=setup.lake, **kwargs
    )


# ------------------------------------------------------------------------------------- silver


def test_es_silver_preview_matches_a_direct_build(es_preview: EsPreview) -> None:
    cold, direct = es_preview.cold, es_preview.direct
    assert cold.silver_built
    assert cold.pipeline_hash == direct.pipeline_hash
    assert cold.bins_total == direct.bins == 3000  # five minutes of 100 ms bins
    assert cold.events == direct.events
    assert cold.bin_width_ms == 100
    assert cold.ticks_per_bin == 81  # grid radius 40 in configs/instruments/es.yaml

    table = pq.read_table(es_preview.direct_silver)
    starts = table["bin_start_ns"].to_numpy()
    assert cold.first_bin_start_ns == starts[0]
    assert cold.last_bin_start_ns == starts[-1]
    assert cold.valid_bins == int(np.sum(table["book_valid"].to_numpy(zero_copy_only=False)))
    assert 0 < cold.valid_bins <= cold.bins_total

    # Each sample is the direct build's bin at that index, prices as decimals.
    rows = table.take([sample.bin_index for sample in cold.samples]).to_pylist()
    for sample, row in zip(cold.samples, rows, strict=True):
        assert sample.bin_start_ns == row["bin_start_ns"]
        assert sample.spot == (None if row["spot"] is None else row["spot"] / 1e9)
        assert sample.best_bid == (None if row["best_bid"] is None else row["best_bid"] / 1e9)
        assert sample.best_ask == (None if row["best_ask"] is None else row["best_ask"] / 1e9)
        assert sample.book_valid == row["book_valid"]
        assert sample.event_count == row["event_count"]
        assert sample.window_ticks == len(row["rest_depth"]) == row["window_ticks"]
        assert sample.resting_depth == sum(row["rest_depth"])
        assert sample.bid_depth == sum(row["bid_depth"])
        assert sample.ask_depth == sum(row["ask_depth"])
    # ES quotes in quarter points around 4,800 that evening; spot is the mid.
    spots = [s.spot for s in cold.samples if s.spot is not None]
    assert spots
    assert all(4700 < spot < 4900 and (spot * 8) % 1 == 0 for spot in spots)


def test_samples_are_evenly_spaced_with_the_first_and_last_bin(es_preview: EsPreview) -> None:
    indices = [sample.bin_index for sample in es_preview.cold.samples]
    assert len(indices) == 20
    assert indices[0] == 0
    assert indices[-1] == es_preview.cold.bins_total - 1
    gaps = np.diff(indices)
    assert gaps.min() >= 1
    assert gaps.max() - gaps.min() <= 1  # 2999 / 19 is not whole: gaps of 157 and 158

    seven = silver_of(es_preview, samples=7)
    assert [s.bin_index for s in seven.samples] == [0, 499, 999, 1499, 1999, 2499, 2999]
    assert seven.samples[-1].bin_start_ns == seven.last_bin_start_ns


@pytest.mark.parametrize(("total", "samples"), [(2, 2), (3, 2), (10, 3), (101, 20), (5, 9)])
def test_evenly_spaced_indices(total: int, samples: int) -> None:
    indices = evenly_spaced(total, samples)
    assert indices == sorted(set(indices))
    assert len(indices) == min(total, samples)
    assert indices[0] == 0
    assert indices[-1] == total - 1
    gaps = np.diff(indices)
    assert gaps.max() - gaps.min() <= 1


def test_a_second_preview_reads_the_lake(
    es_preview: EsPreview, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = es_preview.lake / es_preview.cold.pipeline_hash
    stamps = {name: (directory / name).stat().st_mtime_ns for name in (SILVER_FILE, MANIFEST_FILE)}

    def no_build(pipeline: ResolvedPipeline, lake_root: Path) -> SilverBuildResult:
        raise AssertionError(f"silver of {pipeline.pipeline_hash} built again")

    monkeypatch.setattr(preview_module, "build_silver", no_build)
    warm = silver_of(es_preview)
    assert not warm.silver_built
    assert warm.model_dump(exclude={"silver_built"}) == es_preview.cold.model_dump(
        exclude={"silver_built"}
    )
    assert {n: (directory / n).stat().st_mtime_ns for n in stamps} == stamps


def test_concurrent_previews_of_a_new_pipeline_build_it_once(
    tmp_path: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = es_section({"start": "2023-12-25T16:00", "end": "2023-12-25T16:01"})
    builds: list[str] = []
    real_build: Callable[..., SilverBuildResult] = build_silver

    def counted_build(pipeline: ResolvedPipeline, lake_root: Path) -> SilverBuildResult:
        builds.append(pipeline.pipeline_hash)
        threading.Event().wait(0.2)  # keep the build open while the other preview arrives
        return real_build(pipeline, lake_root)

    monkeypatch.setattr(preview_module, "build_silver", counted_build)
    results: list[SilverPreview] = []

    def run() -> None:
        results.append(
            preview_silver(section, configs_root=CONFIGS, data_root=sample_dir, lake_root=tmp_path)
        )

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert sorted(r.silver_built for r in results) == [False, False, True]
    assert {r.bins_total for r in results} == {600}


# --------------------------------------------------------------------------------------- gold


def reference_stats(name: str, values: np.ndarray) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    low, p05, p50, p95, high = np.percentile(finite, [0, 5, 50, 95, 100])
    return {
        "output": name,
        "count": values.size,
        "finite": finite.size,
        "mean": finite.sum() / finite.size,
        "std": np.sqrt(((finite - finite.mean()) ** 2).mean()),
        "min": low,
        "p05": p05,
        "p50": p50,
        "p95": p95,
        "max": high,
    }


def reference_gold_stats(silver_file: Path, max_bins: int | None = None) -> list[dict[str, Any]]:
    """vp_default over the silver file, with every cell inside each bin's window collected by
    hand, and the statistics computed by numpy on them."""
    table = pq.read_table(silver_file)
    if max_bins is not None:
        table = table.slice(0, max_bins)
    frame = SilverFrame(table, tick_size=250_000_000)
    gold = run_gold(load_gold_spec(VP_GOLD_FILE).graph(), frame)
    firsts = table["window_first_tick"].to_pylist()
    widths = table["window_ticks"].to_pylist()
    expected = []
    for name, values in gold.outputs.items():
        if values.ndim == 2:
            cells = [
                values[row, first - frame.first_tick : first - frame.first_tick + width]
                for row, (first, width) in enumerate(zip(firsts, widths, strict=True))
            ]
            values = np.concatenate(cells)
        expected.append(reference_stats(name, values))
    return expected


def assert_stats_equal(found: list[OutputStats], expected: list[dict[str, Any]]) -> None:
    assert [s.output for s in found] == [e["output"] for e in expected]
    for stats, reference in zip(found, expected, strict=True):
        assert (stats.count, stats.finite) == (reference["count"], reference["finite"])
        for key in ("mean", "std", "min", "p05", "p50", "p95", "max"):
            assert getattr(stats, key) == pytest.approx(
                float(reference[key]), rel=1e-9, abs=1e-12
            ), f"{stats.output}.{key}"


def test_gold_preview_of_vp_default_equals_numpy_over_the_gold_frame(
    es_preview: EsPreview,
) -> None:
    gold_section = yaml.safe_load(VP_GOLD_FILE.read_text())
    found = preview_gold(
        es_preview.section,
        gold_section,
        configs_root=CONFIGS,
        data_root=es_preview.data,
        lake_root=es_preview.lake,
    )
    assert found.pipeline_hash == es_preview.cold.pipeline_hash
    assert found.gold_hash == spec_hash(load_gold_spec(VP_GOLD_FILE))
    assert not found.silver_built
    assert found.bins == found.bins_total == 3000
    kinds = {s.output: s.kind for s in found.outputs}
    assert kinds["pressure"] == "grid"
    assert kinds["vp_bias"] == "series"
    assert found.outputs[0].count > found.bins  # a grid counts cells, not bins
    assert_stats_equal(found.outputs, reference_gold_stats(es_preview.direct_silver))

    first = preview_gold(
        es_preview.section,
        gold_section,
        configs_root=CONFIGS,
        data_root=es_preview.data,
        lake_root=es_preview.lake,
        max_bins=500,
    )
    assert (first.bins, first.bins_total) == (500, 3000)
    assert_stats_equal(first.outputs, reference_gold_stats(es_preview.direct_silver, 500))
    # JSON-safe: the model round-trips through strict JSON (no NaN anywhere).
    assert type(first).model_validate_json(first.model_dump_json()) == first


# ------------------------------------------------------------------------------------- errors


def preview_error(
    section: dict[str, Any], data_root: Path, lake_root: Path, gold: dict[str, Any] | None = None
) -> PreviewError:
    def run() -> object:
        if gold is None:
            return preview_silver(
                section, configs_root=CONFIGS, data_root=data_root, lake_root=lake_root
            )
        return preview_gold(
            section, gold, configs_root=CONFIGS, data_root=data_root, lake_root=lake_root
        )

    with pytest.raises(PreviewError) as caught:
        run()
    return caught.value


def test_an_unknown_pipeline_field_is_named(tmp_path: Path, sample_dir: Path) -> None:
    section = es_section()
    section["capture"]["bin_width"] = 100
    error = preview_error(section, sample_dir, tmp_path)
    assert [(i.file, i.field) for i in error.issues] == [("pipeline", "capture.bin_width")]
    assert "unknown field 'bin_width'" in str(error)
    assert str(error).startswith("pipeline: capture.bin_width: ")
    assert not any(tmp_path.iterdir())  # nothing was built


def test_a_missing_dataset_file_is_named(tmp_path: Path, sample_dir: Path) -> None:
    section = es_section()
    section["capture"]["dataset_files"] = ["esh4-glbx-mdp3-20991231.mbo.dbn.zst"]
    error = preview_error(section, sample_dir, tmp_path)
    assert [i.field for i in error.issues] == ["capture.dataset_files[0]"]
    assert "esh4-glbx-mdp3-20991231.mbo.dbn.zst not found" in str(error)


def test_a_missing_instrument_config_is_named(tmp_path: Path, sample_dir: Path) -> None:
    section = es_section()
    section["instrument"] = "instruments/zz.yaml"
    error = preview_error(section, sample_dir, tmp_path)
    assert [i.field for i in error.issues] == ["instrument"]
    assert "instruments/zz.yaml not found" in str(error)


def test_an_unreadable_dataset_file_is_named(tmp_path: Path, sample_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "garbage.mbo.dbn").write_bytes(b"not a DBN file at all" * 8)
    section = es_section()
    (data / "esh4-glbx-mdp3-20231225.mbo.dbn.zst").symlink_to(
        sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst"
    )
    section = es_section()
    section["capture"]["dataset_files"].append("garbage.mbo.dbn")
    error = preview_error(section, data, tmp_path / "lake")
    assert [i.field for i in error.issues] == ["capture.dataset_files[1]"]
    assert "garbage.mbo.dbn" in str(error)
    assert not list((tmp_path / "lake").glob("*/" + MANIFEST_FILE))  # nothing stored


def test_a_session_without_data_is_named(tmp_path: Path, sample_dir: Path) -> None:
    section = es_section({"start": "2023-12-27T09:00", "end": "2023-12-27T09:05"})
    error = preview_error(section, sample_dir, tmp_path)
    assert [i.field for i in error.issues] == ["capture.session"]
    assert "no silver bins" in str(error)


def test_an_invalid_gold_section_is_named_before_any_build(
    tmp_path: Path, sample_dir: Path
) -> None:
    gold = copy.deepcopy(yaml.safe_load(VP_GOLD_FILE.read_text()))
    gold["nodes"]["v_add"]["field"] = "add_mass_velocity"
    error = preview_error(es_section(), sample_dir, tmp_path, gold)
    assert [(i.file, i.field) for i in error.issues] == [("gold", "nodes.v_add.field")]
    assert "unknown silver field 'add_mass_velocity'" in str(error)
    assert not any(tmp_path.iterdir())

    del gold["nodes"]["v_add"]
    gold["nodes"]["v_add_typo"] = {"op": "source", "field": "add_mass_v"}
    error = preview_error(es_section(), sample_dir, tmp_path, gold)
    assert all(i.file == "gold" for i in error.issues)
    assert "v_add" in str(error)
