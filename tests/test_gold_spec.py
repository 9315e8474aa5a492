"""Gold specs: the DSL's validation (each error at the node's path and line), identity and shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from engine.gold.compiler import OPCODES
from engine.gold.graph import OPS, Kind, check_graph
from qmachina.specs.errors import SpecError
from qmachina.specs.gold import OP_MODELS, GoldSpec, load_gold_spec
from qmachina.specs.identity import canonical_json, spec_hash
from qmachina.specs.pipeline import default_configs_root

VP_DEFAULT = default_configs_root() / "gold" / "vp_default.yaml"

SMALL = """\
version: 1
nodes:
  v_add: {op: source, field: add_mass_v}
  v_pull: {op: source, field: pull_mass_v}
  net: {op: sub, inputs: [v_add, v_pull]}
  fast: {op: rolling_mean, inputs: [net], window: 5}
  above: {op: band, inputs: [fast], side: above, far: 4}
outputs: [fast, above]
"""


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _line_of(text: str, marker: str) -> int:
    """1-based line of the only line containing ``marker``."""
    lines = [number for number, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def _single_issue(tmp_path: Path, text: str) -> tuple[str, int | None, str]:
    with pytest.raises(SpecError) as caught:
        load_gold_spec(_write(tmp_path, text))
    assert len(caught.value.issues) == 1, caught.value
    issue = caught.value.issues[0]
    assert issue.file.endswith("spec.yaml")
    return issue.field, issue.line, issue.message


def test_the_default_vp_spec_loads_with_its_outputs_in_order() -> None:
    spec = load_gold_spec(VP_DEFAULT)
    checked = check_graph(spec.graph())
    assert spec.outputs[:3] == ("pressure", "vacuum", "composite")
    assert spec.outputs[-3:] == ("flow_above", "flow_below", "vp_bias")
    assert checked.kinds["flow_score"] is Kind.GRID
    assert checked.kinds["vp_bias"] is Kind.SERIES
    # The YAML merge key shares the robust z parameters; each node keeps its own input.
    assert spec.nodes["rollup_d3_z"].model_dump() == {
        **spec.nodes["rollup_d1_z"].model_dump(),
        "inputs": ("rollup_d3",),
    }


@pytest.mark.parametrize(
    ("text", "marker", "field", "message"),
    [
        pytest.param(
            SMALL.replace("window: 5", "window: 5, windw: 3"),
            "windw",
            "nodes.fast.windw",
            "unknown field 'windw' for op 'rolling_mean'; did you mean 'window'?",
            id="unknown-field",
        ),
        pytest.param(
            SMALL.replace("inputs: [v_add, v_pull]", "inputs: [v_add, v_pul]"),
            "v_pul]",
            "nodes.net.inputs[1]",
            "unknown node 'v_pul'",
            id="unknown-node",
        ),
        pytest.param(
            SMALL.replace("inputs: [v_add, v_pull]", "inputs: [v_add, fast]"),
            "fast: {",
            "nodes.fast.inputs[0]",
            "cycle: net -> fast -> net",
            id="cycle",
        ),
        pytest.param(
            SMALL.replace(
                "outputs: [fast, above]",
                "  twice: {op: band, inputs: [above], side: below, far: 2}\noutputs: [fast, twice]",
            ),
            "twice: {",
            "nodes.twice.inputs[0]",
            "band needs a grid (per-tick) input; 'above' is a series (per bin)",
            id="kind",
        ),
        pytest.param(
            SMALL.replace("window: 5", "window: 0"),
            "window: 0",
            "nodes.fast.window",
            "Input should be greater than or equal to 1",
            id="zero-window",
        ),
        pytest.param(
            SMALL.replace("window: 5", "window: 5, min_periods: 6"),
            "min_periods",
            "nodes.fast.min_periods",
            "min_periods (6) exceeds the window (5)",
            id="min-periods-beyond-window",
        ),
        pytest.param(
            SMALL.replace("window: 5", "window: '5'"),
            "window: '5'",
            "nodes.fast.window",
            "Input should be a valid integer (got '5')",
            id="string-for-number",
        ),
        pytest.param(
            SMALL.replace("op: sub", "op: subtract"),
            "subtract",
            "nodes.net.op",
            "unknown op 'subtract'; one of: source, add, sub, mul, div, abs, linear, clip, tanh, "
            "state, rolling_sum, rolling_mean, ema, diff, zscore, robust_zscore, band, "
            "neighbourhood",
            id="unknown-op",
        ),
        pytest.param(
            SMALL.replace("field: add_mass_v", "field: add_mass_vel"),
            "add_mass_vel",
            "nodes.v_add.field",
            "unknown silver field 'add_mass_vel'; did you mean 'add_mass_v'?",
            id="unknown-silver-field",
        ),
        pytest.param(
            SMALL.replace("outputs:", "  spare: {op: abs, inputs: [net]}\noutputs:"),
            "spare",
            "nodes.spare",
            "node 'spare' is not used by any output",
            id="unused-node",
        ),
        pytest.param(
            SMALL.replace("outputs: [fast, above]", "outputs: [fast, above, fast]"),
            "outputs:",
            "outputs[2]",
            "output 'fast' is listed twice",
            id="output-twice",
        ),
        pytest.param(
            SMALL.replace("far: 4}", "far: 4, weight: exponential}"),
            "above: {",
            "nodes.above",
            "decay_ticks is given with weight: exponential, and only then",
            id="exponential-without-decay",
        ),
        pytest.param(
            SMALL.replace("inputs: [v_add, v_pull]}", "inputs: [v_add]}"),
            "net: {",
            "nodes.net.inputs",
            "Tuple should have at least 2 items after validation, not 1",
            id="arity",
        ),
    ],
)
def test_invalid_specs_are_rejected_at_the_node_path_and_line(
    tmp_path: Path, text: str, marker: str, field: str, message: str
) -> None:
    assert _single_issue(tmp_path, text) == (field, _line_of(text, marker), message)


def test_linear_weights_must_match_inputs_and_normalise_to_a_positive_sum(tmp_path: Path) -> None:
    base = SMALL.replace(
        "net: {op: sub, inputs: [v_add, v_pull]}",
        "net: {op: linear, inputs: [v_add, v_pull], weights: [1.0, -1.0]}",
    )
    assert load_gold_spec(_write(tmp_path, base)).nodes["net"].op == "linear"
    field, _, message = _single_issue(tmp_path, base.replace("[1.0, -1.0]", "[1.0]"))
    assert (field, message) == ("nodes.net", "1 weights for 2 inputs; give one per input")
    normalised = base.replace("-1.0]}", "-1.0], normalize: true}")
    field, _, message = _single_issue(tmp_path, normalised)
    assert (field, message) == ("nodes.net", "weights sum to 0.0; normalize needs a positive sum")


def test_yaml_tags_that_would_build_python_objects_are_refused(tmp_path: Path) -> None:
    text = SMALL.replace("field: add_mass_v", "field: !!python/object/apply:os.getcwd []")
    _, line, message = _single_issue(tmp_path, text)
    assert line == _line_of(text, "python/object")
    assert "could not determine a constructor" in message


def test_json_and_yaml_of_the_same_graph_are_the_same_spec(tmp_path: Path) -> None:
    yaml_spec = load_gold_spec(_write(tmp_path, SMALL))
    as_json = json.dumps(yaml.safe_load(SMALL), indent=1)
    json_spec = load_gold_spec(_write(tmp_path, as_json, "spec.json"))
    assert json_spec == yaml_spec
    assert spec_hash(json_spec) == spec_hash(yaml_spec)


def test_the_hash_is_of_content_not_layout_and_changes_with_any_effective_value(
    tmp_path: Path,
) -> None:
    spec = load_gold_spec(_write(tmp_path, SMALL))
    # Pinned: the canonical form of a spec is an identity that serving versions refer to.
    assert canonical_json(spec) == (
        '{"nodes":{"above":{"decay_ticks":null,"far":4,"inputs":["fast"],"near":1,"op":"band",'
        '"reduce":"mean","side":"above","weight":"none"},'
        '"fast":{"inputs":["net"],"min_periods":1,"op":"rolling_mean","window":5},'
        '"net":{"inputs":["v_add","v_pull"],"op":"sub"},'
        '"v_add":{"field":"add_mass_v","op":"source"},'
        '"v_pull":{"field":"pull_mass_v","op":"source"}},'
        '"outputs":["fast","above"],"version":1}'
    )
    assert spec_hash(spec) == "f1adb4f102d71ad6e6e30f6ff90f014599fddcf808073bed7383ac48bbfda094"

    reordered = "\n".join(
        [*SMALL.splitlines()[:2], *reversed(SMALL.splitlines()[2:7]), *SMALL.splitlines()[7:]]
    )
    block_style = SMALL.replace(
        "fast: {op: rolling_mean, inputs: [net], window: 5}",
        "fast:\n    op: rolling_mean\n    inputs:\n      - net\n    window: 5  # five bins",
    )
    defaults_spelled_out = SMALL.replace("window: 5}", "window: 5, min_periods: 1}")
    for same in (reordered, block_style, defaults_spelled_out):
        assert spec_hash(load_gold_spec(_write(tmp_path, same))) == spec_hash(spec)

    changed = (
        SMALL.replace("window: 5", "window: 6"),
        SMALL.replace("far: 4", "far: 4, weight: inverse"),
        SMALL.replace("outputs: [fast, above]", "outputs: [above, fast]"),  # output order
        SMALL.replace("fast", "quick"),  # names are part of the spec's outputs
    )
    hashes = {spec_hash(load_gold_spec(_write(tmp_path, text))) for text in changed}
    assert len(hashes) == len(changed)
    assert spec_hash(spec) not in hashes


def test_a_spec_is_immutable_and_validated_also_from_python_data() -> None:
    data = yaml.safe_load(SMALL)
    spec = GoldSpec.model_validate(data)
    with pytest.raises(ValidationError):
        spec.outputs = ("above",)
    data["nodes"]["net"]["inputs"] = ["v_add", "nowhere"]
    with pytest.raises(ValidationError, match=r"nodes\.net\.inputs\[1\]: unknown node 'nowhere'"):
        GoldSpec.model_validate(data)


def test_every_op_has_a_model_and_an_opcode() -> None:
    assert set(OP_MODELS) == set(OPS) == set(OPCODES)
