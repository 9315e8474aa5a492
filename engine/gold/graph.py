"""The gold feature graph as the engine sees it: named nodes, each a grid or a series, acyclic.

A value is a GRID (one number per bin and absolute tick) or a SERIES (one number per bin). The
spec layer (``qmachina.specs.gold``) validates parameters and builds a :class:`GoldGraph`; this
module checks what makes a graph computable — every input names a node, there is no cycle, each
operator gets the kind of value it needs, every node feeds an output — and derives the evaluation
order and the kind of every node. Problems are reported with the path of the node that has them
(``nodes.composite.inputs[0]``), so the spec layer can point at the line in the file.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

ParamValue = float | int | str | bool | tuple[float, ...] | None
NodePath = tuple[str | int, ...]


class Kind(enum.StrEnum):
    """What a node's value is indexed by."""

    GRID = "grid"  # per bin and absolute tick: [n_bins, n_ticks]
    SERIES = "series"  # per bin: [n_bins]


# Operator families; each operator takes one input unless listed in ARITY.
ELEMENTWISE_OPS = ("add", "sub", "mul", "div", "abs", "linear", "clip", "tanh", "state")
TEMPORAL_OPS = ("rolling_sum", "rolling_mean", "ema", "diff", "zscore", "robust_zscore")
SPATIAL_OPS = ("band", "neighbourhood")
OPS = ("source", *ELEMENTWISE_OPS, *TEMPORAL_OPS, *SPATIAL_OPS)
ARITY: Mapping[str, tuple[int, int | None]] = {  # (least, most); None: no limit
    "source": (0, 0),
    "add": (2, None),
    "sub": (2, 2),
    "mul": (2, None),
    "div": (2, 2),
    "linear": (1, None),
}


def arity(op: str) -> tuple[int, int | None]:
    """How many inputs ``op`` takes: (least, most)."""
    return ARITY.get(op, (1, 1))


@dataclass(frozen=True)
class GoldNode:
    """One operator applied to named inputs, with its parameters (names as in the spec)."""

    op: str
    inputs: tuple[str, ...]
    params: Mapping[str, ParamValue]

    def param(self, name: str) -> ParamValue:
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"{self.op} node has no parameter {name!r}") from None


@dataclass(frozen=True)
class GoldGraph:
    """Nodes by name and the named outputs, in the order they are produced."""

    nodes: Mapping[str, GoldNode]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class GraphIssue:
    path: NodePath
    message: str

    def __str__(self) -> str:
        return f"{format_node_path(self.path)}: {self.message}"


class GoldGraphError(ValueError):
    """A graph that cannot be computed; ``issues`` locate every problem found."""

    def __init__(self, issues: Iterable[GraphIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


def format_node_path(path: Sequence[str | int]) -> str:
    """``("nodes", "x", "inputs", 0)`` → ``nodes.x.inputs[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(frozen=True)
class CheckedGraph:
    """A computable graph: nodes in evaluation order (inputs before users) and their kinds."""

    graph: GoldGraph
    order: tuple[str, ...]
    kinds: Mapping[str, Kind]


def check_graph(graph: GoldGraph) -> CheckedGraph:
    """The evaluation order and kinds of ``graph``; :class:`GoldGraphError` lists its problems."""
    issues = _reference_issues(graph)
    if not issues:
        issues = _cycle_issues(graph)
    if issues:
        raise GoldGraphError(issues)
    order = _evaluation_order(graph)
    used = set(order)
    issues = [
        GraphIssue(("nodes", name), f"node {name!r} is not used by any output")
        for name in graph.nodes
        if name not in used
    ]
    kinds, kind_issues = _infer_kinds(graph, order)
    issues += kind_issues
    if issues:
        raise GoldGraphError(issues)
    return CheckedGraph(graph=graph, order=order, kinds=kinds)


def _reference_issues(graph: GoldGraph) -> list[GraphIssue]:
    issues: list[GraphIssue] = []
    if not graph.outputs:
        issues.append(GraphIssue(("outputs",), "name at least one output"))
    seen: set[str] = set()
    for index, name in enumerate(graph.outputs):
        if name not in graph.nodes:
            issues.append(GraphIssue(("outputs", index), f"unknown node {name!r}"))
        elif name in seen:
            issues.append(GraphIssue(("outputs", index), f"output {name!r} is listed twice"))
        seen.add(name)
    for name, node in graph.nodes.items():
        if node.op not in OPS:
            issues.append(GraphIssue(("nodes", name, "op"), f"unknown op {node.op!r}"))
            continue
        least, most = arity(node.op)
        if len(node.inputs) < least or (most is not None and len(node.inputs) > most):
            wanted = str(least) if least == most else f"at least {least}"
            issues.append(
                GraphIssue(
                    ("nodes", name, "inputs"),
                    f"{node.op} takes {wanted} input(s), got {len(node.inputs)}",
                )
            )
        for index, source in enumerate(node.inputs):
            if source not in graph.nodes:
                issues.append(
                    GraphIssue(("nodes", name, "inputs", index), f"unknown node {source!r}")
                )
    return issues


def _cycle_issues(graph: GoldGraph) -> list[GraphIssue]:
    """One issue per cycle, at the input that closes it."""
    issues: list[GraphIssue] = []
    done: set[str] = set()
    reported: set[frozenset[str]] = set()

    def visit(name: str, stack: list[str]) -> None:
        stack.append(name)
        for index, source in enumerate(graph.nodes[name].inputs):
            if source in stack:
                cycle = stack[stack.index(source) :]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    loop = " -> ".join([*cycle, source])
                    issues.append(GraphIssue(("nodes", name, "inputs", index), f"cycle: {loop}"))
            elif source not in done:
                visit(source, stack)
        stack.pop()
        done.add(name)

    for name in graph.nodes:
        if name not in done:
            visit(name, [])
    return issues


def _evaluation_order(graph: GoldGraph) -> tuple[str, ...]:
    """Depth-first post-order from the outputs in their order: deterministic for a given spec."""
    order: list[str] = []
    placed: set[str] = set()

    def place(name: str) -> None:
        if name in placed:
            return
        placed.add(name)
        for source in graph.nodes[name].inputs:
            place(source)
        order.append(name)

    for output in graph.outputs:
        place(output)
    return tuple(order)


def _infer_kinds(
    graph: GoldGraph, order: Sequence[str]
) -> tuple[dict[str, Kind], list[GraphIssue]]:
    kinds: dict[str, Kind] = {}
    issues: list[GraphIssue] = []
    for name in order:
        node = graph.nodes[name]
        if node.op == "source":
            kinds[name] = Kind.GRID
        elif node.op in ELEMENTWISE_OPS:
            # A series broadcasts over the ticks of a grid.
            grid = any(kinds[source] is Kind.GRID for source in node.inputs)
            kinds[name] = Kind.GRID if grid else Kind.SERIES
        elif node.op in TEMPORAL_OPS:
            kinds[name] = kinds[node.inputs[0]]
        else:
            source = node.inputs[0]
            if kinds[source] is not Kind.GRID:
                issues.append(
                    GraphIssue(
                        ("nodes", name, "inputs", 0),
                        f"{node.op} needs a grid (per-tick) input; {source!r} is a series "
                        "(per bin)",
                    )
                )
            kinds[name] = Kind.SERIES if node.op == "band" else Kind.GRID
    return kinds, issues
