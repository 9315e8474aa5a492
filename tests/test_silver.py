"""The numba silver grid against the plain-Python reference (tests/reference_silver.py), on random
streams and on the real ES file, plus the behaviours the silver contract promises.

Float tolerance (masses and chains, float32 on the wire): the reference computes in float64 with
``math`` in its own operation order (e.g. ``exp(dt / (tau * 1e9))`` where the kernel multiplies by
a precomputed reciprocal), so the two float64 results may differ in the last bits before the final
rounding to float32. Every float is compared as ``|fast - ref| <= RTOL * |ref| + ATOL * scale``:
``RTOL = 1e-5`` covers the float32 rounding (6e-8) with a wide margin; ``scale`` is the magnitude
the value was computed from, so differences of large quantities that cancel (a velocity that is
~0 because mass barely changed, an acceleration of a velocity in steady state) are not held to a
relative precision float64 cannot give them. For a stage ``s`` value (mass s=0, v=1, a=2, j=3) of a
tick, ``scale = max over stages r < s of |value_r| / W_s**(s - r)`` (each stage is a difference
of the previous one divided by the bin width in seconds), and ``ATOL = 1e-9``, orders of magnitude
above float64's 2.2e-16 times the few roundings per stage and far below any real discrepancy.
Below float32's smallest normal number (``F32_TINY`` = 1.2e-38) the wire value only has absolute
precision (a decayed mass of 7e-54 is 0.0 in float32), so ``F32_TINY`` is added to the bound.
Integers, booleans, nulls and the float64 ``mid_price`` are compared exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import silver_kernel as sk
from engine.events import (
    ACTION_ADD,
    ACTION_CANCEL,
    ACTION_CLEAR,
    ACTION_FILL,
    ACTION_MODIFY,
    ACTION_NONE,
    ACTION_TRADE,
    EVENT_DTYPE,
    F_LAST,
    F_SNAPSHOT,
    SIDE_ASK,
    SIDE_BID,
    SIDE_NONE,
)
from engine.replay import replay_files
from engine.silver import TICK_COLUMNS, GridConfig, SilverBuilder
from tests.es_grid import ES_GRID as ES
from tests.reference_silver import (
    CHANNEL_NAMES,
    MASS_NAMES,
    STAGE_NAMES,
    Cell,
    ReferenceSilver,
    records_of,
)

TICK = 250_000_000
BASE_TICK = 4800 * 4  # ES 4800.00 in quarter-point ticks
W_SMALL = 1_000_000  # 1 ms bins for the random streams
RTOL = 1e-5
ATOL = 1e-9
F32_TINY = float(np.finfo(np.float32).tiny)

SMALL = GridConfig(
    tick_size=TICK,
    n_absolute_ticks=24,
    grid_radius_ticks=5,
    bin_width_ns=W_SMALL,
    bin_clock="ts_event",
    tau_rest_decay_s=0.004,
    tau_velocity_s=0.002,
    tau_acceleration_s=0.003,
    tau_jerk_s=0.005,
)
ES_FILE = "esh4-glbx-mdp3-20231225.mbo.dbn.zst"

Row = tuple[int, int, int, int, int, int, int, int, int, int, int]
Clock = Literal["ts_event", "ts_recv"]
CLOCKS: tuple[Clock, ...] = ("ts_event", "ts_recv")


def with_clock(config: GridConfig, clock: Clock) -> GridConfig:
    return dataclasses.replace(config, bin_clock=clock)


# -- running both implementations ------------------------------------------------------------


def as_events(rows: Sequence[Row]) -> np.ndarray:
    return np.array(list(rows), dtype=EVENT_DTYPE)


def fast_table(
    config: GridConfig,
    events: np.ndarray,
    *,
    bins_per_batch: int = 4096,
    cuts: Sequence[int] = (),
) -> pa.Table:
    """The whole silver of ``events``, fed as several batches cut at ``cuts``."""
    builder = SilverBuilder(config, bins_per_batch)
    batches: list[pa.RecordBatch] = []
    bounds = [0, *sorted(cuts), len(events)]
    for lo, hi in itertools.pairwise(bounds):
        batches.extend(builder.feed(events[lo:hi]))
    batches.extend(builder.finish())
    return pa.Table.from_batches(batches, schema=builder.schema)


def reference_bins(config: GridConfig, events: np.ndarray) -> list[dict[str, Any]]:
    ref = ReferenceSilver(config)
    ref.feed(records_of({name: events[name].tolist() for name in EVENT_DTYPE.names or ()}))
    ref.finish()
    return ref.take_bins()


# -- comparing ---------------------------------------------------------------------------------


def _stage(name: str) -> int:
    return 0 if name in MASS_NAMES else 1 + STAGE_NAMES.index(name.rsplit("_", 1)[1])


def _channel(name: str) -> str:
    return name if name in MASS_NAMES else name.rsplit("_", 1)[0]


def _flat(bins: list[dict[str, Any]], name: str) -> np.ndarray:
    return np.fromiter(
        itertools.chain.from_iterable(b[name] for b in bins),
        dtype=np.float64,
        count=sum(len(b[name]) for b in bins),
    )


def _scale(flat: Callable[[str], np.ndarray], name: str, config: GridConfig) -> np.ndarray:
    """The magnitude a stage value is computed from (see the module docstring)."""
    width_s = config.bin_width_ns / 1e9
    stage = _stage(name)
    channel = _channel(name)
    scale = np.zeros(len(flat(name)))
    for r in range(stage):
        if r == 0 and channel not in MASS_NAMES:
            continue  # depths are exact integers: no error to carry
        source = channel if r == 0 else f"{channel}_{STAGE_NAMES[r - 1]}"
        scale = np.maximum(scale, np.abs(flat(source)) / width_s ** (stage - r))
    return scale


def assert_silver_matches(
    table: pa.Table, bins: list[dict[str, Any]], config: GridConfig, where: str
) -> None:
    """Every column of ``table`` equals the reference bins (floats within the tolerance above;
    columns missing from the reference bins, i.e. a light reference run, are not compared)."""
    assert table.num_rows == len(bins), f"{where}: {table.num_rows} bins, reference {len(bins)}"
    if not bins:
        return
    bin_seq = table.column("bin_seq").to_pylist()
    flats: dict[str, np.ndarray] = {}

    def flat(name: str) -> np.ndarray:
        if name not in flats:
            flats[name] = _flat(bins, name)
        return flats[name]

    for field in table.schema:
        name = field.name
        if name not in bins[0]:
            continue
        column = table.column(name)
        if not pa.types.is_list(field.type):
            got = column.to_pylist()
            expected = [b[name] for b in bins]
            if got != expected:
                i = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
                raise AssertionError(
                    f"{where}: column {name} differs first at bin {bin_seq[i]}: "
                    f"fast {got[i]!r}, reference {expected[i]!r}"
                )
            continue
        lengths = pc.list_value_length(column).to_pylist()
        assert lengths == [len(b[name]) for b in bins], f"{where}: {name} list lengths differ"
        got_flat = pc.list_flatten(column).to_numpy().astype(np.float64)
        expected_flat = flat(name)
        assert len(got_flat) == len(expected_flat), f"{where}: {name} lengths differ"
        if pa.types.is_integer(field.type.value_type):
            bad = got_flat != expected_flat
        else:
            bad = np.abs(got_flat - expected_flat) > (
                RTOL * np.abs(expected_flat) + ATOL * _scale(flat, name, config) + F32_TINY
            )
        if bad.any():
            k = int(np.argmax(bad))
            offsets = np.cumsum([0, *[len(b[name]) for b in bins]])
            i = int(np.searchsorted(offsets, k, side="right") - 1)
            tick = bins[i]["window_first_tick"] + (k - int(offsets[i]))
            raise AssertionError(
                f"{where}: {name} differs at bin {bin_seq[i]} tick {tick}: fast {got_flat[k]!r}, "
                f"reference {expected_flat[k]!r} ({int(bad.sum())} values differ)"
            )


# -- random MBO streams ------------------------------------------------------------------------


class StreamWriter:
    """Builds a valid-looking MBO stream while tracking which orders rest where."""

    def __init__(self, draw: st.DrawFn, start_ns: int) -> None:
        self.draw = draw
        self.rows: list[Row] = []
        self.ts = start_ns
        self.live: dict[int, tuple[int, int, int]] = {}  # order_id -> (side code, tick, size)
        self.next_id = 1
        self.mid = BASE_TICK  # asks rest at >= mid, bids at < mid

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def emit(
        self, action: int, side: int, tick: int, size: int, order_id: int, flags: int = 0
    ) -> None:
        latency = self.draw(st.sampled_from([0, 0, 0, 1, 250, W_SMALL + 7, 3 * W_SMALL]))
        ts_event = max(0, self.ts - latency)
        price = tick * TICK
        seq = len(self.rows)
        self.rows.append((self.ts, ts_event, order_id, price, seq, 1, size, action, side, flags, 0))

    def end_group(self) -> None:
        """Set F_LAST on the last record written."""
        row = self.rows[-1]
        self.rows[-1] = (*row[:9], row[9] | F_LAST, row[10])

    def advance(self, kind: str) -> None:
        draw = self.draw
        if kind == "same":
            return
        if kind == "small":
            self.ts += draw(st.integers(1, W_SMALL // 3))
        elif kind == "bin":
            self.ts += draw(st.integers(W_SMALL // 2, 2 * W_SMALL))
        else:  # a gap of several empty bins
            self.ts += draw(st.integers(2, 6)) * W_SMALL + draw(st.integers(0, W_SMALL - 1))

    def add(self, side: int, tick: int, size: int, flags: int = 0) -> int:
        order_id = self.new_id()
        self.emit(ACTION_ADD, side, tick, size, order_id, flags)
        if size > 0:
            self.live[order_id] = (side, tick, size)
        return order_id

    def quote(self, flags: int = 0) -> None:
        """One add near the mid on a random side."""
        side = self.draw(st.sampled_from([SIDE_BID, SIDE_ASK]))
        depth = self.draw(st.sampled_from([0, 0, 1, 1, 2, 3, 4, 5, 14]))
        tick = self.mid - 1 - depth if side == SIDE_BID else self.mid + depth
        self.add(side, tick, self.draw(st.integers(1, 20)), flags)

    def cancel(self, order_id: int, size: int) -> None:
        side, tick, resting = self.live[order_id]
        self.emit(ACTION_CANCEL, side, tick, size, order_id)
        if size >= resting:
            del self.live[order_id]
        else:
            self.live[order_id] = (side, tick, resting - size)

    def modify(self, order_id: int, side: int, tick: int, size: int) -> None:
        self.emit(ACTION_MODIFY, side, tick, size, order_id)
        if size == 0:
            self.live.pop(order_id, None)
        else:
            self.live[order_id] = (side, tick, size)

    def best(self, side: int) -> int | None:
        """An order at the best price of ``side``, if any."""
        orders = [(tick, oid) for oid, (s, tick, _) in self.live.items() if s == side]
        if not orders:
            return None
        _, order_id = max(orders) if side == SIDE_BID else min(orders)
        return order_id

    def trade_group(self) -> list[tuple[int, int]]:
        """Trade + Fill(s) against the best of one side, with a Cancel or Modify of the filled
        order in this group, the next one, or never. Returns reductions left for later."""
        draw = self.draw
        side = draw(st.sampled_from([SIDE_BID, SIDE_ASK]))
        later: list[tuple[int, int]] = []
        for _ in range(draw(st.integers(1, 2))):
            order_id = self.best(side)
            if order_id is None:
                self.quote()
                return later
            _, tick, resting = self.live[order_id]
            qty = draw(st.integers(1, resting))
            aggressor = SIDE_ASK if side == SIDE_BID else SIDE_BID
            self.emit(ACTION_TRADE, aggressor, tick, qty, 0)
            self.emit(ACTION_FILL, side, tick, qty, order_id)
            follow = draw(
                st.sampled_from(["cancel", "cancel_more", "modify", "reprice", "later", "none"])
            )
            if follow == "cancel":
                self.cancel(order_id, qty)
            elif follow == "cancel_more":  # part fill, part pull (and maybe oversize)
                self.cancel(order_id, qty + draw(st.integers(1, 5)))
            elif follow == "modify":
                self.modify(order_id, side, tick, resting - qty)
            elif follow == "reprice":  # the whole old size leaves: fill up to the pending fill
                self.modify(order_id, side, tick + (1 if side == SIDE_ASK else -1), resting)
            elif follow == "later":
                later.append((order_id, qty))
        return later

    def shift(self) -> None:
        """Move the mid by several ticks: run over the resting orders, quote the new inside."""
        draw = self.draw
        delta = draw(st.sampled_from([-30, -8, -5, -3, -2, 2, 3, 5, 8, 30]))
        self.mid += delta
        for order_id, (side, tick, size) in sorted(self.live.items()):
            if (side == SIDE_ASK and tick < self.mid) or (side == SIDE_BID and tick >= self.mid):
                self.cancel(order_id, size)
                if draw(st.booleans()):
                    self.advance("small")
        self.add(SIDE_BID, self.mid - 1, draw(st.integers(1, 20)))
        self.add(SIDE_ASK, self.mid + draw(st.integers(0, 1)), draw(st.integers(1, 20)))

    def snapshot(self) -> None:
        """A snapshot block that replaces the book (optionally led by a Clear)."""
        draw = self.draw
        self.live.clear()
        if draw(st.booleans()):
            self.emit(ACTION_CLEAR, SIDE_NONE, 0, 0, 0, F_SNAPSHOT)
        self.add(SIDE_BID, self.mid - 1, draw(st.integers(1, 20)), F_SNAPSHOT)
        self.add(SIDE_ASK, self.mid, draw(st.integers(1, 20)), F_SNAPSHOT)
        for _ in range(draw(st.integers(0, 6))):
            self.quote(F_SNAPSHOT)
        if draw(st.integers(0, 3)) > 0:
            self.end_group()


@st.composite
def silver_streams(draw: st.DrawFn) -> list[Row]:
    """Random MBO streams: a snapshot block, then F_LAST groups of adds, cancels, modifies,
    trade/fill sequences, spot moves of several ticks, clears and odd records, with shared
    timestamps, groups spanning bin ends, gaps of empty bins and late ts_event."""
    w = StreamWriter(draw, draw(st.integers(10**9, 2 * 10**9)) * W_SMALL)
    w.ts += draw(st.integers(0, W_SMALL - 1))
    if draw(st.integers(0, 4)) > 0:
        w.snapshot()
    later: list[tuple[int, int]] = []
    for _ in range(draw(st.integers(1, 150))):
        w.advance(draw(st.sampled_from(["same", "same", "small", "small", "bin", "gap"])))
        kind = draw(
            st.sampled_from(
                ["add"] * 4
                + ["cancel"] * 2
                + ["modify"] * 2
                + ["trade"] * 3
                + ["shift"] * 2
                + ["clear", "odd", "snapshot"]
            )
        )
        n_before = len(w.rows)
        for order_id, qty in later:  # the cancel for a fill of the previous group
            if order_id in w.live:
                w.cancel(order_id, qty)
        later = []
        if kind == "add":
            for _ in range(draw(st.integers(1, 3))):
                w.quote()
                if draw(st.booleans()):
                    w.advance("small")
        elif kind == "cancel" and w.live:
            for order_id in draw(st.lists(st.sampled_from(sorted(w.live)), max_size=2)):
                if order_id in w.live:
                    resting = w.live[order_id][2]
                    w.cancel(order_id, draw(st.integers(1, resting + 3)))
        elif kind == "modify" and w.live:
            order_id = draw(st.sampled_from(sorted(w.live)))
            side, tick, size = w.live[order_id]
            change = draw(st.sampled_from(["smaller", "larger", "zero", "same", "price", "side"]))
            if change == "smaller" and size > 1:
                w.modify(order_id, side, tick, draw(st.integers(1, size - 1)))
            elif change == "larger":
                w.modify(order_id, side, tick, size + draw(st.integers(1, 10)))
            elif change == "zero":
                w.modify(order_id, side, tick, 0)
            elif change == "price":
                step = draw(st.sampled_from([-3, -1, 1, 3]))
                w.modify(order_id, side, tick + step, draw(st.integers(1, 20)))
            elif change == "side":
                other = SIDE_ASK if side == SIDE_BID else SIDE_BID
                w.modify(order_id, other, tick, size)
            else:
                w.modify(order_id, side, tick, size)
        elif kind == "modify":  # Modify of an unknown order is an Add
            w.modify(w.new_id(), SIDE_BID, w.mid - 1, draw(st.integers(1, 20)))
        elif kind == "trade":
            later = w.trade_group()
        elif kind == "shift":
            w.shift()
        elif kind == "clear":
            w.emit(ACTION_CLEAR, SIDE_NONE, 0, 0, 0)
            w.live.clear()
            w.quote()
        elif kind == "odd":
            odd = draw(
                st.sampled_from(["none", "bad_side", "duplicate_add", "fill_unknown", "far"])
            )
            if odd == "far":  # far outside the grid (and the book's level arrays must grow)
                w.add(SIDE_ASK, w.mid + 5000, 7)
            elif odd == "none":
                w.emit(ACTION_NONE, SIDE_NONE, 0, 0, 0)
            elif odd == "bad_side":
                w.emit(ACTION_ADD, SIDE_NONE, w.mid, 5, w.new_id())
            elif odd == "duplicate_add" and w.live:
                order_id = draw(st.sampled_from(sorted(w.live)))
                side, tick, size = w.live[order_id]
                w.emit(ACTION_ADD, side, tick, size + 1, order_id)
                w.live[order_id] = (side, tick, size + 1)
            else:
                w.emit(ACTION_FILL, SIDE_BID, w.mid, 3, 10**9)
        elif kind == "snapshot":
            w.snapshot()
            continue
        if len(w.rows) == n_before:
            w.quote()
        if draw(st.integers(0, 9)) > 0:  # now and then a group runs into the next one
            w.end_group()
    if not w.rows:
        w.quote()
    return w.rows


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    rows=silver_streams(),
    clock=st.sampled_from(CLOCKS),
    bins_per_batch=st.sampled_from([1, 3, 4096]),
    cut_fractions=st.lists(st.floats(0, 1), max_size=3),
)
def test_fast_silver_equals_reference_on_random_streams(
    rows: list[Row], clock: Clock, bins_per_batch: int, cut_fractions: list[float]
) -> None:
    config = with_clock(SMALL, clock)
    events = as_events(rows)
    cuts = [int(f * len(events)) for f in cut_fractions]
    table = fast_table(config, events, bins_per_batch=bins_per_batch, cuts=cuts)
    assert_silver_matches(table, reference_bins(config, events), config, "random stream")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(rows=silver_streams(), k=st.integers(0, 40), clock=st.sampled_from(CLOCKS))
def test_checkpoint_restore_on_random_streams(rows: list[Row], k: int, clock: Clock) -> None:
    config = with_clock(SMALL, clock)
    events = as_events(rows)
    with tempfile.TemporaryDirectory() as tmp:
        resumed = run_with_checkpoint(config, events, k, Path(tmp) / "silver.ckpt")
    assert resumed.equals(fast_table(config, events))


# -- checkpoints and determinism ---------------------------------------------------------------


def run_with_checkpoint(config: GridConfig, events: np.ndarray, k: int, path: Path) -> pa.Table:
    """Run to bin ``k`` with ``feed_until_bin``, checkpoint, restore into a new builder, run the
    rest: the concatenated output."""
    first = SilverBuilder(config)
    position, batches = first.feed_until_bin(events, k)
    assert first.bins_emitted <= k
    first.save_checkpoint(path)
    second = SilverBuilder.from_checkpoint(path, config)
    assert second.events_consumed == position
    batches.extend(second.feed(events[position:]))
    batches.extend(second.finish())
    return pa.Table.from_batches(batches, schema=second.schema)


# -- constructed streams -----------------------------------------------------------------------

T0 = 1_703_541_600 * 10**9  # a multiple of every bin width used here


def rec(
    t: int, action: int, side: int, tick: int, size: int, order_id: int, flags: int = F_LAST
) -> Row:
    """A record at ``t`` (both clocks), ``tick`` relative to BASE_TICK."""
    return (t, t, order_id, (BASE_TICK + tick) * TICK, 0, 1, size, action, side, flags, 0)


def opening(t: int, bid: int = -1, ask: int = 0) -> list[Row]:
    """A bid and an ask (size 10 each, ids 1 and 2): the grid anchors on the second record."""
    return [
        rec(t, ACTION_ADD, SIDE_BID, bid, 10, 1, 0),
        rec(t, ACTION_ADD, SIDE_ASK, ask, 10, 2),
    ]


def run_both(config: GridConfig, rows: list[Row]) -> list[dict[str, Any]]:
    """Fast silver as Python rows, after checking it equals the reference."""
    events = as_events(rows)
    table = fast_table(config, events)
    assert_silver_matches(table, reference_bins(config, events), config, "constructed stream")
    out: list[dict[str, Any]] = table.to_pylist()
    return out


def at(row: dict[str, Any], name: str, tick: int) -> Any:
    """Value of list column ``name`` at ``tick`` (relative to BASE_TICK)."""
    return row[name][BASE_TICK + tick - row["window_first_tick"]]


def decay(config: GridConfig) -> float:
    return math.exp(-config.bin_width_ns / 1e9 / config.tau_rest_decay_s)


def alpha(config: GridConfig, tau: float) -> float:
    return 1.0 - math.exp(-config.bin_width_ns / 1e9 / tau)


@pytest.mark.parametrize("one_group", [True, False])
def test_events_sharing_a_timestamp_all_count(one_group: bool) -> None:
    t = T0 + W_SMALL + 100
    first = rec(t, ACTION_ADD, SIDE_BID, -3, 4, 10, 0 if one_group else F_LAST)
    second = rec(t, ACTION_ADD, SIDE_BID, -3, 6, 11)
    both = run_both(SMALL, [*opening(T0), first, second])
    alone = run_both(SMALL, [*opening(T0), rec(t, ACTION_ADD, SIDE_BID, -3, 4, 10)])
    assert [row["event_count"] for row in both] == [2, 2]
    weight = math.exp(100 / (SMALL.tau_rest_decay_s * 1e9))
    mass = 10 * weight * decay(SMALL)
    width_s = SMALL.bin_width_ns / 1e9
    row = both[1]
    assert at(row, "add_mass", -3) == pytest.approx(mass, rel=1e-6)
    assert at(row, "add_mass_v", -3) == pytest.approx(
        alpha(SMALL, SMALL.tau_velocity_s) * mass / width_s, rel=1e-6
    )
    assert at(row, "bid_depth", -3) == 10
    assert at(row, "bid_depth_v", -3) == pytest.approx(
        alpha(SMALL, SMALL.tau_velocity_s) * 10 / width_s, rel=1e-6
    )
    # Against the stream with only the first add: everything scales by 10 / 4.
    for name in ("add_mass", "add_mass_v", "add_mass_a", "add_mass_j", "bid_depth_v"):
        assert at(row, name, -3) == pytest.approx(at(alone[1], name, -3) * 10 / 4, rel=1e-6)


FILL_CASES = {
    # name: (records in bin 1 against resting bid order 5 of size 8 at tick -2, fill, pull)
    "fill_then_cancel": ([("T", 3, 0), ("F", 3, 0), ("C", 3, F_LAST)], 3, 0),
    "cancel_without_fill": ([("C", 3, F_LAST)], 0, 3),
    "fill_in_earlier_group": ([("T", 3, 0), ("F", 3, F_LAST), ("C", 3, F_LAST)], 0, 3),
    "fill_then_larger_cancel": ([("T", 3, 0), ("F", 3, 0), ("C", 5, F_LAST)], 3, 2),
    "fill_then_modify_down": ([("T", 3, 0), ("F", 3, 0), ("M", 3, F_LAST)], 3, 0),
    "fill_then_larger_modify_down": ([("T", 3, 0), ("F", 3, 0), ("M", 5, F_LAST)], 3, 2),
    "fill_then_reprice": ([("T", 3, 0), ("F", 3, 0), ("P", 8, F_LAST)], 3, 5),
    "trade_and_fill_alone": ([("T", 3, 0), ("F", 3, F_LAST)], 0, 0),
}


@pytest.mark.parametrize("case", sorted(FILL_CASES))
def test_fill_classification(case: str) -> None:
    steps, fill, pull = FILL_CASES[case]
    t = T0 + W_SMALL + 10
    rows = [*opening(T0), rec(T0 + 5, ACTION_ADD, SIDE_BID, -2, 8, 5)]
    for kind, size, flags in steps:
        if kind == "T":
            rows.append(rec(t, ACTION_TRADE, SIDE_ASK, -2, size, 0, flags))
        elif kind == "F":
            rows.append(rec(t, ACTION_FILL, SIDE_BID, -2, size, 5, flags))
        elif kind == "C":
            rows.append(rec(t, ACTION_CANCEL, SIDE_BID, -2, size, 5, flags))
        elif kind == "M":  # size down by ``size``
            rows.append(rec(t, ACTION_MODIFY, SIDE_BID, -2, 8 - size, 5, flags))
        else:  # the whole order moves one tick down
            rows.append(rec(t, ACTION_MODIFY, SIDE_BID, -3, size, 5, flags))
    row = run_both(SMALL, rows)[1]
    weight = math.exp(10 / (SMALL.tau_rest_decay_s * 1e9)) * decay(SMALL)
    assert at(row, "fill_mass", -2) == pytest.approx(fill * weight, rel=1e-6, abs=0)
    assert at(row, "pull_mass", -2) == pytest.approx(pull * weight, rel=1e-6, abs=0)
    if case == "trade_and_fill_alone":
        # The same stream with a no-op (action None) record instead of the Trade and the Fill.
        quiet = run_both(SMALL, [*rows[:3], rec(t, ACTION_NONE, SIDE_NONE, 0, 0, 0)])[1]
        for name, _ in TICK_COLUMNS:
            assert row[name] == quiet[name], name
        assert at(row, "bid_depth", -2) == 8


RESTING_ORDER_CASES = {
    # The Fill arrives before the order rests (its Add comes later in the same group): it names
    # no resting order, so it is an anomaly and classifies nothing.
    "fill_before_the_add": ([("F", 5), ("A", 5), ("C", 5)], 0, 5),
    # Fill 10 against a resting 4: the Cancel of the 4 is fill and the order leaves the book with
    # its pending fill; the same id added again in the group is a new order, its Cancel a pull.
    "order_id_back_in_the_same_group": ([("A0", 4), ("F", 10), ("C", 4), ("A", 5), ("C", 5)], 4, 5),
}


@pytest.mark.parametrize("case", sorted(RESTING_ORDER_CASES))
def test_pending_fill_belongs_to_the_resting_order(case: str) -> None:
    """Fill records add pending fill quantity to the order resting under that id, for the F_LAST
    group; quantity that then leaves that order in the group is FILL (up to the pending amount).
    Records of order 7 at tick -2; all but ``A0`` (bin 0) form one group in bin 1."""
    steps, fill, pull = RESTING_ORDER_CASES[case]
    t = T0 + W_SMALL + 10
    rows = [*opening(T0)]
    actions = {"A": ACTION_ADD, "A0": ACTION_ADD, "F": ACTION_FILL, "C": ACTION_CANCEL}
    for kind, size in steps:
        when, flags = (T0 + 5, F_LAST) if kind == "A0" else (t, 0)
        rows.append(rec(when, actions[kind], SIDE_BID, -2, size, 7, flags))
    rows[-1] = rec(t, actions[steps[-1][0]], SIDE_BID, -2, steps[-1][1], 7)
    events = as_events(rows)
    reference = reference_bins(SMALL, events)
    weight = math.exp(10 / (SMALL.tau_rest_decay_s * 1e9)) * decay(SMALL)
    assert at(reference[1], "fill_mass", -2) == pytest.approx(fill * weight)
    assert at(reference[1], "pull_mass", -2) == pytest.approx(pull * weight)
    assert_silver_matches(fast_table(SMALL, events), reference, SMALL, case)


@pytest.mark.parametrize("spread", [1, 2])
def test_window_is_symmetric_around_spot(spread: int) -> None:
    rows = [
        rec(T0, ACTION_ADD, SIDE_BID, -1, 7, 1, 0),
        rec(T0, ACTION_ADD, SIDE_ASK, -1 + spread, 9, 2),
    ]
    (row,) = run_both(SMALL, rows)
    radius = SMALL.grid_radius_ticks
    bid, ask = BASE_TICK - 1, BASE_TICK - 1 + spread
    spot_x2 = bid + ask
    assert row["spot_x2_ticks"] == spot_x2
    assert row["spot"] == spot_x2 * TICK // 2
    assert row["mid_price"] == pytest.approx((bid + ask) * 0.125, abs=0)
    assert row["window_ticks"] == (2 * radius if spread == 1 else 2 * radius + 1)
    ticks = [row["window_first_tick"] + i for i in range(row["window_ticks"])]
    offsets = [2 * u - spot_x2 for u in ticks]
    assert offsets == [-x for x in reversed(offsets)]
    assert max(offsets) <= 2 * radius
    assert offsets[ticks.index(bid)] == -spread
    assert offsets[ticks.index(ask)] == spread
    assert row["bid_depth"][ticks.index(bid)] == 7
    assert row["ask_depth"][ticks.index(ask)] == 9
    if spread == 1:
        assert ticks.index(bid) == radius - 1
        assert ticks.index(ask) == radius
    else:
        assert offsets[radius] == 0  # the middle row is the spot tick
        assert (ticks.index(bid), ticks.index(ask)) == (radius - 1, radius + 1)
    assert sum(row["rest_depth"]) == 16


def test_gap_yields_empty_bins_with_passively_decaying_chains() -> None:
    config = dataclasses.replace(SMALL, tau_rest_decay_s=10.0)
    gap = 6
    t1 = T0 + W_SMALL + 10
    rows = [
        *opening(T0),
        rec(t1, ACTION_ADD, SIDE_BID, -2, 8, 5, 0),
        rec(t1, ACTION_ADD, SIDE_ASK, 2, 4, 6, 0),
        rec(t1, ACTION_CANCEL, SIDE_BID, -1, 3, 1),
        rec(t1 + (gap + 1) * W_SMALL, ACTION_ADD, SIDE_BID, -4, 1, 7),
    ]
    out = run_both(config, rows)
    assert [row["event_count"] for row in out] == [2, 3, *[0] * gap, 1]
    assert [row["bin_seq"] for row in out] == list(range(gap + 3))
    starts = [row["bin_start_ns"] for row in out]
    assert starts == [T0 + i * W_SMALL for i in range(gap + 3)]
    assert [row["bin_end_ns"] for row in out] == [s + W_SMALL for s in starts]
    quiet = out[1 : gap + 2]  # the bin with the flow, then the empty ones
    keep = 1.0 - alpha(config, config.tau_velocity_s)
    for before, after in itertools.pairwise(quiet):
        assert after["window_first_tick"] == before["window_first_tick"]
        assert after["rest_depth"] == before["rest_depth"]
        for name in CHANNEL_NAMES:
            v0 = np.array(before[f"{name}_v"])
            v1 = np.array(after[f"{name}_v"])
            assert (np.abs(v1) <= np.abs(v0)).all(), name
        for name in ("rest_depth", "bid_depth", "ask_depth"):  # no flow: v' = (1 - alpha) v
            np.testing.assert_allclose(
                after[f"{name}_v"], keep * np.array(before[f"{name}_v"]), rtol=1e-6
            )
        for name in MASS_NAMES:
            np.testing.assert_allclose(
                after[name], decay(config) * np.array(before[name]), rtol=1e-6
            )
    moved = [at(quiet[0], name, tick) for name, tick in [("add_mass_v", -2), ("pull_mass_v", -1)]]
    assert all(v > 0 for v in moved)
    assert abs(at(quiet[-1], "bid_depth_v", -2)) < abs(at(quiet[0], "bid_depth_v", -2))


# -- the real ES file --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def es_events(sample_dir: Path) -> np.ndarray:
    return np.concatenate(list(replay_files([sample_dir / ES_FILE])))


@pytest.fixture(scope="module")
def es_table(es_events: np.ndarray) -> pa.Table:
    return fast_table(ES, es_events)


def test_feed_promptly_yields_each_bin_with_the_slice_that_closed_it(
    es_events: np.ndarray, es_table: pa.Table
) -> None:
    builder = SilverBuilder(ES)
    slice_events = 5_000
    steps = list(builder.feed_promptly(es_events, slice_events))
    batches = [batch for step in steps for batch in step] + builder.finish()
    # The same bins as one feed of the whole batch.
    assert pa.Table.from_batches(batches, schema=builder.schema).equals(es_table)
    # A bin closes at the record after its events (index cum_event_id): each step holds the
    # bins closed by the records of one slice, in order, and no slice's bins wait for the next.
    closing_slices = [
        {int(c) // slice_events for b in step for c in b.column("cum_event_id").to_pylist()}
        for step in steps
    ]
    assert all(len(slices) == 1 for slices in closing_slices)
    order = [min(slices) for slices in closing_slices]
    assert order == sorted(set(order))
    assert len(steps) > 1
    with pytest.raises(ValueError, match="slice_events"):
        next(SilverBuilder(ES).feed_promptly(es_events, 0))


def test_es_silver_basic_facts(es_events: np.ndarray, es_table: pa.Table) -> None:
    table = es_table
    width = ES.bin_width_ns
    n = table.num_rows
    starts = np.asarray(table.column("bin_start_ns"))
    assert np.array_equal(np.asarray(table.column("bin_seq")), np.arange(n))
    assert (np.diff(starts) == width).all()
    assert np.array_equal(np.asarray(table.column("bin_end_ns")), starts + width)
    live = (es_events["flags"] & F_SNAPSHOT) == 0
    assert int(pc.sum(table.column("event_count")).as_py()) == int(live.sum())
    first_t = int(es_events["ts_event"][live][0])
    last_t = int(es_events["ts_event"][live].max())
    assert starts[0] == first_t - first_t % width
    assert starts[-1] == last_t - last_t % width
    assert table.column("cum_event_id")[-1].as_py() == len(es_events)
    windows = set(pc.unique(table.column("window_ticks")).to_pylist())
    assert windows <= {2 * ES.grid_radius_ticks, 2 * ES.grid_radius_ticks + 1}
    # Invalid bins are the crossed book of the pre-open, never an empty side.
    valid = np.asarray(table.column("book_valid"))
    bids = np.asarray(table.column("best_bid").fill_null(0))
    asks = np.asarray(table.column("best_ask").fill_null(0))
    assert table.column("best_bid").null_count == table.column("best_ask").null_count == 0
    assert (valid == (bids < asks)).all()
    assert valid[0]
    assert valid[-1]
    # The last bin reads the book at the end of the file: 4810.00 / 4810.25.
    assert table.column("best_bid")[-1].as_py() == 4810 * 10**9
    assert table.column("best_ask")[-1].as_py() == 4810_250_000_000


def load_fast_grid(builder: SilverBuilder) -> tuple[int, dict[int, Cell]]:
    """The fast builder's grid state (its documented ``grid`` rows) as reference cells."""
    grid = builder.grid
    base = int(builder.grid_meta[sk.G_BASE])
    n_channels = len(CHANNEL_NAMES)
    cells = {}
    for g in range(grid.shape[1]):
        cell = Cell(0, 0, 0)
        cell.flow = [float(grid[sk.ROW_FLOW + k, g]) for k in range(3)]
        cell.mass = [float(grid[sk.ROW_MASS + k, g]) for k in range(3)]
        cell.prev = [float(grid[sk.ROW_PREV + c, g]) for c in range(n_channels)]
        chain = sk.ROW_CHAIN
        cell.vel = [float(grid[chain + c, g]) for c in range(n_channels)]
        cell.acc = [float(grid[chain + n_channels + c, g]) for c in range(n_channels)]
        cell.jerk = [float(grid[chain + 2 * n_channels + c, g]) for c in range(n_channels)]
        cells[base + g] = cell
    return base, cells


ES_REANCHOR_BIN = 63_000  # the one bin of the file whose end re-anchors the grid


def test_es_fast_equals_reference(es_events: np.ndarray, es_table: pa.Table) -> None:
    """Pure Python is too slow for all 72k bins with every chain (~2 ms per bin for 256 ticks),
    so the reference runs the whole file in light mode (book, clock, anchor, bin-level fields and
    window depths: compared for every bin) and in full mode (every column compared) for the first
    bins and for three stretches: around the busiest bin, around the file's only re-anchor and
    the last bins of the file. For a stretch the reference takes the fast builder's grid state at
    its first bin; its own book and clock have run from the start."""
    first, stretch = 500, 800
    counts = np.asarray(es_table.column("event_count"))
    busy = int(np.argmax(counts)) - stretch // 3
    reanchor = ES_REANCHOR_BIN - stretch // 2
    last = es_table.num_rows - stretch
    assert first < busy < busy + stretch < reanchor < reanchor + stretch < last
    records = records_of({name: es_events[name].tolist() for name in EVENT_DTYPE.names or ()})
    ref = ReferenceSilver(ES)
    builder = SilverBuilder(ES)
    builder_position = 0
    index = 0
    compared = 0
    full_reanchors = 0

    def compare(what: str) -> None:
        nonlocal compared
        bins = ref.take_bins()
        if bins:
            where = f"{ES_FILE} {what} bins {bins[0]['bin_seq']}..{bins[-1]['bin_seq']}"
            assert_silver_matches(es_table.slice(compared, len(bins)), bins, ES, where)
            compared += len(bins)

    def run(until_bin: int, until_record: int, what: str) -> None:
        nonlocal index
        while ref.bin_seq < until_bin and index < until_record:
            ref.apply(records[index])
            index += 1
            if len(ref.bins) >= 2000:
                compare(what)
        compare(what)

    run(first, len(records), "full")
    ref.track_chains = False
    for start in (busy, reanchor, last):
        # The fast builder stops before the record that would close bin ``start``; the
        # reference gets there too: the records before it, then the bins it closes up to there.
        position, _ = builder.feed_until_bin(es_events[builder_position:], start)
        builder_position += position
        assert builder.bins_emitted == start
        run(start, builder_position, "light")
        ref.close_due_bins(records[builder_position], start)
        compare("light")
        assert (index, ref.bin_seq) == (builder_position, start)
        ref.load_grid_state(*load_fast_grid(builder))
        reanchors = ref.reanchors
        run(start + stretch, len(records), "full")
        full_reanchors += ref.reanchors - reanchors
        ref.track_chains = start == last
    ref.finish()
    compare("full")
    assert compared == es_table.num_rows
    assert ref.reanchors == full_reanchors == 1


def test_two_runs_are_identical(es_events: np.ndarray, es_table: pa.Table) -> None:
    """A second run, fed in other batches (cut inside and right after the snapshot block and
    in the busy part), gives the same table as ``es_table``, bit for bit."""
    again = fast_table(ES, es_events, cuts=[1, 8725, 8726, 30_000, 50_000])
    assert again.equals(es_table)
    assert again.schema.metadata == es_table.schema.metadata


def test_checkpoint_restore_equals_uninterrupted_run(
    es_events: np.ndarray, es_table: pa.Table, tmp_path: Path
) -> None:
    counts = np.asarray(es_table.column("event_count"))
    in_gap = next(k for k in range(5, len(counts)) if counts[k - 1] == 0 and counts[k] == 0)
    busy = int(np.argmax(counts))
    for k in (1, in_gap, busy):
        resumed = run_with_checkpoint(ES, es_events, k, tmp_path / f"at-{k}.ckpt")
        assert resumed.equals(es_table), f"checkpoint at bin {k}"


def test_restore_with_another_config_names_the_file(tmp_path: Path) -> None:
    events = as_events([*opening(T0), rec(T0 + 3 * W_SMALL, ACTION_ADD, SIDE_BID, -3, 1, 9)])
    builder = SilverBuilder(SMALL)
    builder.feed_until_bin(events, 1)
    path = tmp_path / "small.ckpt"
    builder.save_checkpoint(path)
    other = dataclasses.replace(SMALL, tau_jerk_s=1.0)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        SilverBuilder.from_checkpoint(path, other)
    assert SilverBuilder.from_checkpoint(path, SMALL).bins_emitted == 1
