"""Gold: every DSL operator against a slow reference, the VP spec against the hand-written VP,
batch against incremental, causality, spatial symmetry, preview statistics and the CLI.

Comparisons are exact (``np.array_equal`` with NaNs equal). The kernel sums in a fixed order
(oldest to newest in time, ascending ticks in space), recomputes window statistics from stored
values instead of running totals, and uses the C library's ``tanh``/``exp`` (as ``math`` does),
so a reference that does the same arithmetic in the same order gets the same bits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.gold.graph import Kind
from engine.gold.preview import QUANTILES, preview_gold, read_silver_sample, window_mask
from engine.gold.runtime import GoldFrame, IncrementalGold, run_gold, silver_bins
from engine.gold.vp import vp_block
from engine.replay import replay_files
from engine.silver import SilverBuilder
from engine.silver_frame import SilverFrame
from qmachina.gold_cli import app as gold_app
from qmachina.specs.gold import GoldSpec, load_gold_spec
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import default_configs_root
from tests.es_grid import ES_GRID as ES

VP_DEFAULT = default_configs_root() / "gold" / "vp_default.yaml"
ES_FILE = "esh4-glbx-mdp3-20231225.mbo.dbn.zst"
ES_OPEN_NS = 1_703_545_200_000_000_000  # 2023-12-25 17:00 Chicago, the Globex open

EVERY_OP = """\
version: 1
nodes:
  add_v: {op: source, field: add_mass_v}
  pull_v: {op: source, field: pull_mass_v}
  rest: {op: source, field: rest_depth}
  total: {op: add, inputs: [add_v, pull_v, rest]}
  net: {op: sub, inputs: [add_v, pull_v]}
  product: {op: mul, inputs: [add_v, pull_v, rest]}
  ratio: {op: div, inputs: [net, pull_v]}
  padded_ratio: {op: div, inputs: [net, rest], epsilon: 0.5}
  size: {op: abs, inputs: [net]}
  blend: {op: linear, inputs: [add_v, pull_v, rest], weights: [2.0, -0.5, 0.1], bias: 0.25}
  share: {op: linear, inputs: [add_v, pull_v], weights: [1.0, 3.0], normalize: true}
  clipped: {op: clip, inputs: [net], lower: -0.5, upper: 0.75}
  floored: {op: clip, inputs: [net], lower: 0.0}
  squashed: {op: tanh, inputs: [net], scale: 2.0}
  regime: {op: state, inputs: [squashed], threshold: 0.2}
  summed: {op: rolling_sum, inputs: [ratio], window: 4, min_periods: 2}
  mean: {op: rolling_mean, inputs: [net], window: 3}
  smooth: {op: ema, inputs: [net], alpha: 0.3}
  change: {op: diff, inputs: [net], lag: 2}
  z: {op: zscore, inputs: [net], window: 6, min_periods: 3}
  robust_z: {op: robust_zscore, inputs: [net], window: 7, min_periods: 3, epsilon: 1.0e-6}
  strict_z: {op: robust_zscore, inputs: [rest], window: 4}
  around: {op: neighbourhood, inputs: [net], radius: 2}
  beside: {op: neighbourhood, inputs: [net], radius: 1, reduce: sum}
  above: {op: band, inputs: [net], side: above, far: 3, reduce: sum, weight: inverse}
  below:
    {op: band, inputs: [net], side: below, near: 2, far: 4, weight: exponential, decay_ticks: 2.0}
  both: {op: band, inputs: [net], side: both, far: 5}
  tilt: {op: sub, inputs: [above, below]}
  tilted: {op: mul, inputs: [net, tilt]}
  tilt_mean: {op: rolling_mean, inputs: [tilt], window: 4, min_periods: 2}
  tilt_z: {op: robust_zscore, inputs: [tilt], window: 5, min_periods: 2}
outputs: [total, product, ratio, padded_ratio, size, blend, share, clipped, floored, squashed,
          regime, summed, mean, smooth, change, z, robust_z, strict_z, around, beside, above,
          below, both, tilt, tilted, tilt_mean, tilt_z]
"""
EVERY_OP_FIELDS = ("add_mass_v", "pull_mass_v", "rest_depth")

runner = CliRunner()


def _spec(tmp_path: Path, text: str) -> GoldSpec:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return load_gold_spec(path)


# -- silver ------------------------------------------------------------------------------------


def _silver_table(
    spot_x2: np.ndarray, first_tick: np.ndarray, fields: dict[str, list[np.ndarray]]
) -> pa.Table:
    """Silver with the columns gold reads, one tick per price unit (tick size 1)."""
    has_spot = spot_x2 >= 0
    spread = np.where(spot_x2 % 2 == 1, 1, 2)
    bid = (spot_x2 - spread) // 2
    counts = np.array([len(values) for values in next(iter(fields.values()))])
    columns: dict[str, pa.Array] = {
        "bin_start_ns": pa.array(np.arange(len(spot_x2)) * 100_000_000),
        "book_valid": pa.array(has_spot),
        "best_bid": pa.array(bid, mask=~has_spot),
        "best_ask": pa.array(bid + spread, mask=~has_spot),
        "spot_x2_ticks": pa.array(spot_x2, mask=~has_spot),
        "window_first_tick": pa.array(first_tick),
        "window_ticks": pa.array(counts.astype(np.int32)),
    }
    for name, rows in fields.items():
        columns[name] = pa.array([row.tolist() for row in rows], type=pa.list_(pa.float64()))
    return pa.table(columns)


def _window(spot_x2: int, radius: int) -> tuple[int, int]:
    """First tick and width of the window ``|2t - spot_x2| <= 2 radius`` (silver's rule)."""
    if spot_x2 < 0:
        return 0, 0
    first = -((2 * radius - spot_x2) // 2)  # ceil((spot_x2 - 2 radius) / 2)
    return first, (spot_x2 + 2 * radius) // 2 - first + 1


def synthetic_silver(
    n_bins: int = 500, radius: int = 4, seed: int = 7, fields: tuple[str, ...] = EVERY_OP_FIELDS
) -> pa.Table:
    """Spot walks (mostly one-tick spreads, some two-tick), with bins without a book at the start
    and in the middle. Values have two decimals (ties, exact zeros) and a few NaNs."""
    rng = np.random.default_rng(seed)
    mid = 2 * (1000 + np.cumsum(rng.integers(-1, 2, n_bins)))
    spot = mid + np.where(rng.random(n_bins) < 0.8, 1, 2)
    spot[:3] = -1
    spot[n_bins // 2 : n_bins // 2 + 4] = -1
    windows = [_window(int(s), radius) for s in spot]
    values: dict[str, list[np.ndarray]] = {}
    for name in fields:
        rows = []
        for _, count in windows:
            row = np.round(rng.normal(size=count), 2)
            row[rng.random(count) < 0.2] = 0.0
            row[rng.random(count) < 0.02] = np.nan
            rows.append(row)
        values[name] = rows
    return _silver_table(spot, np.array([first for first, _ in windows]), values)


@pytest.fixture(scope="module")
def es_silver(sample_dir: Path) -> pa.Table:
    """Five minutes of real ES silver from the open: spot moves over ~30 ticks."""
    end = ES_OPEN_NS + 300 * 1_000_000_000
    builder = SilverBuilder(ES, session_start_ns=ES_OPEN_NS)
    batches = []
    for events in replay_files([sample_dir / ES_FILE], raw_symbol="ESH4", end_ns=end):
        batches += builder.feed(events)
    batches += builder.finish(until_ns=end)
    return pa.Table.from_batches(batches)


# -- a slow, obvious reference of every operator ------------------------------------------------

Value = np.ndarray  # grid [n_bins, n_ticks] or series [n_bins]


def _history_map(values: Value, step: Callable[[list[float]], list[float]]) -> Value:
    """Apply ``step`` to the defined values of each cell, in time order."""
    out = np.full_like(values, np.nan)
    cells = values.reshape(len(values), -1)
    result = out.reshape(len(values), -1)
    for column in range(cells.shape[1]):
        defined = np.flatnonzero(~np.isnan(cells[:, column]))
        result[defined, column] = step([float(v) for v in cells[defined, column]])
    return out


def _window_step(
    window: int, min_periods: int, statistic: Callable[[list[float], float], float]
) -> Callable[[list[float]], list[float]]:
    def step(history: list[float]) -> list[float]:
        out = []
        for i, x in enumerate(history):
            recent = history[max(0, i - window + 1) : i + 1]
            out.append(math.nan if len(recent) < min_periods else statistic(recent, x))
        return out

    return step


def _ordered_sum(values: list[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def _middle(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2.0


def _zscore(epsilon: float) -> Callable[[list[float], float], float]:
    def statistic(recent: list[float], x: float) -> float:
        mean = _ordered_sum(recent) / len(recent)
        squares = _ordered_sum([(v - mean) * (v - mean) for v in recent])
        denominator = math.sqrt(squares / len(recent)) + epsilon
        return math.nan if denominator == 0.0 else (x - mean) / denominator

    return statistic


def _robust_zscore(scale: float, epsilon: float) -> Callable[[list[float], float], float]:
    def statistic(recent: list[float], x: float) -> float:
        median = _middle(recent)
        denominator = scale * _middle([abs(v - median) for v in recent]) + epsilon
        return math.nan if denominator == 0.0 else (x - median) / denominator

    return statistic


def _ema(alpha: float) -> Callable[[list[float]], list[float]]:
    def step(history: list[float]) -> list[float]:
        out: list[float] = []
        for x in history:
            out.append(x if not out else out[-1] + alpha * (x - out[-1]))
        return out

    return step


def _diff(lag: int) -> Callable[[list[float]], list[float]]:
    def step(history: list[float]) -> list[float]:
        return [x - history[i - lag] if i >= lag else math.nan for i, x in enumerate(history)]

    return step


def _band(node: dict[str, Any], grid: Value, frame: SilverFrame) -> Value:
    out = np.full(frame.n_bins, np.nan)
    near, far = node["near"], node["far"]
    side, weighting = node["side"], node["weight"]
    for b in range(frame.n_bins):
        mid = frame.spot_x2[b] / 2
        if mid < 0:
            continue
        chosen = []
        for column in range(frame.n_ticks):
            tick = frame.first_tick + column
            distance = abs(tick - mid)
            rank = math.floor(distance + 0.5)  # 1 for the first tick off the mid on its side
            is_above = tick > mid
            if np.isnan(grid[b, column]) or distance == 0 or not near <= rank <= far:
                continue
            if side == "both" or (side == "above") == is_above:
                chosen.append((rank, is_above, distance, float(grid[b, column])))
        total = weights = 0.0
        for _, _, distance, x in sorted(chosen):  # from spot outwards, below first
            weight = 1.0
            if weighting == "inverse":
                weight = 1.0 / (1.0 + distance)
            elif weighting == "exponential":
                weight = math.exp(-distance / node["decay_ticks"])
            total += weight * x
            weights += weight
        if chosen:
            out[b] = total / weights if node["reduce"] == "mean" else total
    return out


def _neighbourhood(radius: int, mean: bool, grid: Value) -> Value:
    out = np.full_like(grid, np.nan)
    for b, column in zip(*np.nonzero(~np.isnan(grid)), strict=True):
        near = [
            float(v)
            for v in grid[b, max(0, column - radius) : column + radius + 1]
            if not np.isnan(v)
        ]
        out[b, column] = _ordered_sum(near) / len(near) if mean else _ordered_sum(near)
    return out


def _libm(function: Callable[[float], float], values: Value) -> Value:
    result: Value = np.frompyfunc(function, 1, 1)(values).astype(np.float64)
    return result


def reference_gold(spec: GoldSpec, frame: SilverFrame) -> dict[str, Value]:
    """Every output of ``spec`` computed the slow way from dense silver fields."""
    computed: dict[str, Value] = {}

    def value(name: str) -> Value:
        if name not in computed:
            computed[name] = np.asarray(evaluate(spec.nodes[name].model_dump()))
        return computed[name]

    def evaluate(node: dict[str, Any]) -> Any:
        op = node["op"]
        inputs = [value(name) for name in node.get("inputs", ())]
        # A series takes part in elementwise arithmetic with a grid as a column.
        grid = any(x.ndim == 2 for x in inputs)
        xs = [x[:, None] if grid and x.ndim == 1 else x for x in inputs]
        window = node.get("window", 0)
        min_periods = node.get("min_periods", 1)
        if op == "source":
            return frame.field(node["field"])
        if op == "add":
            return sum(xs[1:], start=xs[0])
        if op == "sub":
            return xs[0] - xs[1]
        if op == "mul":
            return math.prod(xs[1:], start=xs[0])
        if op == "div":
            denominator = xs[1] + node["epsilon"]
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(denominator == 0.0, np.nan, xs[0] / denominator)
        if op == "abs":
            return np.abs(xs[0])
        if op == "linear":
            weights = list(node["weights"])
            if node["normalize"]:
                weights = [w / sum(weights) for w in weights]
            total = weights[0] * xs[0]
            for w, x in zip(weights[1:], xs[1:], strict=True):
                total = total + w * x
            return total + node["bias"]
        if op == "clip":
            lower = -math.inf if node["lower"] is None else node["lower"]
            upper = math.inf if node["upper"] is None else node["upper"]
            return np.where(xs[0] < lower, lower, np.where(xs[0] > upper, upper, xs[0]))
        if op == "tanh":
            return _libm(math.tanh, xs[0] / node["scale"])
        if op == "state":
            threshold = node["threshold"]
            state = np.where(xs[0] > threshold, 1.0, np.where(xs[0] < -threshold, -1.0, 0.0))
            return np.where(np.isnan(xs[0]), np.nan, state)
        if op in ("rolling_sum", "rolling_mean"):
            mean = op == "rolling_mean"
            return _history_map(
                xs[0],
                _window_step(
                    window,
                    min_periods,
                    lambda r, _: _ordered_sum(r) / len(r) if mean else _ordered_sum(r),
                ),
            )
        if op == "ema":
            return _history_map(xs[0], _ema(node["alpha"]))
        if op == "diff":
            return _history_map(xs[0], _diff(node["lag"]))
        if op == "zscore":
            statistic = _zscore(node["epsilon"])
            return _history_map(xs[0], _window_step(window, min_periods, statistic))
        if op == "robust_zscore":
            statistic = _robust_zscore(node["scale"], node["epsilon"])
            return _history_map(xs[0], _window_step(window, min_periods, statistic))
        if op == "band":
            return _band(node, xs[0], frame)
        assert op == "neighbourhood"
        return _neighbourhood(node["radius"], node["reduce"] == "mean", xs[0])

    return {name: value(name) for name in spec.outputs}


# -- helpers -------------------------------------------------------------------------------------


def _assert_same(actual: dict[str, Value] | GoldFrame, expected: dict[str, Value]) -> None:
    outputs = actual.outputs if isinstance(actual, GoldFrame) else actual
    assert list(outputs) == list(expected)
    for name, values in expected.items():
        assert np.array_equal(outputs[name], values, equal_nan=True), name


def _pushed(spec: GoldSpec, table: pa.Table, frame: SilverFrame, margin: int) -> dict[str, Value]:
    """Push every bin through IncrementalGold and lay the outputs out as the batch does."""
    gold = IncrementalGold(spec.graph(), margin_ticks=margin)
    widths = set()
    outputs: dict[str, Value] = {}
    for b, silver in enumerate(silver_bins(table, gold.source_fields)):
        result = gold.push(silver)
        widths.add(gold.width)
        for name, row in result.grids.items():
            grid = outputs.setdefault(name, np.full((frame.n_bins, frame.n_ticks), np.nan))
            start = result.first_tick - frame.first_tick
            grid[b, start : start + len(row)] = row
        for name, number in result.series.items():
            outputs.setdefault(name, np.full(frame.n_bins, np.nan))[b] = number
    assert len(widths) > 2, "the tick range should have been re-based as spot moved"
    return {name: outputs[name] for name in spec.outputs}


def _case(which: str, tmp_path: Path, es_silver: pa.Table) -> tuple[GoldSpec, pa.Table, int]:
    """A spec, silver and tick size: every operator on synthetic silver, or VP on real silver."""
    if which == "every-op":
        return _spec(tmp_path, EVERY_OP), synthetic_silver(), 1
    return load_gold_spec(VP_DEFAULT), es_silver.slice(0, 1500), ES.tick_size


# -- tests ---------------------------------------------------------------------------------------


def test_every_operator_matches_a_slow_reference(tmp_path: Path) -> None:
    spec = _spec(tmp_path, EVERY_OP)
    frame = SilverFrame(synthetic_silver(), tick_size=1)
    gold = run_gold(spec.graph(), frame)
    expected = reference_gold(spec, frame)
    _assert_same(gold, expected)
    assert gold.kinds["tilt"] is Kind.SERIES
    assert gold.outputs["tilt"].shape == (frame.n_bins,)
    for name in ("ratio", "robust_z", "strict_z", "z"):  # zero denominators and warm-up
        assert np.isnan(gold.outputs[name][window_mask(frame)]).any(), name
    for name, values in gold.outputs.items():
        assert np.count_nonzero(values[~np.isnan(values)]) > 10, f"{name} is trivially zero"


def test_the_vp_spec_equals_the_hand_written_vp(es_silver: pa.Table) -> None:
    frame = SilverFrame(es_silver, ES.tick_size)
    gold = run_gold(load_gold_spec(VP_DEFAULT).graph(), frame)
    _assert_same(gold, vp_block(frame))
    # Non-trivial on this sample: spot moved, states were reached on both sides.
    assert len(np.unique(frame.spot_x2)) > 20
    assert {-1.0, 0.0, 1.0} <= set(np.unique(gold.outputs["flow_state"][window_mask(frame)]))
    assert np.nanstd(gold.outputs["vp_bias"]) > 0.01


@pytest.mark.parametrize("which", ["every-op", "vp"])
def test_pushing_bins_one_at_a_time_equals_the_batch(
    tmp_path: Path, es_silver: pa.Table, which: str
) -> None:
    spec, table, tick = _case(which, tmp_path, es_silver)
    frame = SilverFrame(table, tick)
    batch = run_gold(spec.graph(), frame)
    _assert_same(_pushed(spec, table, frame, margin=1), dict(batch.outputs))


def _plant_future(table: pa.Table, cut: int, seed: int) -> pa.Table:
    """``table`` with other per-tick values and another spot after bin ``cut``."""
    rng = np.random.default_rng(seed)
    columns = {}
    for name in table.column_names:
        column = table[name].combine_chunks()
        if pa.types.is_list(column.type):
            values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
            later = int(column.offsets[cut + 1].as_py())
            values[later:] = np.round(rng.normal(size=len(values) - later), 2)
            flat = pa.array(values).cast(column.type.value_type, safe=False)
            columns[name] = pa.ListArray.from_arrays(column.offsets, flat)
        elif name == "spot_x2_ticks":
            spot = column.fill_null(-1).to_numpy().copy()
            spot[cut + 1 :] += rng.integers(-2, 3, len(spot) - cut - 1)
            columns[name] = pa.array(spot, mask=column.is_null().to_numpy(zero_copy_only=False))
        else:
            columns[name] = column
    return pa.table(columns)


@pytest.mark.parametrize("which", ["every-op", "vp"])
def test_no_output_depends_on_a_later_bin(tmp_path: Path, es_silver: pa.Table, which: str) -> None:
    spec, table, tick = _case(which, tmp_path, es_silver)
    cut = table.num_rows // 3
    before = run_gold(spec.graph(), SilverFrame(table, tick))
    after = run_gold(spec.graph(), SilverFrame(_plant_future(table, cut, seed=5), tick))
    for name in spec.outputs:
        past_before, past_after = before.outputs[name][: cut + 1], after.outputs[name][: cut + 1]
        assert np.array_equal(past_before, past_after, equal_nan=True), name
        assert not np.array_equal(before.outputs[name], after.outputs[name], equal_nan=True), name


def test_a_missing_value_is_a_gap_in_the_cells_history(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        "version: 1\n"
        "nodes:\n"
        "  v: {op: source, field: add_mass_v}\n"
        "  mean: {op: rolling_mean, inputs: [v], window: 2, min_periods: 2}\n"
        "  step: {op: diff, inputs: [v]}\n"
        "  smooth: {op: ema, inputs: [v], alpha: 0.5}\n"
        "outputs: [mean, step, smooth]\n",
    )
    # Tick 10 is in the two-tick window, leaves it for two bins (spot moved up), is NaN once
    # inside it, then comes back: its history is 1, 2, 4, 8.
    nan = np.nan
    firsts = np.array([10, 10, 12, 12, 10, 10, 10])
    tick10 = [1.0, 2.0, 0.0, 0.0, nan, 4.0, 8.0]
    rows = [np.array([value, 0.0]) for value in tick10]
    table = _silver_table(2 * firsts + 1, firsts, {"add_mass_v": rows})
    gold = run_gold(spec.graph(), SilverFrame(table, tick_size=1))
    at10 = {name: gold.outputs[name][:, 10 - gold.first_tick] for name in spec.outputs}
    assert np.array_equal(at10["mean"], [nan, 1.5, nan, nan, nan, 3.0, 6.0], equal_nan=True)
    assert np.array_equal(at10["step"], [nan, 1.0, nan, nan, nan, 2.0, 4.0], equal_nan=True)
    assert np.array_equal(at10["smooth"], [1.0, 1.5, nan, nan, nan, 2.75, 5.375], equal_nan=True)


def test_a_cells_history_stays_at_its_price_when_spot_moves(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        "version: 1\n"
        "nodes:\n"
        "  price: {op: source, field: rest_depth}\n"
        "  mean: {op: rolling_mean, inputs: [price], window: 50}\n"
        "  change: {op: diff, inputs: [price]}\n"
        "outputs: [mean, change]\n",
    )
    walk = synthetic_silver(n_bins=300, fields=("rest_depth",))
    firsts = walk["window_first_tick"].to_numpy()
    counts = walk["window_ticks"].to_numpy()
    # Each cell holds its own price: a history that mixed prices would not be constant.
    prices = [
        np.arange(first, first + count, dtype=np.float64)
        for first, count in zip(firsts, counts, strict=True)
    ]
    table = _silver_table(
        walk["spot_x2_ticks"].fill_null(-1).to_numpy(), firsts, {"rest_depth": prices}
    )
    frame = SilverFrame(table, tick_size=1)
    inside = window_mask(frame)
    left_and_came_back = (np.diff(inside.astype(int), axis=0) == 1).any(axis=0)
    assert left_and_came_back.sum() > 5
    gold = run_gold(spec.graph(), frame)
    ticks = (frame.first_tick + np.arange(frame.n_ticks)).astype(np.float64)
    assert np.array_equal(gold.outputs["mean"], np.where(inside, ticks, np.nan), equal_nan=True)
    first_seen = inside & (np.cumsum(inside, axis=0) == 1)
    expected_change = np.where(inside & ~first_seen, 0.0, np.nan)
    assert np.array_equal(gold.outputs["change"], expected_change, equal_nan=True)


def test_bands_are_symmetric_around_spot_with_a_one_tick_spread(tmp_path: Path) -> None:
    decay = {"none": "", "inverse": "", "exponential": ", decay_ticks: 1.5"}
    bands = "\n".join(
        f"  {side}_{reduce}_{weight}: {{op: band, inputs: [v], side: {side}, near: 1, far: 4, "
        f"reduce: {reduce}, weight: {weight}{decay[weight]}}}"
        for side in ("above", "below")
        for reduce in ("sum", "mean")
        for weight in ("none", "inverse", "exponential")
    )
    names = [line.split(":")[0].strip() for line in bands.splitlines()]
    spec = _spec(
        tmp_path,
        f"version: 1\nnodes:\n  v: {{op: source, field: add_mass_v}}\n{bands}\n"
        f"outputs: [{', '.join(names)}]\n",
    )
    # Best bid 100, best ask 101 (spot_x2 201); the window is 95..106. Values mirror around the
    # mid: tick 101 + j holds what tick 100 - j holds; the ticks beyond rank 4 hold a spike.
    mirrored = np.array([2.0, 0.75, 3.0, -1.25, 50.0, 90.0])  # ranks 1, 2, ... from spot out
    row = np.concatenate([mirrored[::-1], mirrored])
    ranks1 = np.zeros(12)
    ranks1[5], ranks1[6] = 7.0, 7.0  # only the best bid and the best ask
    table = _silver_table(np.array([201, 201]), np.array([95, 95]), {"add_mass_v": [row, ranks1]})
    gold = run_gold(spec.graph(), SilverFrame(table, tick_size=1)).outputs
    for name in names:
        if name.startswith("above"):
            assert np.array_equal(gold[name], gold[name.replace("above", "below")]), name
    assert gold["above_sum_none"][0] == 4.5  # ranks 1..4 above: ticks 101..104
    assert gold["below_mean_none"][0] == 4.5 / 4
    assert gold["above_sum_none"][1] == gold["below_sum_none"][1] == 7.0
    assert gold["above_sum_inverse"][1] == 1.0 / (1.0 + 0.5) * 7.0  # the ask: half a tick off


def test_normalised_weights_blend_the_same_whatever_their_scale(tmp_path: Path) -> None:
    def rollup(weights: str, normalize: str) -> Value:
        spec = _spec(
            tmp_path,
            "version: 1\n"
            "nodes:\n"
            "  v: {op: source, field: add_mass_v}\n"
            "  fast: {op: rolling_mean, inputs: [v], window: 2}\n"
            "  mid: {op: rolling_mean, inputs: [v], window: 5}\n"
            "  slow: {op: rolling_mean, inputs: [v], window: 11}\n"
            f"  rollup: {{op: linear, inputs: [fast, mid, slow], weights: {weights}, "
            f"normalize: {normalize}}}\n"
            "outputs: [rollup]\n",
        )
        frame = SilverFrame(synthetic_silver(fields=("add_mass_v",)), tick_size=1)
        return run_gold(spec.graph(), frame).outputs["rollup"]

    normalised = rollup("[1, 1, 2]", "true")
    assert np.array_equal(normalised, rollup("[0.25, 0.25, 0.5]", "true"), equal_nan=True)
    assert np.array_equal(normalised, rollup("[0.25, 0.25, 0.5]", "false"), equal_nan=True)
    assert not np.array_equal(normalised, rollup("[1, 1, 2]", "false"), equal_nan=True)


def test_preview_statistics_are_those_numpy_gives(tmp_path: Path) -> None:
    spec = _spec(tmp_path, EVERY_OP)
    frame = SilverFrame(synthetic_silver(), tick_size=1)
    stats = preview_gold(spec.graph(), frame)
    gold = run_gold(spec.graph(), frame).outputs
    assert [item.name for item in stats] == list(spec.outputs)
    # Inside the silver windows, built here from the window columns directly.
    firsts = frame.table["window_first_tick"].to_numpy()
    counts = frame.table["window_ticks"].to_numpy()
    ticks = frame.first_tick + np.arange(frame.n_ticks)
    inside = (ticks >= firsts[:, None]) & (ticks < (firsts + counts)[:, None])
    for item in stats:
        values = gold[item.name]
        sample = values[inside] if values.ndim == 2 else values
        defined = sample[~np.isnan(sample)]
        assert item.kind is (Kind.GRID if values.ndim == 2 else Kind.SERIES)
        assert item.count == defined.size > 0
        assert item.nulls == np.isnan(sample).sum()
        assert item.mean == defined.mean()
        assert item.std == defined.std()
        assert [q for q, _ in item.quantiles] == list(QUANTILES)
        assert [v for _, v in item.quantiles] == list(np.quantile(defined, QUANTILES))
        assert item.fraction_zero == np.count_nonzero(defined == 0) / defined.size
    by_name = {item.name: item for item in stats}
    assert by_name["ratio"].nulls > 0  # zero denominators
    assert by_name["regime"].quantiles[0][1] == -1.0
    assert by_name["regime"].quantiles[-1][1] == 1.0


def _silver_file(tmp_path: Path, table: pa.Table, row_group_bins: int = 4096) -> Path:
    schema = table.schema.with_metadata(
        {
            "qmachina.schema_version": "qmachina.silver/1",
            "qmachina.grid_config": json.dumps({"tick_size": ES.tick_size}),
        }
    )
    path = tmp_path / "silver.parquet"
    pq.write_table(table.cast(schema), path, row_group_size=row_group_bins)
    return path


def test_cli_preview_prints_statistics_of_a_real_silver_sample(
    tmp_path: Path, es_silver: pa.Table
) -> None:
    silver = _silver_file(tmp_path, es_silver, row_group_bins=512)
    args = ["preview", "--silver", str(silver), "--start", "700", "--bins", "1000"]
    result = runner.invoke(gold_app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    spec = load_gold_spec(VP_DEFAULT)
    frame = SilverFrame(es_silver.slice(700, 1000), ES.tick_size)
    expected = [item.as_json() for item in preview_gold(spec.graph(), frame)]
    assert document["spec_hash"] == spec_hash(spec)
    assert (document["start"], document["bins"]) == (700, 1000)
    assert document["outputs"] == expected
    sample = read_silver_sample(silver, 1000, start=700)
    assert sample.table.equals(es_silver.slice(700, 1000).cast(sample.table.schema))

    table = runner.invoke(gold_app, args)
    assert table.exit_code == 0, table.output
    assert "bins 700 + 1,000" in table.stdout
    for item in expected:
        line = next(line for line in table.stdout.splitlines() if f" {item['name']} " in line)
        assert f"{item['count']:,}" in line
        assert f"{item['nulls']:,}" in line


def test_cli_preview_fails_naming_the_file_and_line(tmp_path: Path, es_silver: pa.Table) -> None:
    silver = _silver_file(tmp_path, es_silver.slice(0, 10))
    bad = tmp_path / "bad.yaml"
    bad.write_text(EVERY_OP.replace("window: 3}", "window: -3}"))
    result = runner.invoke(gold_app, ["preview", "--spec", str(bad), "--silver", str(silver)])
    assert result.exit_code == 2
    line = 1 + EVERY_OP.splitlines().index("  mean: {op: rolling_mean, inputs: [net], window: 3}")
    assert f"error: {bad}:{line}: nodes.mean.window: " in result.stderr

    result = runner.invoke(gold_app, ["preview", "--silver", str(silver), "--start", "10"])
    assert result.exit_code == 2
    assert f"error: {silver}: has 10 bins; cannot start at bin 10" in result.stderr

    not_silver = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), not_silver)
    result = runner.invoke(gold_app, ["preview", "--silver", str(not_silver)])
    assert result.exit_code == 2
    assert f"error: {not_silver}: schema version missing" in result.stderr
