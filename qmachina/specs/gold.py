"""Gold specs (``configs/gold/*.yaml``): feature graphs in the gold DSL, v1.

A spec is data, never code::

    version: 1
    nodes:
      v_add: {op: source, field: add_mass_v}
      fast: {op: rolling_mean, inputs: [v_add], window: 5}
    outputs: [fast]

Each node is one operator from a fixed set, with its parameters; ``inputs`` name other nodes.
A value is a grid (per bin and absolute tick) or a series (per bin). Operators:

* ``source`` (grid): a per-tick silver field.
* elementwise, a series broadcasting over a grid: ``add``, ``sub``, ``mul``, ``div``
  (``epsilon`` added to the denominator; a zero denominator gives NaN), ``abs``, ``linear``
  (``sum(weights * inputs) + bias``, weights optionally normalised to sum to 1), ``clip``,
  ``tanh`` (``tanh(x / scale)``), ``state`` (+1 above ``threshold``, -1 below ``-threshold``,
  else 0).
* temporal, per cell of an absolute tick, causal (the current bin and earlier ones only):
  ``rolling_sum``, ``rolling_mean``, ``ema``, ``diff``, ``zscore`` (rolling mean / population
  std), ``robust_zscore`` (rolling median / MAD); a zero z-score denominator gives NaN. A NaN
  input is a missing observation: the output is NaN and the cell's history does not advance, so
  windows count defined values (``min_periods`` of them before a value is given).
* spatial: ``band`` (grid → series: sum or mean over the ticks ranked ``near..far`` above, below
  or on both sides of spot, optionally weighted by distance ``d`` from the mid: ``1/(1+d)`` or
  ``exp(-d/decay_ticks)``) and ``neighbourhood`` (grid → grid: sum or mean within ``radius``).

Any other operation is NaN where an input is NaN (grid cells outside a bin's silver window are).

Validation rejects unknown fields, ill-typed or out-of-range parameters, unknown node references,
cycles, kind errors (a spatial operator on a series) and nodes no output uses, each at the
node's path and line. A spec is immutable; its identity is ``spec_hash`` of its canonical
content (layout, comments and key order do not count; every effective value does); outputs are
produced in the order ``outputs`` lists them. Nothing in a spec is executed: the engine compiles
it to tables of fixed operators (``engine.gold.compiler``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal, Self, get_args

from pydantic import (
    BeforeValidator,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from engine.gold.graph import GoldGraph, GoldGraphError, GoldNode, check_graph
from engine.silver_frame import TICK_FIELDS
from qmachina.specs.errors import SpecError
from qmachina.specs.spec_model import SpecModel
from qmachina.specs.yaml_loader import YamlDocument, load_yaml_document, validation_issues

MAX_NODES = 256
MAX_WINDOW_BINS = 36_000  # an hour of 100 ms bins; state is one value per bin of window per cell

NodeName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
Number = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Window = Annotated[int, Field(ge=1, le=MAX_WINDOW_BINS)]
Ticks = Annotated[int, Field(ge=1, le=10_000)]


OneInput = Annotated[tuple[NodeName, ...], Field(strict=False, min_length=1, max_length=1)]
TwoInputs = Annotated[tuple[NodeName, ...], Field(strict=False, min_length=2, max_length=2)]
TwoOrMoreInputs = Annotated[
    tuple[NodeName, ...], Field(strict=False, min_length=2, max_length=MAX_NODES)
]
Weights = Annotated[tuple[Annotated[Number, Field(strict=True)], ...], Field(strict=False)]


class SourceOp(SpecModel):
    """A per-tick silver field (grid)."""

    op: Literal["source"]
    field: str

    @field_validator("field")
    @classmethod
    def _known_field(cls, name: str) -> str:
        if name not in TICK_FIELDS:
            close = difflib.get_close_matches(name, TICK_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(TICK_FIELDS)}"
            raise ValueError(f"unknown silver field {name!r}; {hint}")
        return name


class AddOp(SpecModel):
    op: Literal["add"]
    inputs: TwoOrMoreInputs


class SubOp(SpecModel):
    op: Literal["sub"]
    inputs: TwoInputs


class MulOp(SpecModel):
    op: Literal["mul"]
    inputs: TwoOrMoreInputs


class DivOp(SpecModel):
    """``inputs[0] / (inputs[1] + epsilon)``; NaN where the denominator is zero."""

    op: Literal["div"]
    inputs: TwoInputs
    epsilon: NonNegative = 0.0


class AbsOp(SpecModel):
    op: Literal["abs"]
    inputs: OneInput


class LinearOp(SpecModel):
    """``sum(weights[i] * inputs[i]) + bias``; with ``normalize`` the weights are divided by
    their sum first, so ``(1, 1, 2)`` and ``(0.25, 0.25, 0.5)`` are the same blend."""

    op: Literal["linear"]
    inputs: Annotated[tuple[NodeName, ...], Field(strict=False, min_length=1, max_length=MAX_NODES)]
    weights: Weights
    bias: Number = 0.0
    normalize: bool = False

    @model_validator(mode="after")
    def _weights_match_inputs(self) -> Self:
        if len(self.weights) != len(self.inputs):
            raise ValueError(
                f"{len(self.weights)} weights for {len(self.inputs)} inputs; give one per input"
            )
        if self.normalize and not sum(self.weights) > 0:
            raise ValueError(f"weights sum to {sum(self.weights)}; normalize needs a positive sum")
        return self


class ClipOp(SpecModel):
    op: Literal["clip"]
    inputs: OneInput
    lower: Number | None = None
    upper: Number | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.lower is None and self.upper is None:
            raise ValueError("give lower, upper or both")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) is above upper ({self.upper})")
        return self


class TanhOp(SpecModel):
    """``tanh(x / scale)``."""

    op: Literal["tanh"]
    inputs: OneInput
    scale: Positive = 1.0


class StateOp(SpecModel):
    """+1 (pressure) above ``threshold``, -1 (vacuum) below ``-threshold``, else 0 (neutral)."""

    op: Literal["state"]
    inputs: OneInput
    threshold: NonNegative


class _WindowOp(SpecModel):
    inputs: OneInput
    window: Window
    min_periods: Window = 1

    @field_validator("min_periods")
    @classmethod
    def _within_window(cls, min_periods: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and min_periods > window:
            raise ValueError(f"min_periods ({min_periods}) exceeds the window ({window})")
        return min_periods


class RollingSumOp(_WindowOp):
    op: Literal["rolling_sum"]


class RollingMeanOp(_WindowOp):
    op: Literal["rolling_mean"]


class ZscoreOp(_WindowOp):
    """``(x - mean) / (std + epsilon)`` over the window (population std)."""

    op: Literal["zscore"]
    epsilon: NonNegative = 0.0


class RobustZscoreOp(_WindowOp):
    """``(x - median) / (scale * MAD + epsilon)`` over the window."""

    op: Literal["robust_zscore"]
    scale: Positive = 1.4826
    epsilon: NonNegative = 0.0


class EmaOp(SpecModel):
    """``s += alpha * (x - s)``, started at the first value."""

    op: Literal["ema"]
    inputs: OneInput
    alpha: Annotated[float, Field(gt=0, le=1)]


class DiffOp(SpecModel):
    """``x - x_lag``: the value ``lag`` observations earlier."""

    op: Literal["diff"]
    inputs: OneInput
    lag: Window = 1


class BandOp(SpecModel):
    """Grid → series over the ticks ranked ``near..far`` from spot (rank 1 above spot is the
    first tick above the mid, the best ask at a one-tick spread; likewise below)."""

    op: Literal["band"]
    inputs: OneInput
    side: Literal["above", "below", "both"]
    near: Ticks = 1
    far: Ticks
    reduce: Literal["sum", "mean"] = "mean"
    weight: Literal["none", "inverse", "exponential"] = "none"
    decay_ticks: Positive | None = None

    @field_validator("far")
    @classmethod
    def _not_before_near(cls, far: int, info: ValidationInfo) -> int:
        near = info.data.get("near")
        if near is not None and far < near:
            raise ValueError(f"far ({far}) is nearer than near ({near})")
        return far

    @model_validator(mode="after")
    def _decay_with_exponential(self) -> Self:
        if (self.weight == "exponential") != (self.decay_ticks is not None):
            raise ValueError("decay_ticks is given with weight: exponential, and only then")
        return self


class NeighbourhoodOp(SpecModel):
    """Grid → grid: sum or mean of the defined cells within ``radius`` ticks of each cell."""

    op: Literal["neighbourhood"]
    inputs: OneInput
    radius: Ticks
    reduce: Literal["sum", "mean"] = "mean"


GoldOp = (
    SourceOp
    | AddOp
    | SubOp
    | MulOp
    | DivOp
    | AbsOp
    | LinearOp
    | ClipOp
    | TanhOp
    | StateOp
    | RollingSumOp
    | RollingMeanOp
    | EmaOp
    | DiffOp
    | ZscoreOp
    | RobustZscoreOp
    | BandOp
    | NeighbourhoodOp
)
OP_MODELS: dict[str, type[SpecModel]] = {
    get_args(model.model_fields["op"].annotation)[0]: model for model in get_args(GoldOp)
}


def _node_model(value: object) -> object:
    """Pick the node's model by ``op``, so errors are located at the node's own fields."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with an 'op' field, got {type(value).__name__}")
    if "op" not in value:
        raise ValueError(f"missing field 'op'; one of: {', '.join(OP_MODELS)}")
    op = value["op"]
    model = OP_MODELS.get(op) if isinstance(op, str) else None
    if model is None:
        raise _node_errors([("op", op, f"unknown op {op!r}; one of: {', '.join(OP_MODELS)}")])
    known = list(model.model_fields)
    unknown = [key for key in value if key not in known]
    if unknown:
        raise _node_errors(
            [(key, value[key], _unknown_field_message(op, key, known)) for key in unknown]
        )
    return model.model_validate(value)


def _unknown_field_message(op: str, key: object, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
    return f"unknown field {key!r} for op {op!r}; {hint}"


def _node_errors(problems: list[tuple[object, object, str]]) -> ValidationError:
    return ValidationError.from_exception_data(
        "GoldNode",
        [
            InitErrorDetails(
                type=PydanticCustomError("gold_node", "{message}", {"message": message}),
                loc=(str(key),),
                input=given,
            )
            for key, given, message in problems
        ],
    )


class GoldSpec(SpecModel):
    """A gold feature graph: named nodes and the outputs it produces, in order."""

    version: Literal[1]
    nodes: Annotated[
        dict[NodeName, Annotated[GoldOp, BeforeValidator(_node_model)]],
        Field(min_length=1, max_length=MAX_NODES),
    ]
    outputs: Annotated[tuple[NodeName, ...], Field(strict=False, min_length=1)]

    @model_validator(mode="after")
    def _computable(self) -> Self:
        check_graph(self.graph())  # GoldGraphError carries the path of every problem
        return self

    def graph(self) -> GoldGraph:
        """The spec as the engine's graph."""
        nodes = {
            name: GoldNode(
                op=node.op,
                inputs=tuple(getattr(node, "inputs", ())),
                params=node.model_dump(exclude={"op", "inputs"}),
            )
            for name, node in self.nodes.items()
        }
        return GoldGraph(nodes=nodes, outputs=self.outputs)


def validate_gold_document(document: YamlDocument) -> GoldSpec:
    """Validate a parsed document into a GoldSpec; every error cites its file and line."""
    try:
        return GoldSpec.model_validate(document.data)
    except ValidationError as exc:
        graph_errors = [
            error
            for detail in exc.errors()
            if isinstance(error := (detail.get("ctx") or {}).get("error"), GoldGraphError)
        ]
        if graph_errors:
            issues = [
                document.issue(issue.path, issue.message)
                for error in graph_errors
                for issue in error.issues
            ]
            raise SpecError(sorted(issues, key=lambda issue: issue.line or 0)) from None
        raise SpecError(validation_issues(exc, document, GoldSpec)) from None


def load_gold_spec(path: str | Path) -> GoldSpec:
    """Load and validate a gold spec file (YAML, or JSON, which YAML reads as well)."""
    return validate_gold_document(load_yaml_document(path))
