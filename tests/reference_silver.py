"""A slow, obvious silver grid (dicts, lists and ``math``) that the numba silver kernel is proved
equal to.

It is written from the written specification of the silver stage, record by record, not from the
kernel: the book is :class:`tests.reference_book.ReferenceBook` (plus an index of the prices
resting at each tick); the depth changes ("mechanics") of a record are derived from the order as
it rests *before* the record is applied (an Add of an order that already rests is a Modify, as in
the book); pending fills are a dict ``order_id -> quantity`` of *resting* orders (a Fill of an
order that does not rest is ignored; an order that leaves the book takes its pending fill with
it), emptied at every F_LAST; grid state
is a dict keyed by *absolute* tick, so re-anchoring is just "keep the ticks that are still inside".
When the grid is not anchored or there is no spot yet, ``window_first_tick`` is reported as 0.

Output: one ``dict`` per closed bin whose keys are the silver column names (list columns as Python
lists, row ``i`` being tick ``window_first_tick + i``). Masses and chains stay float64 here; the
comparison with the float32 Arrow columns is the tests' business.

``track_chains=False`` is a light mode for long real files: the book, the bin clock, the anchor and
every bin-level field and window depth are still computed exactly, but masses and chains are not
(their keys are missing from the bins). :meth:`ReferenceSilver.load_grid_state` switches a light
run to full mode from grid state taken elsewhere (the tests take it from the fast builder).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.events import (
    ACTION_ADD,
    ACTION_CANCEL,
    ACTION_FILL,
    ACTION_MODIFY,
    F_LAST,
    F_SNAPSHOT,
    SIDE_ASK,
    SIDE_BID,
    UNDEF_PRICE,
)
from engine.silver import GridConfig
from tests.reference_book import ReferenceBook

ADD, PULL, FILL = 0, 1, 2
MASS_NAMES = ("add_mass", "pull_mass", "fill_mass")
DEPTH_NAMES = ("rest_depth", "bid_depth", "ask_depth")
CHANNEL_NAMES = MASS_NAMES + DEPTH_NAMES
STAGE_NAMES = ("v", "a", "j")
CHAIN_NAMES = tuple(f"{c}_{s}" for s in STAGE_NAMES for c in CHANNEL_NAMES)


@dataclass(frozen=True)
class Record:
    """The fields of an MBO record the silver stage looks at."""

    ts_recv: int
    ts_event: int
    order_id: int
    price: int
    size: int
    action: int
    side: int
    flags: int


def records_of(columns: dict[str, Sequence[int]]) -> list[Record]:
    """Records from column lists (e.g. ``{name: array[name].tolist()}``)."""
    return [
        Record(*fields)
        for fields in zip(
            columns["ts_recv"],
            columns["ts_event"],
            columns["order_id"],
            columns["price"],
            columns["size"],
            columns["action"],
            columns["side"],
            columns["flags"],
            strict=True,
        )
    ]


class Cell:
    """Everything the grid remembers about one absolute tick."""

    def __init__(self, rest: int, bid: int, ask: int) -> None:
        self.flow = [0.0, 0.0, 0.0]  # add, pull, fill of the open bin (decay-weighted)
        self.mass = [0.0, 0.0, 0.0]
        # Channel values at the last bin end: the three masses, then rest / bid / ask depth.
        self.prev = [0.0, 0.0, 0.0, float(rest), float(bid), float(ask)]
        self.vel = [0.0] * 6
        self.acc = [0.0] * 6
        self.jerk = [0.0] * 6


class TickBook(ReferenceBook):
    """The reference book plus an index of which raw prices rest at each absolute tick."""

    def __init__(self, tick_size: int) -> None:
        super().__init__()
        self.tick_size = tick_size
        self.tick_prices: tuple[dict[int, set[int]], dict[int, set[int]]] = ({}, {})

    def clear(self) -> None:
        super().clear()
        self.tick_prices[0].clear()
        self.tick_prices[1].clear()

    def _append(self, order_id: int, side: int, price: int, size: int) -> None:
        super()._append(order_id, side, price, size)
        self.tick_prices[side].setdefault(price // self.tick_size, set()).add(price)

    def _remove(self, order_id: int) -> None:
        side, price, _ = self.orders[order_id]
        super()._remove(order_id)
        if price not in self.queues[side]:
            prices = self.tick_prices[side][price // self.tick_size]
            prices.discard(price)
            if not prices:
                del self.tick_prices[side][price // self.tick_size]


class Depth:
    """What the bins read from one book state: best ticks and resting size per tick and side
    (summed on demand and remembered, since a book state often spans many empty bins)."""

    def __init__(self, book: TickBook) -> None:
        self.book = book
        bids, asks = book.tick_prices
        self.best_bid = max(bids) if bids else None
        self.best_ask = min(asks) if asks else None
        self.sizes: dict[int, tuple[int, int]] = {}
        self.windows: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def at(self, tick: int) -> tuple[int, int]:
        """``(bid size, ask size)`` at ``tick``."""
        if tick not in self.sizes:
            book = self.book
            totals = [0, 0]
            for side in (0, 1):
                for price in book.tick_prices[side].get(tick, ()):
                    totals[side] += sum(book.orders[oid][2] for oid in book.queues[side][price])
            self.sizes[tick] = (totals[0], totals[1])
        return self.sizes[tick]

    def window(self, ticks: list[int]) -> list[tuple[int, int]]:
        key = tuple(ticks)
        if key not in self.windows:
            self.windows[key] = [self.at(u) for u in ticks]
        return self.windows[key]


class ReferenceSilver:
    """Book + mechanics + bins, one record at a time."""

    def __init__(self, config: GridConfig, *, track_chains: bool = True) -> None:
        self.config = config
        self.track_chains = track_chains
        self.book = TickBook(config.tick_size)
        self.records_applied = 0
        self.previous_was_last = False
        self.previous_was_snapshot = False
        self.pending_fill: dict[int, int] = {}  # order_id -> fill quantity of this F_LAST group
        # Bin clock.
        self.started = False
        self.bin_start = 0
        self.bin_seq = 0
        self.event_count = 0
        # Grid.
        self.anchored = False
        self.grid_base = 0
        self.cells: dict[int, Cell] = {}  # absolute tick -> state, for the N grid ticks
        self.reanchors = 0
        # Bin-level memory.
        self.spot_x2: int | None = None
        self.prev_bin_valid = False
        self.prev_bin_bid = 0
        self.prev_bin_ask = 0
        self.bins: list[dict[str, Any]] = []
        self._depth: Depth | None = None
        self._depth_at_record = -1
        self._windows: dict[int, list[int]] = {}

    # -- the book as ticks -----------------------------------------------------------------

    def tick_of(self, price: int) -> int:
        return price // self.config.tick_size

    def best_ticks(self) -> tuple[int | None, int | None]:
        depth = self.depth()
        return depth.best_bid, depth.best_ask

    def book_valid(self) -> bool:
        bid, ask = self.best_ticks()
        return bid is not None and ask is not None and bid < ask

    def depth(self) -> Depth:
        """The book's depth per tick now (one view per book state, shared by the bins it spans)."""
        if self._depth is None or self._depth_at_record != self.records_applied:
            self._depth = Depth(self.book)
            self._depth_at_record = self.records_applied
        return self._depth

    def new_cell(self, tick: int, depth: Depth) -> Cell:
        bid, ask = depth.at(tick)
        return Cell(bid + ask, bid, ask)

    # -- mechanics -------------------------------------------------------------------------

    def changes_of(self, record: Record) -> list[tuple[str, int, int, int]]:
        """What the record does to depth, from the book *before* it is applied:
        ``("add", order_id, tick, q)`` or ``("leave", order_id, tick, q)``."""
        action = record.action
        order_id = record.order_id
        if action in (ACTION_ADD, ACTION_MODIFY):
            if record.side not in (SIDE_BID, SIDE_ASK) or record.price == UNDEF_PRICE:
                return []  # the book ignores it
            side = 0 if record.side == SIDE_BID else 1
            tick = self.tick_of(record.price)
            if order_id not in self.book.orders:
                return [("add", order_id, tick, record.size)]
            # A known order (a Modify, or an Add of an order that rests: the book modifies it).
            old_side, old_price, old_size = self.book.orders[order_id]
            old_tick = self.tick_of(old_price)
            if old_side == side and old_price == record.price:
                if record.size < old_size:
                    return [("leave", order_id, tick, old_size - record.size)]
                if record.size > old_size:
                    return [("add", order_id, tick, record.size - old_size)]
                return []
            return [("leave", order_id, old_tick, old_size), ("add", order_id, tick, record.size)]
        if action == ACTION_CANCEL and order_id in self.book.orders:
            _, price, resting = self.book.orders[order_id]
            return [("leave", order_id, self.tick_of(price), min(record.size, resting))]
        return []  # Clear, Trade, Fill, None, cancel of an unknown order

    def classify(self, changes: list[tuple[str, int, int, int]]) -> list[tuple[int, int, int]]:
        """``(kind, tick, quantity)``: quantity leaving an order is FILL up to the order's pending
        fill quantity in this F_LAST group, PULL for the rest."""
        out = []
        for what, order_id, tick, quantity in changes:
            if what == "add":
                out.append((ADD, tick, quantity))
                continue
            pending = self.pending_fill.get(order_id, 0)
            filled = min(quantity, pending)
            if filled > 0:
                self.pending_fill[order_id] = pending - filled
                out.append((FILL, tick, filled))
            if quantity > filled:
                out.append((PULL, tick, quantity - filled))
        return out

    # -- records ---------------------------------------------------------------------------

    def feed(self, records: Iterable[Record]) -> None:
        for record in records:
            self.apply(record)

    def apply(self, record: Record) -> None:
        config = self.config
        snapshot = bool(record.flags & F_SNAPSHOT)
        last = bool(record.flags & F_LAST)
        t = 0
        if not snapshot:
            t = self.clock_of(record)
            if not self.started:
                self.started = True
                self.bin_start = t - t % config.bin_width_ns
            self.close_due_bins(record)
        mechanics: list[tuple[int, int, int]] = []
        if not snapshot:
            mechanics = self.classify(self.changes_of(record))
        if record.action == ACTION_FILL and record.order_id in self.book.orders:
            self.pending_fill[record.order_id] = (
                self.pending_fill.get(record.order_id, 0) + record.size
            )
        self.book.apply(
            record.action, record.side, record.price, record.size, record.order_id, record.flags
        )
        # A pending fill belongs to the resting order: it goes when the order leaves the book.
        for order_id in [o for o in self.pending_fill if o not in self.book.orders]:
            del self.pending_fill[order_id]
        self.records_applied += 1
        if last:
            self.pending_fill.clear()  # the group is over: unmatched fills expire
        self.previous_was_last = last
        self.previous_was_snapshot = snapshot
        if snapshot:
            return
        self.event_count += 1
        t_eff = max(t, self.bin_start)
        if self.anchored:
            if self.track_chains:
                weight = math.exp((t_eff - self.bin_start) / (config.tau_rest_decay_s * 1e9))
                for kind, tick, quantity in mechanics:
                    if self.grid_base <= tick < self.grid_base + config.n_absolute_ticks:
                        self.cells[tick].flow[kind] += quantity * weight
        elif last and self.book_valid():
            bid, ask = self.best_ticks()
            assert bid is not None
            assert ask is not None
            self.anchored = True
            self.grid_base = (bid + ask) // 2 - config.n_absolute_ticks // 2
            depth = self.depth()
            self.cells = {
                tick: self.new_cell(tick, depth)
                for tick in range(self.grid_base, self.grid_base + config.n_absolute_ticks)
            }

    def clock_of(self, record: Record) -> int:
        return record.ts_recv if self.config.bin_clock == "ts_recv" else record.ts_event

    def close_due_bins(self, record: Record, stop_at_bin_seq: int | None = None) -> None:
        """Before a non-snapshot record is applied: if the book is consistent, close every bin
        that ends at or before the record's time (or only until bin ``stop_at_bin_seq`` is the
        open one: how a checkpoint taken just before this record sees it)."""
        if not self.started or not (self.previous_was_last or self.previous_was_snapshot):
            return
        t = self.clock_of(record)
        while t >= self.bin_start + self.config.bin_width_ns and self.bin_seq != stop_at_bin_seq:
            self.close_bin()

    def finish(self) -> None:
        """End of stream: the open bin closes once more."""
        if self.started:
            self.close_bin()

    # -- bins ------------------------------------------------------------------------------

    def update_cells(self, depth: Depth) -> None:
        """Bin end for every grid tick: fold flow into mass, then advance the chains."""
        config = self.config
        width_s = config.bin_width_ns / 1e9
        decay = math.exp(-width_s / config.tau_rest_decay_s)
        alpha_v = 1.0 - math.exp(-width_s / config.tau_velocity_s)
        alpha_a = 1.0 - math.exp(-width_s / config.tau_acceleration_s)
        alpha_j = 1.0 - math.exp(-width_s / config.tau_jerk_s)
        for tick, cell in self.cells.items():
            mass, flow = cell.mass, cell.flow
            for k in range(3):
                mass[k] = (mass[k] + flow[k]) * decay
                flow[k] = 0.0
            bid, ask = depth.at(tick)
            values = (mass[0], mass[1], mass[2], float(bid + ask), float(bid), float(ask))
            prev, vel, acc, jerk = cell.prev, cell.vel, cell.acc, cell.jerk
            for c in range(6):
                x = values[c]
                rate = (x - prev[c]) / width_s
                prev[c] = x
                v, a, j = vel[c], acc[c], jerk[c]
                v_new = v + alpha_v * (rate - v)
                a_new = a + alpha_a * ((v_new - v) / width_s - a)
                j_new = j + alpha_j * ((a_new - a) / width_s - j)
                vel[c], acc[c], jerk[c] = v_new, a_new, j_new

    def close_bin(self) -> None:
        config = self.config
        radius = config.grid_radius_ticks
        n_grid = config.n_absolute_ticks
        depth = self.depth()
        if self.anchored and self.track_chains:  # (light mode keeps no cells)
            self.update_cells(depth)
        bid, ask = self.best_ticks()
        valid = bid is not None and ask is not None and bid < ask
        out: dict[str, Any] = {
            "bin_seq": self.bin_seq,
            "bin_start_ns": self.bin_start,
            "bin_end_ns": self.bin_start + config.bin_width_ns,
            "event_count": self.event_count,
            "cum_event_id": self.records_applied,
            "best_bid": None if bid is None else bid * config.tick_size,
            "best_ask": None if ask is None else ask * config.tick_size,
            "book_valid": valid,
        }
        ask_move = bid_move = 0
        labels_valid = valid and self.prev_bin_valid
        if valid:
            assert bid is not None
            assert ask is not None
            self.spot_x2 = bid + ask
            if labels_valid:
                ask_move = ask - self.prev_bin_ask
                bid_move = bid - self.prev_bin_bid
            self.prev_bin_bid, self.prev_bin_ask = bid, ask
        self.prev_bin_valid = valid
        ask_sign = (ask_move > 0) - (ask_move < 0)
        bid_sign = (bid_move > 0) - (bid_move < 0)
        spot_x2 = self.spot_x2
        spot = None if spot_x2 is None else spot_x2 * config.tick_size // 2
        out.update(
            spot=spot,
            spot_x2_ticks=spot_x2,
            mid_price=None if spot is None else spot / 1e9,
            bbo_labels_valid=labels_valid,
            ask_move_ticks=ask_move,
            bid_move_ticks=bid_move,
            ask_sign=ask_sign,
            bid_sign=bid_sign,
            microstate_id=3 * (ask_sign + 1) + (bid_sign + 1),
            chase_up=ask_sign > 0 and bid_sign > 0,
            chase_down=ask_sign < 0 and bid_sign < 0,
        )
        window: list[int] = []
        if self.anchored and spot_x2 is not None:
            window = self.window_of(spot_x2)
            if (
                window[0] - self.grid_base < radius
                or window[-1] - self.grid_base > n_grid - 1 - radius
            ):
                self.reanchor(spot_x2 // 2 - n_grid // 2, depth)
        out["window_first_tick"] = window[0] if window else 0
        out["window_ticks"] = len(window)
        # Reported depth: the depth values just stored as "previous", i.e. the book's depth now.
        sizes = depth.window(window)
        out["rest_depth"] = [bid + ask for bid, ask in sizes]
        out["bid_depth"] = [bid for bid, _ in sizes]
        out["ask_depth"] = [ask for _, ask in sizes]
        if self.track_chains:
            cells = [self.cells[u] for u in window]
            for k, name in enumerate(MASS_NAMES):
                out[name] = [cell.mass[k] for cell in cells]
            for c, name in enumerate(CHANNEL_NAMES):
                out[f"{name}_v"] = [cell.vel[c] for cell in cells]
                out[f"{name}_a"] = [cell.acc[c] for cell in cells]
                out[f"{name}_j"] = [cell.jerk[c] for cell in cells]
            if window:
                assert [int(cell.prev[3]) for cell in cells] == out["rest_depth"]
        self.bins.append(out)
        self.bin_seq += 1
        self.bin_start += config.bin_width_ns
        self.event_count = 0

    def window_of(self, spot_x2: int) -> list[int]:
        """Every tick ``u`` with ``|2u - spot_x2| <= 2R``, lowest first."""
        if spot_x2 not in self._windows:
            radius = self.config.grid_radius_ticks
            self._windows[spot_x2] = [
                tick
                for tick in range(spot_x2 // 2 - radius - 1, spot_x2 // 2 + radius + 2)
                if abs(2 * tick - spot_x2) <= 2 * radius
            ]
        return self._windows[spot_x2]

    def reanchor(self, new_base: int, depth: Depth) -> None:
        """Move the grid: ticks inside both keep all state, entering ticks start at rest."""
        self.grid_base = new_base
        self.reanchors += 1
        if self.track_chains:
            self.cells = {
                tick: self.cells.get(tick) or self.new_cell(tick, depth)
                for tick in range(new_base, new_base + self.config.n_absolute_ticks)
            }

    def take_bins(self) -> list[dict[str, Any]]:
        """The bins closed since the last call."""
        bins, self.bins = self.bins, []
        return bins

    def load_grid_state(self, grid_base: int, cells: dict[int, Cell]) -> None:
        """Switch a light run (``track_chains=False``) to full mode with the given grid state
        (one cell per grid tick, keyed by absolute tick)."""
        if not self.anchored or grid_base != self.grid_base:
            raise ValueError(
                f"grid state for base {grid_base}, but this run is anchored={self.anchored} "
                f"at base {self.grid_base}"
            )
        expected = set(range(grid_base, grid_base + self.config.n_absolute_ticks))
        if set(cells) != expected:
            raise ValueError("grid state must hold exactly the grid's ticks")
        self.cells = cells
        self.track_chains = True
