"""A model drafted in steps, and given whole as one manual YAML text: structural checks (pure),
deep checks through the project's validators, the materialized configs root, from_file."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from qmachina.modeling.draft import (
    ALIAS_PATTERN,
    MODEL_FILES,
    POINT_HASH_PATTERN,
    SECTION_OF_STEP,
    STEP_NAMES,
    ModelIssues,
    StepIssue,
    check_sections,
    expand_from_file,
    materialize,
    structural_issues,
)
from qmachina.modeling.manual import parse_manual
from qmachina.specs.pipeline import default_configs_root
from qmachina.store.serving_registry import ALIAS_NAME, FULL_HASH
from qmachina.validate_configs import validate_experiment

CONFIGS = default_configs_root()
Section = dict[str, Any]


def _shipped(relative: str) -> Section:
    data = yaml.safe_load((CONFIGS / relative).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _chain() -> dict[str, Section]:
    """The shipped chain as sections: serving without its references, experiment without
    serving (and without name, which then defaults to the serving's model_id)."""
    serving = _shipped("serving/derivative_baseline.yaml")
    del serving["pipeline"], serving["gold"]
    experiment = _shipped("experiments/es_derivative_sweep.yaml")
    del experiment["serving"], experiment["name"]
    return {
        "pipeline": _shipped("pipelines/es_default.yaml"),
        "gold": _shipped("gold/vp_default.yaml"),
        "serving": serving,
        "experiment": experiment,
    }


def _fields(issues: list[StepIssue]) -> list[tuple[int, str]]:
    return [(issue.step, issue.field) for issue in issues]


# --- the shipped chain -------------------------------------------------------------------------


def test_step_tables_agree() -> None:
    assert STEP_NAMES[:4] == ("dataset", "gold", "signal", "parameter_space")
    assert set(SECTION_OF_STEP.values()) == set(MODEL_FILES)


def test_shipped_chain_passes_structural_and_deep_checks(sample_dir: Path) -> None:
    sections = _chain()
    for step, section in SECTION_OF_STEP.items():
        assert structural_issues(step, sections[section]) == [], section
    assert check_sections(sections, configs_root=CONFIGS, data_root=sample_dir) == []


def test_materialized_chain_is_the_shipped_one(tmp_path: Path, sample_dir: Path) -> None:
    into = materialize(_chain(), configs_root=CONFIGS, into=tmp_path / "root")
    spec = validate_experiment(into / MODEL_FILES["experiment"], root=into, data_root=sample_dir)
    assert spec.name == "derivative_baseline"  # defaulted to the serving's model_id
    written = yaml.safe_load((into / MODEL_FILES["experiment"]).read_text(encoding="utf-8"))
    shipped = _shipped("experiments/es_derivative_sweep.yaml")
    assert written.pop("serving") == "serving/model.yaml"
    assert written.pop("name") == "derivative_baseline"
    del shipped["serving"], shipped["name"]
    assert written == shipped
    serving = yaml.safe_load((into / MODEL_FILES["serving"]).read_text(encoding="utf-8"))
    assert (serving["pipeline"], serving["gold"]) == ("pipelines/model.yaml", "gold/model.yaml")
    assert (into / "instruments" / "es.yaml").is_file()  # the shipped files resolve


def test_materialize_is_idempotent_and_drops_absent_sections(tmp_path: Path) -> None:
    into = tmp_path / "root"
    materialize(_chain(), configs_root=CONFIGS, into=into)
    first = {relative: (into / relative).read_bytes() for relative in MODEL_FILES.values()}
    materialize(_chain(), configs_root=CONFIGS, into=into)
    assert {relative: (into / relative).read_bytes() for relative in MODEL_FILES.values()} == first

    two = {name: section for name, section in _chain().items() if name in ("pipeline", "gold")}
    materialize(two, configs_root=CONFIGS, into=into)
    assert (into / MODEL_FILES["gold"]).read_bytes() == first[MODEL_FILES["gold"]]
    assert not (into / MODEL_FILES["serving"]).exists()
    assert not (into / MODEL_FILES["experiment"]).exists()


def test_materialize_refuses_the_configs_root_itself(tmp_path: Path) -> None:
    root = tmp_path / "configs"
    shutil.copytree(CONFIGS, root)
    with pytest.raises(ValueError, match="inside the configs root"):
        materialize(_chain(), configs_root=root, into=root / "drafts")


def test_a_section_without_the_ones_before_it_is_a_programming_error(sample_dir: Path) -> None:
    sections = _chain()
    del sections["gold"]
    with pytest.raises(AssertionError, match="prefix"):
        check_sections(sections, configs_root=CONFIGS, data_root=sample_dir)


# --- structural issues --------------------------------------------------------------------------


def test_scoring_threshold_out_of_range() -> None:
    serving = _chain()["serving"]
    serving["scoring"]["threshold"] = -1
    assert _fields(structural_issues(3, serving)) == [(3, "scoring.threshold")]


def test_step_3_must_not_name_its_own_pipeline() -> None:
    serving = _chain()["serving"]
    serving["pipeline"] = "pipelines/es_default.yaml"
    issues = structural_issues(3, serving)
    assert _fields(issues) == [(3, "pipeline")]
    assert "supplied by the session" in issues[0].message


def test_step_4_must_not_name_its_serving_and_may_omit_its_name() -> None:
    experiment = _chain()["experiment"]
    assert structural_issues(4, experiment) == []
    assert _fields(structural_issues(4, {**experiment, "serving": "serving/x.yaml"})) == [
        (4, "serving")
    ]


def test_sweep_axis_value_out_of_range() -> None:
    experiment = _chain()["experiment"]
    experiment["eval"]["tp_ticks"] = [4, 0]
    assert _fields(structural_issues(4, experiment)) == [(4, "eval.tp_ticks.1")]


def test_unknown_gold_op() -> None:
    gold = _chain()["gold"]
    gold["nodes"]["v_pull"] = {"op": "median_of_everything", "inputs": ["v_add"]}
    issues = structural_issues(2, gold)
    assert _fields(issues) == [(2, "nodes.v_pull.op")]
    assert "unknown op 'median_of_everything'" in issues[0].message


def test_gold_graph_issues_are_located_at_the_node() -> None:
    gold = _chain()["gold"]
    gold["nodes"]["pressure"]["inputs"] = ["v_add", "rest_building", "nowhere"]
    assert _fields(structural_issues(2, gold)) == [(2, "nodes.pressure.inputs.2")]


def test_unknown_pipeline_field_gets_a_hint() -> None:
    pipeline = _chain()["pipeline"]
    pipeline["captur"] = pipeline.pop("capture")
    issues = structural_issues(1, pipeline)
    assert (1, "captur") in _fields(issues)
    assert any("did you mean 'capture'" in issue.message for issue in issues)


def test_execution_and_decision_payloads() -> None:
    assert structural_issues(5, {}) == []
    assert _fields(structural_issues(5, {"notes": "x"})) == [(5, "notes")]
    best = {"decision": "promote", "alias": "es-live", "reason": "beats the baseline"}
    assert structural_issues(6, best) == []
    assert structural_issues(6, {"decision": "abandon", "reason": "no edge"}) == []
    no_alias = structural_issues(6, {"decision": "promote", "reason": "beats the baseline"})
    assert len(no_alias) == 1
    assert no_alias[0].step == 6
    assert "alias" in no_alias[0].message
    bad = {**best, "alias": "ES Live", "point_hash": "abc", "reason": "  "}
    assert sorted(_fields(structural_issues(6, bad))) == [
        (6, "alias"),
        (6, "point_hash"),
        (6, "reason"),
    ]


def test_unknown_step() -> None:
    assert _fields(structural_issues(7, {})) == [(7, "")]


def test_decision_patterns_are_the_stores() -> None:
    assert ALIAS_NAME.pattern == ALIAS_PATTERN
    assert FULL_HASH.pattern == POINT_HASH_PATTERN


# --- deep issues --------------------------------------------------------------------------------


def test_missing_data_file_is_a_step_1_issue_naming_the_file(sample_dir: Path) -> None:
    sections = _chain()
    sections["pipeline"]["capture"]["dataset_files"] = ["esh4-nowhere.mbo.dbn.zst"]
    issues = check_sections(
        {"pipeline": sections["pipeline"]}, configs_root=CONFIGS, data_root=sample_dir
    )
    assert _fields(issues) == [(1, "capture.dataset_files.0")]
    assert "esh4-nowhere.mbo.dbn.zst" in issues[0].message


def test_later_checks_meeting_a_bad_pipeline_report_it_once_at_step_1(sample_dir: Path) -> None:
    sections = _chain()
    sections["pipeline"]["capture"]["dataset_files"] = ["esh4-nowhere.mbo.dbn.zst"]
    issues = check_sections(sections, configs_root=CONFIGS, data_root=sample_dir)
    assert _fields(issues) == [(1, "capture.dataset_files.0")]


def test_streaming_a_field_gold_does_not_emit_is_a_step_3_issue(sample_dir: Path) -> None:
    sections = _chain()
    sections["serving"]["stream"]["gold"][1]["field"] = "flow_mood"
    del sections["experiment"]
    issues = check_sections(sections, configs_root=CONFIGS, data_root=sample_dir)
    assert _fields(issues) == [(3, "stream.gold.1.field")]
    assert "'flow_mood'" in issues[0].message


def test_unknown_swept_signal_parameter_is_a_step_4_issue(sample_dir: Path) -> None:
    sections = _chain()
    sections["experiment"]["sweep"]["signal_params"] = {"k_tick": [5]}
    issues = check_sections(sections, configs_root=CONFIGS, data_root=sample_dir)
    assert _fields(issues) == [(4, "sweep.signal_params.k_tick.0")]


def test_issue_in_a_shipped_file_names_it(tmp_path: Path, sample_dir: Path) -> None:
    root = tmp_path / "configs"
    shutil.copytree(CONFIGS, root)
    broken = _shipped("instruments/es.yaml")
    broken["tick_size"] = "a quarter"
    (root / "instruments" / "broken.yaml").write_text(yaml.safe_dump(broken), encoding="utf-8")
    pipeline = {**_chain()["pipeline"], "instrument": "instruments/broken.yaml"}
    issues = check_sections({"pipeline": pipeline}, configs_root=root, data_root=sample_dir)
    in_instrument = [issue for issue in issues if issue.field == ""]
    assert len(in_instrument) == 1
    assert in_instrument[0].step == 1
    assert f"{root}/instruments/broken.yaml:" in in_instrument[0].message
    assert "tick_size" in in_instrument[0].message
    assert (1, "instrument") in _fields(issues)
    assert all("qmachina-draft-" not in issue.message for issue in issues)


# --- expand_from_file ---------------------------------------------------------------------------


def test_from_file_for_each_section() -> None:
    chain = _chain()
    files = {
        1: "pipelines/es_default.yaml",
        2: "gold/vp_default.yaml",
        3: "serving/derivative_baseline.yaml",
        4: "experiments/es_derivative_sweep.yaml",
    }
    for step, file in files.items():
        expanded = expand_from_file(step, {"from_file": file}, CONFIGS)
        expected = chain[SECTION_OF_STEP[step]]
        if step == 4:
            expected["name"] = "es_derivative_sweep"  # the file's own name is kept
        assert expanded == expected, file
        assert structural_issues(step, expanded) == []


def test_a_payload_without_from_file_is_copied() -> None:
    gold = _chain()["gold"]
    expanded = expand_from_file(2, gold, CONFIGS)
    assert expanded == gold
    nodes = expanded["nodes"]
    assert isinstance(nodes, dict)
    nodes["v_add"]["field"] = "changed"
    assert gold["nodes"]["v_add"]["field"] == "add_mass_v"


@pytest.mark.parametrize(
    ("step", "payload", "message"),
    [
        (1, {"from_file": "../pyproject.toml"}, "outside the configs root"),
        (1, {"from_file": "pipelines/../../README.md"}, "outside the configs root"),
        (1, {"from_file": "/etc/hostname"}, "relative to the configs root"),
        (2, {"from_file": "gold/nowhere.yaml"}, "not found"),
        (2, {"from_file": "gold/vp_default.yaml", "version": 1}, "give from_file alone"),
        (5, {"from_file": "gold/vp_default.yaml"}, "only steps 1-4"),
    ],
)
def test_from_file_refusals(step: int, payload: dict[str, object], message: str) -> None:
    with pytest.raises(ModelIssues, match=message) as caught:
        expand_from_file(step, payload, CONFIGS)
    assert _fields(caught.value.issues) == [(step, "from_file")]


# --- manual mode --------------------------------------------------------------------------------


def _manual(chain: dict[str, Section]) -> str:
    return yaml.safe_dump(chain, sort_keys=False)


def test_manual_model_parses_to_its_sections(sample_dir: Path) -> None:
    chain = _chain()
    model = parse_manual(_manual(chain), configs_root=CONFIGS, data_root=sample_dir)
    assert model.sections == chain


def test_manual_model_sections_from_files(sample_dir: Path) -> None:
    text = (
        "pipeline: {from_file: pipelines/es_default.yaml}\n"
        "gold: {from_file: gold/vp_default.yaml}\n"
        "serving: {from_file: serving/derivative_baseline.yaml}\n"
        "experiment: {from_file: experiments/es_derivative_sweep.yaml}\n"
    )
    model = parse_manual(text, configs_root=CONFIGS, data_root=sample_dir)
    assert model.sections["serving"] == _chain()["serving"]


MANUAL_WITH_ISSUES = """\
pipeline:
  from_file: pipelines/es_default.yaml
gold:
  from_file: gold/vp_default.yaml
serving:
  model_id: draft_model
  signal:
    name: derivative
    params: {grid: flow_state, k_ticks: 10}
  scoring: {threshold: 0.6}
  stream:
    gold:
      - {field: composite, role: force}
      - {field: flow_mood, role: state}
experiment:
  eval:
    tp_ticks: [4, 0]
    sl_ticks: 4
    max_hold_bins: 600
"""


def test_manual_model_issues_carry_their_lines(sample_dir: Path) -> None:
    with pytest.raises(ModelIssues) as caught:
        parse_manual(MANUAL_WITH_ISSUES, configs_root=CONFIGS, data_root=sample_dir)
    located = [(i.step, i.field, i.line) for i in caught.value.issues]
    assert located == [
        (3, "stream.gold.1.field", 14),  # deep: gold does not emit flow_mood
        (4, "eval.tp_ticks.1", 17),  # structural: a take-profit of 0 ticks
    ]
    assert "line 14: step 3 (signal): stream.gold.1.field:" in str(caught.value)


def test_manual_model_from_file_issues_point_at_from_file(sample_dir: Path) -> None:
    text = MANUAL_WITH_ISSUES.replace("gold/vp_default.yaml", "gold/nowhere.yaml")
    with pytest.raises(ModelIssues) as caught:
        parse_manual(text, configs_root=CONFIGS, data_root=sample_dir)
    first = caught.value.issues[0]
    assert (first.step, first.field, first.line) == (2, "from_file", 4)


def test_manual_model_missing_and_unknown_sections(sample_dir: Path) -> None:
    chain: dict[str, Any] = copy.deepcopy(_chain())
    del chain["gold"]
    chain["signal"] = {"name": "derivative"}
    with pytest.raises(ModelIssues) as caught:
        parse_manual(_manual(chain), configs_root=CONFIGS, data_root=sample_dir)
    issues = caught.value.issues
    assert (2, "") in _fields(issues)
    assert any("missing section 'gold'" in issue.message for issue in issues)
    unknown = [issue for issue in issues if issue.field == "signal"]
    assert len(unknown) == 1
    assert unknown[0].step == 0
    assert unknown[0].line == _manual(chain).splitlines().index("signal:") + 1


def test_manual_model_yaml_errors_have_lines(sample_dir: Path) -> None:
    text = "pipeline: {}\ngold: {}\ngold: {}\n"
    with pytest.raises(ModelIssues) as caught:
        parse_manual(text, configs_root=CONFIGS, data_root=sample_dir)
    assert [(i.step, i.field, i.line) for i in caught.value.issues] == [(0, "gold", 3)]
    assert "duplicate key" in caught.value.issues[0].message
