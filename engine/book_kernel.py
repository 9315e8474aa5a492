"""Numba kernel of the L3 order book: flat arrays, no Python objects in the per-event path.

Layout (one book per instrument):

* ``orders[C, 7]`` int64 rows ``[tick, size, side, prev, next, fill, fill_group]`` and
  ``order_ids[C]``. ``side`` is 0 (bid), 1 (ask) or -1 (free slot); ``prev``/``next`` link the FIFO
  queue of the order's level; ``fill`` is the quantity Fill records reported for the order in the
  F_LAST group numbered ``fill_group`` (stale once the group is over, so nothing needs resetting).
* ``order_map[H, 2]`` uint64 rows ``[order_id, slot + 1]`` (0: empty): open-addressing map
  order_id → slot, linear probing with backward-shift deletion (no tombstones, so lookups never
  degrade); key and slot share a cache line.
* ``levels[2 * W, 4]`` int64 rows ``[size, count, head, tail]``, index ``side * W + tick - base``.
* ``meta`` int64 scalars (see the ``M_*`` indices) and ``anomalies`` counters (``A_*``).

A kernel call returns a status; when an array is too small it stops *before* the event so the
Python driver can grow the arrays and resume at the same index. Growth is rare and amortised.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from engine.events import (
    ACTION_ADD,
    ACTION_CANCEL,
    ACTION_CLEAR,
    ACTION_FILL,
    ACTION_MODIFY,
    F_LAST,
    F_MAYBE_BAD_BOOK,
    F_SNAPSHOT,
    SIDE_ASK,
    SIDE_BID,
    UNDEF_PRICE,
)
from engine.jit import hot_kernel

# Order row columns.
O_TICK = 0
O_SIZE = 1
O_SIDE = 2
O_PREV = 3
O_NEXT = 4
O_FILL = 5
O_FILL_GROUP = 6
ORDER_COLUMNS = 7

# Level row columns.
L_SIZE = 0
L_COUNT = 1
L_HEAD = 2
L_TAIL = 3
LEVEL_COLUMNS = 4

# meta scalars.
M_BASE_TICK = 0  # absolute tick of level index 0
M_WIDTH = 1  # level window width W (ticks per side)
M_N_ORDERS = 2
M_N_FREE = 3
M_BEST_BID = 4  # level index (0..W-1) or -1
M_BEST_ASK = 5
M_IN_SNAPSHOT = 6
M_CONSISTENT = 7  # 1 after an F_LAST (or a finished snapshot block): the book may be read
M_GROUP = 8  # number of the current F_LAST group
M_TICK_SIZE = 9  # raw price units per tick
M_NEED_TICK = 10  # when status is NEED_LEVELS: the absolute tick that did not fit
M_EVENTS = 11  # events applied so far (counted by the driving loops)
META_SIZE = 16

# Anomaly counters: never a crash, never silent.
A_CANCEL_UNKNOWN = 0
A_CANCEL_OVERSIZE = 1
A_CROSSED_AFTER_LAST = 2
A_MAYBE_BAD_BOOK = 3
A_OFF_TICK_PRICE = 4
A_DUPLICATE_ADD = 5
A_FILL_UNKNOWN = 6
A_BAD_SIDE = 7
A_UNDEF_PRICE = 8
A_MODIFY_UNKNOWN = 9  # not an error (Databento: treat as Add) but worth reporting
ANOMALY_NAMES = (
    "cancel_unknown_order",
    "cancel_larger_than_order",
    "crossed_book_after_last",
    "maybe_bad_book_flag",
    "price_off_tick",
    "add_of_existing_order",
    "fill_of_unknown_order",
    "bad_side",
    "undefined_price",
    "modify_of_unknown_order",
)
ANOMALY_COUNT = len(ANOMALY_NAMES)

# Kernel status codes.
STATUS_DONE = 0
STATUS_NEED_ORDERS = 1
STATUS_NEED_LEVELS = 2
STATUS_STOPPED = 3  # the caller's stop condition (e.g. an output buffer is full)

# Change kinds reported to the silver stage (one book event yields up to four changes).
CHANGE_ADD = 0
CHANGE_PULL = 1
CHANGE_FILL = 2
MAX_CHANGES = 4
CHANGE_COLUMNS = 4  # [kind, side, tick, quantity]

EMPTY = -1
FLOAT_EXACT = 1 << 52  # prices below this convert to float64 exactly
HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@nb.njit(nogil=True, cache=True, inline="always")
def _hash_home(order_id: np.uint64, mask: int) -> int:
    return int((order_id * HASH_MULTIPLIER) >> np.uint64(32)) & mask


@nb.njit(nogil=True, cache=True, inline="always")
def hash_find(order_map: np.ndarray, order_id: np.uint64) -> int:
    """Slot of ``order_id`` or -1."""
    mask = order_map.shape[0] - 1
    pos = _hash_home(order_id, mask)
    while True:
        stored = order_map[pos, 1]
        if stored == 0:
            return EMPTY
        if order_map[pos, 0] == order_id:
            return np.int64(stored) - 1
        pos = (pos + 1) & mask


@nb.njit(nogil=True, cache=True, inline="always")
def hash_insert(order_map: np.ndarray, order_id: np.uint64, slot: int) -> None:
    mask = order_map.shape[0] - 1
    pos = _hash_home(order_id, mask)
    while order_map[pos, 1] != 0:
        pos = (pos + 1) & mask
    order_map[pos, 0] = order_id
    order_map[pos, 1] = slot + 1


@nb.njit(nogil=True, cache=True, inline="always")
def hash_delete(order_map: np.ndarray, order_id: np.uint64) -> None:
    """Remove ``order_id`` and shift the following cluster back (keeps probes short)."""
    mask = order_map.shape[0] - 1
    pos = _hash_home(order_id, mask)
    while True:
        if order_map[pos, 1] == 0:
            return
        if order_map[pos, 0] == order_id:
            break
        pos = (pos + 1) & mask
    hole = pos
    nxt = (hole + 1) & mask
    while order_map[nxt, 1] != 0:
        home = _hash_home(order_map[nxt, 0], mask)
        # Move the entry back when its home is not cyclically within (hole, nxt].
        if (nxt - home) & mask >= (nxt - hole) & mask:
            order_map[hole, 0] = order_map[nxt, 0]
            order_map[hole, 1] = order_map[nxt, 1]
            hole = nxt
        nxt = (nxt + 1) & mask
    order_map[hole, 1] = 0


@nb.njit(nogil=True, cache=True, inline="always")
def _link_tail(orders: np.ndarray, levels: np.ndarray, lv: int, slot: int) -> None:
    tail = levels[lv, L_TAIL]
    orders[slot, O_PREV] = tail
    orders[slot, O_NEXT] = EMPTY
    if tail == EMPTY:
        levels[lv, L_HEAD] = slot
    else:
        orders[tail, O_NEXT] = slot
    levels[lv, L_TAIL] = slot
    levels[lv, L_SIZE] += orders[slot, O_SIZE]
    levels[lv, L_COUNT] += 1


@nb.njit(nogil=True, cache=True, inline="always")
def _unlink(orders: np.ndarray, levels: np.ndarray, lv: int, slot: int) -> None:
    prev = orders[slot, O_PREV]
    nxt = orders[slot, O_NEXT]
    if prev == EMPTY:
        levels[lv, L_HEAD] = nxt
    else:
        orders[prev, O_NEXT] = nxt
    if nxt == EMPTY:
        levels[lv, L_TAIL] = prev
    else:
        orders[nxt, O_PREV] = prev
    levels[lv, L_SIZE] -= orders[slot, O_SIZE]
    levels[lv, L_COUNT] -= 1


@nb.njit(nogil=True, cache=True, inline="always")
def _after_level_gain(meta: np.ndarray, side: int, idx: int) -> None:
    if side == 0:
        if idx > meta[M_BEST_BID]:
            meta[M_BEST_BID] = idx
    elif meta[M_BEST_ASK] == EMPTY or idx < meta[M_BEST_ASK]:
        meta[M_BEST_ASK] = idx


@nb.njit(nogil=True, cache=True, inline="always")
def _after_level_loss(
    meta: np.ndarray, levels: np.ndarray, width: int, side: int, idx: int
) -> None:
    """Move the best price off a level that just emptied."""
    if side == 0:
        if idx != meta[M_BEST_BID] or levels[idx, L_COUNT] > 0:
            return
        j = idx - 1
        while j >= 0 and levels[j, L_COUNT] == 0:
            j -= 1
        meta[M_BEST_BID] = j
    else:
        if idx != meta[M_BEST_ASK] or levels[width + idx, L_COUNT] > 0:
            return
        j = idx + 1
        while j < width and levels[width + j, L_COUNT] == 0:
            j += 1
        meta[M_BEST_ASK] = j if j < width else EMPTY


@nb.njit(nogil=True, cache=True)
def clear_book(
    orders: np.ndarray,
    order_map: np.ndarray,
    levels: np.ndarray,
    free_slots: np.ndarray,
    meta: np.ndarray,
) -> None:
    """Drop every resting order (a Clear record or the start of a snapshot block)."""
    order_map[:, 1] = 0
    capacity = orders.shape[0]
    for k in range(capacity):
        free_slots[k] = capacity - 1 - k
    orders[:, O_SIDE] = EMPTY
    levels[:, L_SIZE] = 0
    levels[:, L_COUNT] = 0
    levels[:, L_HEAD] = EMPTY
    levels[:, L_TAIL] = EMPTY
    meta[M_N_ORDERS] = 0
    meta[M_N_FREE] = capacity
    meta[M_BEST_BID] = EMPTY
    meta[M_BEST_ASK] = EMPTY


@nb.njit(nogil=True, cache=True, inline="always")
def _remove_quantity(
    orders: np.ndarray,
    levels: np.ndarray,
    meta: np.ndarray,
    slot: int,
    quantity: int,
    changes: np.ndarray,
    n_changes: int,
) -> int:
    """Report ``quantity`` leaving ``slot``'s level as fill (up to its pending fill) and pull."""
    tick = orders[slot, O_TICK]
    side = orders[slot, O_SIDE]
    pending = orders[slot, O_FILL] if orders[slot, O_FILL_GROUP] == meta[M_GROUP] else 0
    from_fill = min(quantity, pending)
    if from_fill > 0:
        orders[slot, O_FILL] -= from_fill
        changes[n_changes, 0] = CHANGE_FILL
        changes[n_changes, 1] = side
        changes[n_changes, 2] = tick
        changes[n_changes, 3] = from_fill
        n_changes += 1
    if quantity > from_fill:
        changes[n_changes, 0] = CHANGE_PULL
        changes[n_changes, 1] = side
        changes[n_changes, 2] = tick
        changes[n_changes, 3] = quantity - from_fill
        n_changes += 1
    return n_changes


@nb.njit(nogil=True, cache=True, inline="always")
def _delete_order(
    orders: np.ndarray,
    order_map: np.ndarray,
    levels: np.ndarray,
    free_slots: np.ndarray,
    meta: np.ndarray,
    width: int,
    base: int,
    order_id: np.uint64,
    slot: int,
) -> None:
    side = orders[slot, O_SIDE]
    idx = orders[slot, O_TICK] - base
    lv = side * width + idx
    _unlink(orders, levels, lv, slot)
    hash_delete(order_map, order_id)
    orders[slot, O_SIDE] = EMPTY
    free_slots[meta[M_N_FREE]] = slot
    meta[M_N_FREE] += 1
    meta[M_N_ORDERS] -= 1
    _after_level_loss(meta, levels, width, side, idx)


@nb.njit(nogil=True, cache=True, inline="always")
def _place_order(
    orders: np.ndarray,
    order_ids: np.ndarray,
    levels: np.ndarray,
    meta: np.ndarray,
    width: int,
    base: int,
    slot: int,
    order_id: np.uint64,
    side: int,
    tick: int,
    size: int,
) -> None:
    """Append ``slot`` at the back of its level's queue."""
    idx = tick - base
    order_ids[slot] = order_id
    orders[slot, O_TICK] = tick
    orders[slot, O_SIZE] = size
    orders[slot, O_SIDE] = side
    _link_tail(orders, levels, side * width + idx, slot)
    _after_level_gain(meta, side, idx)


@nb.njit(nogil=True, cache=True, inline="always")
def tick_of(price: int, tick_size: int, inverse_tick: float) -> int:
    """``price // tick_size`` (floor) without a division on the hot path: a float estimate
    (``price * inverse_tick``, ``inverse_tick = 1 / tick_size``) corrected exactly with integer
    arithmetic."""
    if -FLOAT_EXACT < price < FLOAT_EXACT:
        tick = int(np.float64(price) * inverse_tick)
        remainder = price - tick * tick_size
        if remainder < 0:
            tick -= 1
        elif remainder >= tick_size:
            tick += 1
        return tick
    return price // tick_size


@nb.njit(nogil=True, cache=True, inline="always")
def book_valid(meta: np.ndarray) -> bool:
    """Both sides present and not crossed."""
    return (
        meta[M_BEST_BID] != EMPTY
        and meta[M_BEST_ASK] != EMPTY
        and meta[M_BEST_BID] < meta[M_BEST_ASK]
    )


@nb.njit(nogil=True, cache=True, inline="always")
def apply_event(
    events: np.ndarray,
    i: int,
    orders: np.ndarray,
    order_ids: np.ndarray,
    order_map: np.ndarray,
    levels: np.ndarray,
    free_slots: np.ndarray,
    meta: np.ndarray,
    anomalies: np.ndarray,
    changes: np.ndarray,
    width: int,
    base: int,
    tick_size: int,
    inverse_tick: float,
) -> int:
    """Apply record ``i``. Returns the number of depth changes written to ``changes``, or a
    negative ``-STATUS_*`` when an array must grow first (nothing was applied then).

    ``width``, ``base`` and ``tick_size`` are the level window's (``meta[M_WIDTH]``, ...), passed
    in so they stay in registers: only growth changes them, and growth leaves the kernel."""
    ev = events[i]
    action = ev.action
    flags = ev.flags
    order_id = ev.order_id
    n_changes = 0

    snapshot = (flags & F_SNAPSHOT) != 0
    if snapshot and meta[M_IN_SNAPSHOT] == 0:
        # A snapshot block replaces the book whether or not it starts with a Clear.
        clear_book(orders, order_map, levels, free_slots, meta)
        meta[M_IN_SNAPSHOT] = 1
    elif not snapshot and meta[M_IN_SNAPSHOT] == 1:
        meta[M_IN_SNAPSHOT] = 0

    if action == ACTION_ADD or action == ACTION_MODIFY:
        raw_side = ev.side
        if raw_side == SIDE_BID:
            side = 0
        elif raw_side == SIDE_ASK:
            side = 1
        else:
            side = -1
        price = ev.price
        slot = hash_find(order_map, order_id)
        if side < 0 or price == UNDEF_PRICE:
            if side < 0:
                anomalies[A_BAD_SIDE] += 1
            else:
                anomalies[A_UNDEF_PRICE] += 1
        else:
            tick = tick_of(price, tick_size, inverse_tick)
            if not 0 <= tick - base < width:
                meta[M_NEED_TICK] = tick
                return -STATUS_NEED_LEVELS
            if slot == EMPTY and meta[M_N_FREE] == 0:
                return -STATUS_NEED_ORDERS
            if price - tick * tick_size != 0:
                anomalies[A_OFF_TICK_PRICE] += 1
            size = np.int64(ev.size)
            if slot == EMPTY:
                if action == ACTION_MODIFY:
                    anomalies[A_MODIFY_UNKNOWN] += 1
                meta[M_N_FREE] -= 1
                slot = free_slots[meta[M_N_FREE]]
                orders[slot, O_FILL] = 0
                orders[slot, O_FILL_GROUP] = EMPTY
                hash_insert(order_map, order_id, slot)
                meta[M_N_ORDERS] += 1
                _place_order(
                    orders, order_ids, levels, meta, width, base, slot, order_id, side, tick, size
                )
                n_changes = _report(changes, 0, CHANGE_ADD, side, tick, size)
            else:
                if action == ACTION_ADD:
                    anomalies[A_DUPLICATE_ADD] += 1
                n_changes = _modify(
                    orders,
                    order_ids,
                    levels,
                    meta,
                    width,
                    base,
                    slot,
                    order_id,
                    side,
                    tick,
                    size,
                    changes,
                )
                if orders[slot, O_SIZE] == 0:
                    _delete_order(
                        orders, order_map, levels, free_slots, meta, width, base, order_id, slot
                    )
    elif action == ACTION_CANCEL:
        slot = hash_find(order_map, order_id)
        if slot == EMPTY:
            anomalies[A_CANCEL_UNKNOWN] += 1
        else:
            resting = orders[slot, O_SIZE]
            cancel = np.int64(ev.size)
            if cancel > resting:
                anomalies[A_CANCEL_OVERSIZE] += 1
                cancel = resting
            n_changes = _remove_quantity(orders, levels, meta, slot, cancel, changes, 0)
            if cancel == resting:
                _delete_order(
                    orders, order_map, levels, free_slots, meta, width, base, order_id, slot
                )
            else:
                # A partial cancel keeps queue priority.
                orders[slot, O_SIZE] = resting - cancel
                side = orders[slot, O_SIDE]
                lv = side * width + orders[slot, O_TICK] - base
                levels[lv, L_SIZE] -= cancel
    elif action == ACTION_CLEAR:
        clear_book(orders, order_map, levels, free_slots, meta)
    elif action == ACTION_FILL:
        slot = hash_find(order_map, order_id)
        if slot == EMPTY:
            anomalies[A_FILL_UNKNOWN] += 1
        else:
            if orders[slot, O_FILL_GROUP] != meta[M_GROUP]:
                orders[slot, O_FILL_GROUP] = meta[M_GROUP]
                orders[slot, O_FILL] = 0
            orders[slot, O_FILL] += np.int64(ev.size)
    # Trade and None records do not change the book.

    if (flags & F_LAST) != 0:
        _end_group(meta, anomalies, flags)
    else:
        meta[M_CONSISTENT] = 0
    return n_changes


@nb.njit(nogil=True, cache=True, inline="always")
def _report(changes: np.ndarray, n: int, kind: int, side: int, tick: int, quantity: int) -> int:
    changes[n, 0] = kind
    changes[n, 1] = side
    changes[n, 2] = tick
    changes[n, 3] = quantity
    return n + 1


@nb.njit(nogil=True, cache=True, inline="always")
def _modify(
    orders: np.ndarray,
    order_ids: np.ndarray,
    levels: np.ndarray,
    meta: np.ndarray,
    width: int,
    base: int,
    slot: int,
    order_id: np.uint64,
    side: int,
    tick: int,
    size: int,
    changes: np.ndarray,
) -> int:
    """Modify a resting order; a price or side change or a size increase loses priority."""
    old_tick = orders[slot, O_TICK]
    old_side = orders[slot, O_SIDE]
    old_size = orders[slot, O_SIZE]
    old_idx = old_tick - base
    old_lv = old_side * width + old_idx
    if old_tick == tick and old_side == side:
        if size <= old_size:
            # Size decrease keeps priority; size zero leaves an empty order the caller deletes.
            n = _remove_quantity(orders, levels, meta, slot, old_size - size, changes, 0)
            orders[slot, O_SIZE] = size
            levels[old_lv, L_SIZE] -= old_size - size
            return n
        _unlink(orders, levels, old_lv, slot)
        orders[slot, O_SIZE] = size
        _link_tail(orders, levels, old_lv, slot)
        return _report(changes, 0, CHANGE_ADD, side, tick, size - old_size)
    n = _remove_quantity(orders, levels, meta, slot, old_size, changes, 0)
    _unlink(orders, levels, old_lv, slot)
    _after_level_loss(meta, levels, width, old_side, old_idx)
    _place_order(orders, order_ids, levels, meta, width, base, slot, order_id, side, tick, size)
    if size > 0:
        n = _report(changes, n, CHANGE_ADD, side, tick, size)
    return n


@nb.njit(nogil=True, cache=True, inline="always")
def _end_group(meta: np.ndarray, anomalies: np.ndarray, flags: int) -> None:
    """F_LAST: the book is consistent; fills not matched by a depth decrease expire."""
    meta[M_GROUP] += 1
    meta[M_CONSISTENT] = 1
    if (flags & F_MAYBE_BAD_BOOK) != 0:
        anomalies[A_MAYBE_BAD_BOOK] += 1
    bid = meta[M_BEST_BID]
    ask = meta[M_BEST_ASK]
    if bid != EMPTY and ask != EMPTY and bid >= ask:
        anomalies[A_CROSSED_AFTER_LAST] += 1


@hot_kernel
def apply_events(
    events: np.ndarray,
    start: int,
    orders: np.ndarray,
    order_ids: np.ndarray,
    order_map: np.ndarray,
    levels: np.ndarray,
    free_slots: np.ndarray,
    meta: np.ndarray,
    anomalies: np.ndarray,
    changes: np.ndarray,
    stop_at_last: bool,
) -> tuple[int, int]:
    """Book only: apply ``events[start:]``. Returns ``(status, next_index)``; with
    ``stop_at_last`` it stops (``STATUS_STOPPED``) after each record carrying F_LAST."""
    n = events.shape[0]
    width = meta[M_WIDTH]
    base = meta[M_BASE_TICK]
    tick_size = meta[M_TICK_SIZE]
    inverse_tick = 1.0 / tick_size
    for i in range(start, n):
        result = apply_event(
            events,
            i,
            orders,
            order_ids,
            order_map,
            levels,
            free_slots,
            meta,
            anomalies,
            changes,
            width,
            base,
            tick_size,
            inverse_tick,
        )
        if result < 0:
            meta[M_EVENTS] += i - start
            return -result, i
        if stop_at_last and (events[i].flags & F_LAST) != 0:
            meta[M_EVENTS] += i + 1 - start
            return STATUS_STOPPED, i + 1
    meta[M_EVENTS] += n - start
    return STATUS_DONE, n


@nb.njit(nogil=True, cache=True)
def top_levels(levels: np.ndarray, meta: np.ndarray, side: int, depth: int) -> np.ndarray:
    """Up to ``depth`` non-empty levels of ``side``, best first: rows ``[tick, size, count]``."""
    out = np.empty((depth, 3), dtype=np.int64)
    width = meta[M_WIDTH]
    base = meta[M_BASE_TICK]
    n = 0
    if side == 0:
        j = meta[M_BEST_BID]
        while j >= 0 and n < depth:
            if levels[j, L_COUNT] > 0:
                out[n, 0] = base + j
                out[n, 1] = levels[j, L_SIZE]
                out[n, 2] = levels[j, L_COUNT]
                n += 1
            j -= 1
    else:
        j = meta[M_BEST_ASK]
        while j != EMPTY and j < width and n < depth:
            if levels[width + j, L_COUNT] > 0:
                out[n, 0] = base + j
                out[n, 1] = levels[width + j, L_SIZE]
                out[n, 2] = levels[width + j, L_COUNT]
                n += 1
            j += 1
    return out[:n]


@nb.njit(nogil=True, cache=True)
def rehash(order_map: np.ndarray, orders: np.ndarray, order_ids: np.ndarray) -> None:
    """Rebuild the order map from the live slots (after the map was resized)."""
    order_map[:, 1] = 0
    for slot in range(orders.shape[0]):
        if orders[slot, O_SIDE] != EMPTY:
            hash_insert(order_map, order_ids[slot], slot)
