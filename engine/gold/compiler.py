"""Compile a checked gold graph into the flat tables the numba step runs (see ``ops``).

Nothing of the spec is executed: each node becomes a row of integer codes and a few float
parameters that select one of the kernel's fixed operators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from engine.gold import ops
from engine.gold.graph import (
    TEMPORAL_OPS,
    CheckedGraph,
    GoldGraph,
    GoldGraphError,
    GoldNode,
    GraphIssue,
    Kind,
    check_graph,
)
from engine.silver_frame import TICK_FIELDS

OPCODES: Mapping[str, int] = {
    "source": ops.OP_SOURCE,
    "add": ops.OP_ADD,
    "sub": ops.OP_SUB,
    "mul": ops.OP_MUL,
    "div": ops.OP_DIV,
    "abs": ops.OP_ABS,
    "linear": ops.OP_LINEAR,
    "clip": ops.OP_CLIP,
    "tanh": ops.OP_TANH,
    "state": ops.OP_STATE,
    "rolling_sum": ops.OP_ROLLING_SUM,
    "rolling_mean": ops.OP_ROLLING_MEAN,
    "ema": ops.OP_EMA,
    "diff": ops.OP_DIFF,
    "zscore": ops.OP_ZSCORE,
    "robust_zscore": ops.OP_ROBUST_ZSCORE,
    "band": ops.OP_BAND,
    "neighbourhood": ops.OP_NEIGHBOURHOOD,
}
SIDES = {"below": ops.SIDE_BELOW, "both": ops.SIDE_BOTH, "above": ops.SIDE_ABOVE}
REDUCTIONS = {"sum": ops.REDUCE_SUM, "mean": ops.REDUCE_MEAN}
WEIGHTINGS = {
    "none": ops.WEIGHT_NONE,
    "inverse": ops.WEIGHT_INVERSE,
    "exponential": ops.WEIGHT_EXPONENTIAL,
}


@dataclass(frozen=True)
class GoldProgram:
    """A graph ready to run: node table, inputs, parameters and the sizes of its buffers."""

    checked: CheckedGraph
    nodes: np.ndarray  # int64 [n_nodes, ops.NODE_COLUMNS], evaluation order
    node_inputs: np.ndarray  # int64, node indices
    fparams: np.ndarray  # float64
    output_nodes: np.ndarray  # int64 node indices, in output order
    source_fields: tuple[str, ...]  # silver field of each source index
    n_grid_rows: int
    n_series: int
    cell_state_size: int
    series_state_size: int

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.checked.graph.outputs

    @property
    def output_kinds(self) -> dict[str, Kind]:
        return {name: self.checked.kinds[name] for name in self.outputs}


def compile_graph(graph: GoldGraph) -> GoldProgram:
    """Check ``graph`` and lay it out for the kernel; :class:`GoldGraphError` if it cannot run."""
    checked = check_graph(graph)
    index = {name: k for k, name in enumerate(checked.order)}
    table = np.zeros((len(checked.order), ops.NODE_COLUMNS), dtype=np.int64)
    node_inputs: list[int] = []
    fparams: list[float] = []
    source_fields: list[str] = []
    n_grid_rows = n_series = cell_state = series_state = 0
    for k, name in enumerate(checked.order):
        node = graph.nodes[name]
        row = table[k]
        row[ops.N_OP] = OPCODES[node.op]
        if checked.kinds[name] is Kind.GRID:
            row[ops.N_GRID] = 1
            row[ops.N_SLOT] = n_grid_rows
            n_grid_rows += 1
        else:
            row[ops.N_SLOT] = n_series
            n_series += 1
        row[ops.N_IN_START] = len(node_inputs)
        row[ops.N_IN_COUNT] = len(node.inputs)
        node_inputs.extend(index[source] for source in node.inputs)
        row[ops.N_FPARAM] = len(fparams)
        if node.op == "source":
            field = _text(node, "field")
            if field not in TICK_FIELDS:
                raise GoldGraphError(
                    [GraphIssue(("nodes", name, "field"), f"unknown silver field {field!r}")]
                )
            if field not in source_fields:
                source_fields.append(field)
            row[ops.N_I0] = source_fields.index(field)
        fparams.extend(_encode(node, row))
        if node.op in TEMPORAL_OPS:
            size = ops.state_size(int(row[ops.N_OP]), int(row[ops.N_I0]))
            if row[ops.N_GRID]:
                row[ops.N_STATE] = cell_state
                cell_state += size
            else:
                row[ops.N_STATE] = series_state
                series_state += size
    return GoldProgram(
        checked=checked,
        nodes=table,
        node_inputs=np.array(node_inputs, dtype=np.int64),
        fparams=np.array(fparams, dtype=np.float64),
        output_nodes=np.array([index[name] for name in graph.outputs], dtype=np.int64),
        source_fields=tuple(source_fields),
        n_grid_rows=n_grid_rows,
        n_series=n_series,
        cell_state_size=cell_state,
        series_state_size=series_state,
    )


def _encode(node: GoldNode, row: np.ndarray) -> list[float]:
    """Integer parameters into ``row``; returns the float parameters."""
    op = node.op
    if op == "div":
        return [_number(node, "epsilon")]
    if op == "linear":
        weights = _numbers(node, "weights")
        if node.param("normalize"):
            total = sum(weights)
            weights = tuple(weight / total for weight in weights)
        return [*weights, _number(node, "bias")]
    if op == "clip":
        lower, upper = node.param("lower"), node.param("upper")
        return [
            -math.inf if lower is None else _number(node, "lower"),
            math.inf if upper is None else _number(node, "upper"),
        ]
    if op == "tanh":
        return [_number(node, "scale")]
    if op == "state":
        return [_number(node, "threshold")]
    if op == "ema":
        return [_number(node, "alpha")]
    if op == "diff":
        row[ops.N_I0] = _count(node, "lag")
        return []
    if op in ("rolling_sum", "rolling_mean", "zscore", "robust_zscore"):
        row[ops.N_I0] = _count(node, "window")
        row[ops.N_I1] = _count(node, "min_periods")
        if op == "zscore":
            return [_number(node, "epsilon")]
        if op == "robust_zscore":
            return [_number(node, "scale"), _number(node, "epsilon")]
        return []
    if op == "band":
        row[ops.N_I0] = SIDES[_text(node, "side")]
        row[ops.N_I1] = _count(node, "near")
        row[ops.N_I2] = _count(node, "far")
        row[ops.N_I3] = REDUCTIONS[_text(node, "reduce")]
        row[ops.N_I4] = WEIGHTINGS[_text(node, "weight")]
        decay = node.param("decay_ticks")
        return [1.0 if decay is None else _number(node, "decay_ticks")]
    if op == "neighbourhood":
        row[ops.N_I0] = _count(node, "radius")
        row[ops.N_I3] = REDUCTIONS[_text(node, "reduce")]
    return []


# The spec layer validates parameters; these readers only narrow their types, and refuse values
# that would break a kernel (a zero window indexes a ring buffer modulo zero).
def _number(node: GoldNode, name: str) -> float:
    value = node.param(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{node.op} parameter {name!r} must be a number, got {value!r}")
    return float(value)


def _numbers(node: GoldNode, name: str) -> tuple[float, ...]:
    value = node.param(name)
    if not isinstance(value, tuple):
        raise TypeError(f"{node.op} parameter {name!r} must be a tuple of numbers")
    return tuple(float(item) for item in value)


def _count(node: GoldNode, name: str) -> int:
    value = node.param(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{node.op} parameter {name!r} must be a whole number >= 1, got {value!r}")
    return value


def _text(node: GoldNode, name: str) -> str:
    value = node.param(name)
    if not isinstance(value, str):
        raise TypeError(f"{node.op} parameter {name!r} must be text, got {value!r}")
    return value
