"""The spec chain's CI gate: every shipped config validates, cross-references included; broken
and legacy specs behave as documented; golden files pin the parsed form of every shipped spec."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from qmachina.cli import app
from qmachina.specs.errors import SpecError
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.gold import load_gold_spec
from qmachina.specs.identity import canonical_json
from qmachina.specs.instrument import load_instrument_config
from qmachina.specs.pipeline import default_configs_root, load_pipeline_spec
from qmachina.specs.serving import ServingSpec, StreamRole
from qmachina.specs.yaml_loader import load_spec
from qmachina.validate_configs import main as validate_main
from qmachina.validate_configs import validate_configs

FIXTURES = Path(__file__).parent / "fixtures" / "specs"
GOLDEN = Path(__file__).parent / "golden"
CONFIGS = default_configs_root()
runner = CliRunner()


def _parsed(path: Path) -> BaseModel:
    kind = path.parent.name
    if kind == "instruments":
        return load_instrument_config(path)
    if kind == "pipelines":
        return load_pipeline_spec(path)
    if kind == "gold":
        return load_gold_spec(path)
    if kind == "serving":
        return load_spec(path, ServingSpec)
    return load_spec(path, ExperimentSpec)


def _tree_with(tmp_path: Path, extra: Path, kind: str) -> Path:
    """A copy of the shipped configs with one more file in ``kind``."""
    root = tmp_path / "configs"
    shutil.copytree(CONFIGS, root)
    shutil.copy(extra, root / kind / extra.name)
    return root


def test_every_shipped_config_validates() -> None:
    report = validate_configs()
    assert report.ok, "\n".join(map(str, report.issues))
    kinds = {path.parent.name for path in report.checked}
    assert kinds == {"instruments", "pipelines", "gold", "serving", "experiments"}
    assert report.deprecations == []


SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_golden_parsed_form(path: Path) -> None:
    golden = GOLDEN / path.relative_to(CONFIGS).with_suffix(".json")
    parsed = json.loads(canonical_json(_parsed(path)))
    if os.environ.get("QMACHINA_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(parsed, indent=2, sort_keys=True) + "\n")
    assert golden.is_file(), f"no golden file {golden} (QMACHINA_UPDATE_GOLDEN=1 writes it)"
    assert parsed == json.loads(golden.read_text()), f"{path} parses differently than pinned"


def test_broken_fixture_fails_with_every_problem_located(tmp_path: Path) -> None:
    root = _tree_with(tmp_path, FIXTURES / "broken_serving.yaml", "serving")
    report = validate_configs(root=root)
    broken = str(root / "serving" / "broken_serving.yaml")
    messages = [str(issue) for issue in report.issues]
    assert not report.ok
    assert all(issue.file == broken for issue in report.issues), messages
    assert any(":8: signal.params.k_ticks:" in m and "integer" in m for m in messages), messages
    assert any(
        ":13: stream.silver[0].field:" in m and "gold never travels on the silver wire" in m
        for m in messages
    ), messages
    assert any(
        ":15: stream.gold[0].field:" in m and "does not emit 'no_such_output'" in m
        for m in messages
    ), messages


def test_cli_and_module_exit_non_zero_on_a_broken_tree(tmp_path: Path) -> None:
    root = _tree_with(tmp_path, FIXTURES / "broken_serving.yaml", "serving")
    result = runner.invoke(app, ["config", "validate", "--root", str(root)])
    assert result.exit_code == 1
    assert "broken_serving.yaml:13" in result.stderr
    assert validate_main(["--root", str(root)]) == 1
    assert validate_main([]) == 0
    ok = runner.invoke(app, ["config", "validate"])
    assert ok.exit_code == 0, ok.output


def test_legacy_stream_roles_map_through_the_alias_table(tmp_path: Path) -> None:
    legacy = FIXTURES / "legacy_derivative_baseline.yaml"
    with pytest.warns(DeprecationWarning, match="is deprecated; write role") as caught:
        parsed = load_spec(legacy, ServingSpec)
    assert sorted({str(w.message).split("'")[1] for w in caught}) == ["feature", "index", "score"]
    modern = load_spec(CONFIGS / "serving" / "derivative_baseline.yaml", ServingSpec)
    assert parsed == modern
    roles = {entry.field: entry.role for entry in parsed.stream.silver + parsed.stream.gold}
    assert roles["window_first_tick"] is StreamRole.GRID_INDEX
    assert roles["add_mass_v"] is StreamRole.VELOCITY
    assert roles["composite"] is StreamRole.FORCE
    assert roles["score"] is StreamRole.SIGNAL
    root = _tree_with(tmp_path, legacy, "serving")
    report = validate_configs([root / "serving" / legacy.name], root=root)
    assert report.ok, report.issues
    assert len(report.deprecations) == 5  # index, feature (three fields), score


def test_unknown_legacy_free_role_is_an_error(tmp_path: Path) -> None:
    text = (CONFIGS / "serving" / "ema_ensemble_baseline.yaml").read_text()
    path = tmp_path / "x.yaml"
    path.write_text(text.replace("role: depth", "role: heat"))
    with pytest.raises(SpecError, match=r"x\.yaml:\d+: stream\.silver\[1\]\.role"):
        load_spec(path, ServingSpec)


def test_experiment_axes_are_checked_against_the_signal(tmp_path: Path) -> None:
    experiment = (CONFIGS / "experiments" / "es_derivative_sweep.yaml").read_text()
    bad = experiment.replace("z_window: [300, 600]", "z_window: [300, 1.5]\n    lookback: [3]")
    path = tmp_path / "bad_sweep.yaml"
    path.write_text(bad)
    root = _tree_with(tmp_path, path, "experiments")
    report = validate_configs([root / "experiments" / "bad_sweep.yaml"], root=root)
    messages = [str(issue) for issue in report.issues]
    assert any("sweep.signal_params.z_window[1]" in m and "integer" in m for m in messages)
    assert any("has no parameter 'lookback'" in m for m in messages), messages


def test_experiment_scalars_are_axes_of_one() -> None:
    spec = load_spec(CONFIGS / "experiments" / "es_derivative_sweep.yaml", ExperimentSpec)
    assert spec.eval.max_hold_bins == (600,)
    assert spec.eval.tp_ticks == (4, 8)


def test_sweep_size_is_bounded(tmp_path: Path) -> None:
    text = (CONFIGS / "experiments" / "es_derivative_sweep.yaml").read_text()
    path = tmp_path / "huge.yaml"
    path.write_text(text.replace("k_ticks: [5, 10, 20]", f"k_ticks: {list(range(1, 5000))}"))
    with warnings.catch_warnings(), pytest.raises(SpecError, match="points; at most"):
        load_spec(path, ExperimentSpec)
