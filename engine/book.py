"""The L3 order book of one instrument: owns the kernel's arrays and grows them when asked."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import book_kernel as k
from engine.events import EVENT_DTYPE, PRICE_SCALE

INITIAL_ORDER_CAPACITY = 1 << 12
INITIAL_LEVEL_WIDTH = 1 << 12
MAX_LEVEL_WIDTH = 1 << 22


class BookRangeError(ValueError):
    """A price lies so far from the others that the per-tick level arrays cannot span it."""


@dataclass(frozen=True)
class Level:
    """One price level: absolute tick, total size and order count."""

    tick: int
    size: int
    count: int


class OrderBook:
    """Databento MBO semantics over flat arrays (see ``engine.book_kernel``).

    ``tick_size`` is in raw price units (1e-9); prices are kept as absolute ticks
    ``price // tick_size``. Read the book only when :attr:`consistent` (after an F_LAST).
    """

    def __init__(self, tick_size: int, order_capacity: int = INITIAL_ORDER_CAPACITY) -> None:
        if tick_size <= 0:
            raise ValueError(f"tick_size must be positive, got {tick_size}")
        self.tick_size = tick_size
        self.meta = np.zeros(k.META_SIZE, dtype=np.int64)
        self.anomaly_counts = np.zeros(k.ANOMALY_COUNT, dtype=np.int64)
        self.meta[k.M_TICK_SIZE] = tick_size
        self.meta[k.M_WIDTH] = 0
        self.meta[k.M_BEST_BID] = k.EMPTY
        self.meta[k.M_BEST_ASK] = k.EMPTY
        self._allocate_orders(order_capacity)
        self.levels = np.zeros((0, k.LEVEL_COLUMNS), dtype=np.int64)
        self.changes = np.zeros((k.MAX_CHANGES, k.CHANGE_COLUMNS), dtype=np.int64)
        k.clear_book(self.orders, self.order_map, self.levels, self.free_slots, self.meta)

    def _allocate_orders(self, capacity: int) -> None:
        self.orders = np.full((capacity, k.ORDER_COLUMNS), k.EMPTY, dtype=np.int64)
        self.order_ids = np.zeros(capacity, dtype=np.uint64)
        self.order_map = np.zeros((2 * capacity, 2), dtype=np.uint64)
        self.free_slots = np.zeros(capacity, dtype=np.int64)

    # -- applying events -------------------------------------------------------------------

    def apply(self, events: np.ndarray) -> None:
        """Apply a whole batch of :data:`EVENT_DTYPE` records."""
        self._run(events, 0, stop_at_last=False)

    def apply_until_last(self, events: np.ndarray, start: int) -> int:
        """Apply from ``start`` through the next record with F_LAST; returns the next index."""
        return self._run(events, start, stop_at_last=True)

    def _run(self, events: np.ndarray, start: int, *, stop_at_last: bool) -> int:
        if events.dtype != EVENT_DTYPE:
            raise TypeError(f"events must have the envelope dtype, got {events.dtype}")
        index = start
        while True:
            status, index = k.apply_events(
                events,
                index,
                self.orders,
                self.order_ids,
                self.order_map,
                self.levels,
                self.free_slots,
                self.meta,
                self.anomaly_counts,
                self.changes,
                stop_at_last,
            )
            if status in (k.STATUS_DONE, k.STATUS_STOPPED):
                return int(index)
            self.grow_for(status, events, int(index))

    def grow_for(self, status: int, events: np.ndarray, index: int) -> None:
        """Make room so that record ``index`` can be applied (after a NEED_* status)."""
        if status == k.STATUS_NEED_ORDERS:
            self.grow_orders()
        elif status == k.STATUS_NEED_LEVELS:
            self.grow_levels(int(self.meta[k.M_NEED_TICK]), events, index)
        else:
            raise RuntimeError(f"unexpected book kernel status {status}")

    def grow_orders(self) -> None:
        """Double the order capacity; slots keep their numbers, so level queues stay valid."""
        old_orders, old_ids, old_free = self.orders, self.order_ids, self.free_slots
        n_free = int(self.meta[k.M_N_FREE])
        old_capacity = old_orders.shape[0]
        self._allocate_orders(2 * old_capacity)
        self.orders[:old_capacity] = old_orders
        self.order_ids[:old_capacity] = old_ids
        new_slots = np.arange(2 * old_capacity - 1, old_capacity - 1, -1, dtype=np.int64)
        self.free_slots[: len(new_slots)] = new_slots
        self.free_slots[len(new_slots) : len(new_slots) + n_free] = old_free[:n_free]
        self.meta[k.M_N_FREE] = n_free + len(new_slots)
        k.rehash(self.order_map, self.orders, self.order_ids)

    def grow_levels(self, tick: int, events: np.ndarray, index: int) -> None:
        """Re-base and widen the per-tick level arrays so ``tick`` fits, with room to spare."""
        width = int(self.meta[k.M_WIDTH])
        base = int(self.meta[k.M_BASE_TICK])
        if width == 0:
            new_width = INITIAL_LEVEL_WIDTH
            new_base = tick - new_width // 2
        else:
            low = min(base, tick)
            high = max(base + width, tick + 1)
            new_width = width
            while new_width < 2 * (high - low):
                new_width *= 2
            new_base = low - (new_width - (high - low)) // 2
        if new_width > MAX_LEVEL_WIDTH:
            record = events[index]
            raise BookRangeError(
                f"record {index} (sequence {record['sequence']}, order {record['order_id']}): "
                f"price {record['price']} is {abs(tick - base)} ticks from the book's range; "
                f"more than {MAX_LEVEL_WIDTH} ticks cannot be held"
            )
        levels = np.zeros((2 * new_width, k.LEVEL_COLUMNS), dtype=np.int64)
        levels[:, k.L_HEAD] = k.EMPTY
        levels[:, k.L_TAIL] = k.EMPTY
        shift = base - new_base
        if width:
            for side in (0, 1):
                levels[side * new_width + shift : side * new_width + shift + width] = self.levels[
                    side * width : (side + 1) * width
                ]
        for best in (k.M_BEST_BID, k.M_BEST_ASK):
            if self.meta[best] != k.EMPTY:
                self.meta[best] += shift
        self.levels = levels
        self.meta[k.M_WIDTH] = new_width
        self.meta[k.M_BASE_TICK] = new_base

    # -- reading the book ------------------------------------------------------------------

    @property
    def consistent(self) -> bool:
        """True after an F_LAST record: the book may be read."""
        return bool(self.meta[k.M_CONSISTENT])

    @property
    def order_count(self) -> int:
        return int(self.meta[k.M_N_ORDERS])

    def best_tick(self, side: int) -> int | None:
        """Absolute tick of the best bid (side 0) or ask (side 1), or None for an empty side."""
        idx = int(self.meta[k.M_BEST_BID if side == 0 else k.M_BEST_ASK])
        return None if idx == k.EMPTY else idx + int(self.meta[k.M_BASE_TICK])

    def best_price(self, side: int) -> int | None:
        """Best price in raw units (1e-9), or None."""
        tick = self.best_tick(side)
        return None if tick is None else tick * self.tick_size

    def top(self, side: int, depth: int) -> list[Level]:
        """Up to ``depth`` levels of ``side`` (0 bid, 1 ask), best first."""
        if self.meta[k.M_WIDTH] == 0 or depth <= 0:
            return []
        rows = k.top_levels(self.levels, self.meta, side, depth)
        return [Level(int(t), int(s), int(c)) for t, s, c in rows]

    def queue(self, side: int, tick: int) -> list[tuple[int, int]]:
        """The FIFO queue at ``tick``: ``(order_id, size)`` front first."""
        width = int(self.meta[k.M_WIDTH])
        idx = tick - int(self.meta[k.M_BASE_TICK])
        if not 0 <= idx < width:
            return []
        slot = int(self.levels[side * width + idx, k.L_HEAD])
        out = []
        while slot != k.EMPTY:
            out.append((int(self.order_ids[slot]), int(self.orders[slot, k.O_SIZE])))
            slot = int(self.orders[slot, k.O_NEXT])
        return out

    def anomalies(self) -> dict[str, int]:
        """Counters of every anomaly kind seen so far."""
        return {
            name: int(count)
            for name, count in zip(k.ANOMALY_NAMES, self.anomaly_counts, strict=True)
        }


def price_text(price: int, decimals: int) -> str:
    """A raw 1e-9 price as a decimal string with ``decimals`` places (exact, no float)."""
    sign = "-" if price < 0 else ""
    units, frac = divmod(abs(price), PRICE_SCALE)
    if decimals == 0:
        return f"{sign}{units}"
    digits = f"{frac:09d}"
    return f"{sign}{units}.{digits[:decimals].ljust(decimals, '0')}"
