"""``qmachina silver build``: lake layout, manifest, determinism, and failing without loss."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qmachina.cli import app
from qmachina.specs.pipeline import default_configs_root

runner = CliRunner()
ES_FILE = "esh4-glbx-mdp3-20231225.mbo.dbn.zst"


def _pipeline(tmp_path: Path, sample_dir: Path, files: list[str]) -> Path:
    """A ten-minute session of the ES sample, written where the test can change it."""
    configs = tmp_path / "configs"
    (configs / "instruments").mkdir(parents=True)
    (configs / "pipelines").mkdir()
    es = (default_configs_root() / "instruments" / "es.yaml").read_text()
    (configs / "instruments" / "es.yaml").write_text(es)
    listed = "\n".join(f"    - {sample_dir / name}" for name in files)
    path = configs / "pipelines" / "es_10min.yaml"
    path.write_text(
        "name: es_10min\n"
        "instrument: instruments/es.yaml\n"
        "capture:\n"
        f"  dataset_files:\n{listed}\n"
        "  raw_symbol: ESH4\n"
        "  session: {start: '2023-12-25T17:00', end: '2023-12-25T17:10'}\n"
    )
    return path


def _build(pipeline: Path, lake: Path, *extra: str) -> tuple[int, str, str]:
    result = runner.invoke(
        app, ["silver", "build", "--pipeline", str(pipeline), "--out", str(lake), *extra]
    )
    return result.exit_code, result.stdout, result.stderr


def _only_dir(lake: Path) -> Path:
    dirs = [d for d in lake.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_build_writes_silver_and_manifest_keyed_by_pipeline_hash(
    tmp_path: Path, sample_dir: Path
) -> None:
    pipeline = _pipeline(tmp_path, sample_dir, [ES_FILE])
    code, stdout, stderr = _build(pipeline, tmp_path / "lake")
    assert code == 0, stderr
    out = _only_dir(tmp_path / "lake")
    manifest = json.loads((out / "manifest.json").read_text())
    assert out.name == manifest["pipeline_hash"]
    assert manifest["schema_version"] == "qmachina.silver/1"
    source = sample_dir / ES_FILE
    assert manifest["inputs"] == [
        {
            "name": ES_FILE,
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "bytes": source.stat().st_size,
        }
    ]
    silver = pq.read_table(out / "silver.parquet")
    assert silver.num_rows == manifest["counts"]["bins"] == 6000  # ten minutes of 100 ms bins
    assert silver.schema.metadata[b"qmachina.schema_version"] == b"qmachina.silver/1"
    starts = silver["bin_start_ns"].to_numpy()
    assert starts[0] == 1_703_545_200_000_000_000  # 17:00 Chicago
    assert (starts[1:] - starts[:-1] == 100_000_000).all()
    assert (
        manifest["silver_sha256"]
        == hashlib.sha256((out / "silver.parquet").read_bytes()).hexdigest()
    )
    assert "events/s" in stdout
    assert "anomalies" in stdout


def test_same_input_and_config_give_byte_identical_output(tmp_path: Path, sample_dir: Path) -> None:
    pipeline = _pipeline(tmp_path, sample_dir, [ES_FILE])
    assert _build(pipeline, tmp_path / "a")[0] == 0
    assert _build(pipeline, tmp_path / "b")[0] == 0
    a, b = _only_dir(tmp_path / "a"), _only_dir(tmp_path / "b")
    assert a.name == b.name
    assert (a / "silver.parquet").read_bytes() == (b / "silver.parquet").read_bytes()
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_bad_input_fails_naming_it_and_keeps_the_stored_build(
    tmp_path: Path, sample_dir: Path, damage: str
) -> None:
    pipeline = _pipeline(tmp_path, sample_dir, [ES_FILE])
    lake = tmp_path / "lake"
    assert _build(pipeline, lake)[0] == 0
    stored = _only_dir(lake)
    before = (stored / "silver.parquet").read_bytes()

    bad = tmp_path / ES_FILE  # same name, so the same pipeline hash as the stored build
    raw = (sample_dir / ES_FILE).read_bytes()
    # Cut inside the snapshot: the session needs those records, so the damage is reached.
    bad.write_bytes(raw[: len(raw) // 50] if damage == "truncated" else b"\x00" * 4096)
    code, _, stderr = _build(pipeline, lake, "--input", str(bad))
    assert code == 2
    assert ES_FILE in stderr
    assert _only_dir(lake) == stored
    assert (stored / "silver.parquet").read_bytes() == before
