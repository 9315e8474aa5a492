"""Numba kernel of the silver grid: book changes → per-tick mechanics → fixed time bins.

Per absolute grid tick ``g`` (absolute tick ``grid_base + g``) the grid keeps six channels:
add, pull and fill mass (exponentially decayed stocks of the quantity that arrived, was pulled or
was filled there) and resting, bid and ask depth (read from the book at each bin end). Each
channel has a velocity → acceleration → jerk chain: at every bin end the channel's rate of change
over the bin is exponentially smoothed (``alpha = 1 - exp(-bin_width / tau)``), and each next stage
smooths the rate of change of the stage before it. The update runs for every grid tick at every
bin end, so quiet ticks decay passively, and it sees the bin's whole change, so every event of the
bin counts however many share a timestamp.

A bin closes only when the book is consistent (after an F_LAST), so a bin never ends inside a
group of records. Snapshot records, and records before a session start, build the book but
neither move the bin clock nor count as flow; with a session start, bin 0 opens at it.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from engine import book_kernel as bk
from engine.events import F_LAST, F_SNAPSHOT
from engine.jit import hot_kernel

N_CHANNELS = 6
CH_ADD, CH_PULL, CH_FILL, CH_REST, CH_BID, CH_ASK = range(N_CHANNELS)
N_FLOW = 3  # add, pull, fill are flow channels (CHANGE_ADD/PULL/FILL map onto them)
CHANNEL_NAMES = ("add_mass", "pull_mass", "fill_mass", "rest_depth", "bid_depth", "ask_depth")
STAGE_SUFFIXES = ("v", "a", "j")

# Rows of the per-tick ``grid`` state array (float64, shape ``[GRID_ROWS, n_absolute_ticks]``).
ROW_FLOW = 0  # 3 rows: decay-weighted flow of the open bin (add, pull, fill)
ROW_MASS = 3  # 3 rows: decayed masses at the last bin end
ROW_PREV = 6  # 6 rows: channel values at the last bin end
ROW_CHAIN = 12  # 18 rows: stage s, channel c at ROW_CHAIN + s * N_CHANNELS + c
ROW_DEPTH = 30  # 3 rows of scratch: depth read from the book at this bin end (rest, bid, ask)
GRID_ROWS = 33

# Grid scalars (``grid_meta``).
G_ANCHORED = 0
G_BASE = 1  # absolute tick of grid index 0
G_STARTED = 2  # the bin clock has started
G_BIN_START = 3  # ns
G_BIN_SEQ = 4  # sequence number of the bin now open
G_BIN_EVENTS = 5
G_PREV_BID = 6  # best bid / ask ticks at the previous bin end (for BBO labels)
G_PREV_ASK = 7
G_PREV_VALID = 8
G_SPOT_X2 = 9  # last valid spot in half ticks (best bid tick + best ask tick)
G_HAS_SPOT = 10
G_OUT_BINS = 11  # bins written into the output buffers since the last flush
G_OUT_ROWS = 12
G_REANCHORS = 13
G_LATE_EVENTS = 14  # events whose clock time was before the open bin (clamped into it)
G_SESSION_START = 15  # ns; records before it only build the book (0: no session start)
GRID_META_SIZE = 16

# Parameters (``params`` float64).
P_BIN_WIDTH_NS = 0
P_CLOCK_IS_RECV = 1
P_RADIUS = 2
P_INV_TAU_REST_NS = 3
P_REST_DECAY = 4  # exp(-bin_width / tau_rest)
P_ALPHA_V = 5
P_ALPHA_A = 6
P_ALPHA_J = 7
P_BIN_WIDTH_S = 8
PARAMS_SIZE = 9

# Bin output columns (int64).
(
    B_SEQ,
    B_START,
    B_END,
    B_EVENTS,
    B_CUM_EVENTS,
    B_BEST_BID,
    B_BEST_ASK,
    B_HAS_BID,
    B_HAS_ASK,
    B_SPOT_X2,
    B_HAS_SPOT,
    B_VALID,
    B_ASK_MOVE,
    B_BID_MOVE,
    B_LABELS_VALID,
    B_FIRST_TICK,
    B_N_TICKS,
) = range(17)
BIN_COLUMNS = 17

# Row output, column-major so each column leaves as one contiguous Arrow buffer:
# float32 ``[masses 3 | chains 18, rows]`` and int32 depths ``[rest, bid, ask, rows]``.
ROW_FLOAT_COLUMNS = N_FLOW + 3 * N_CHANNELS

STATUS_DONE = bk.STATUS_DONE
STATUS_STOPPED = bk.STATUS_STOPPED


def make_params(
    bin_width_ns: int,
    clock_is_recv: bool,
    radius: int,
    tau_rest_s: float,
    tau_velocity_s: float,
    tau_acceleration_s: float,
    tau_jerk_s: float,
) -> np.ndarray:
    """Pack the grid constants the kernel needs."""
    width_s = bin_width_ns / 1e9
    params = np.zeros(PARAMS_SIZE, dtype=np.float64)
    params[P_BIN_WIDTH_NS] = bin_width_ns
    params[P_CLOCK_IS_RECV] = 1.0 if clock_is_recv else 0.0
    params[P_RADIUS] = radius
    params[P_INV_TAU_REST_NS] = 1.0 / (tau_rest_s * 1e9)
    params[P_REST_DECAY] = math.exp(-width_s / tau_rest_s)
    params[P_ALPHA_V] = 1.0 - math.exp(-width_s / tau_velocity_s)
    params[P_ALPHA_A] = 1.0 - math.exp(-width_s / tau_acceleration_s)
    params[P_ALPHA_J] = 1.0 - math.exp(-width_s / tau_jerk_s)
    params[P_BIN_WIDTH_S] = width_s
    return params


@nb.njit(nogil=True, cache=True, inline="always")
def _read_depth(levels: np.ndarray, meta: np.ndarray, grid_base: int, grid: np.ndarray) -> None:
    """Resting, bid and ask depth at every grid tick into the scratch rows, from the book."""
    n_grid = grid.shape[1]
    width = meta[bk.M_WIDTH]
    offset = grid_base - meta[bk.M_BASE_TICK]  # book level index of grid tick 0
    lo = max(0, -offset)
    hi = max(lo, min(n_grid, width - offset))
    for r in range(3):
        grid[ROW_DEPTH + r, :lo] = 0.0
        grid[ROW_DEPTH + r, hi:] = 0.0
    for g in range(lo, hi):
        bid = levels[offset + g, bk.L_SIZE]
        ask = levels[width + offset + g, bk.L_SIZE]
        grid[ROW_DEPTH, g] = bid + ask
        grid[ROW_DEPTH + 1, g] = bid
        grid[ROW_DEPTH + 2, g] = ask


@nb.njit(nogil=True, cache=True, inline="always")
def _update_grid(
    levels: np.ndarray,
    meta: np.ndarray,
    grid_meta: np.ndarray,
    params: np.ndarray,
    grid: np.ndarray,
) -> None:
    """Bin end: fold the bin's flow into the masses and advance every chain of every tick.

    Loops run channel by channel over contiguous tick rows so the compiler can vectorise them.
    """
    n_grid = grid.shape[1]
    decay = params[P_REST_DECAY]
    inv_dt = 1.0 / params[P_BIN_WIDTH_S]
    alpha_v = params[P_ALPHA_V]
    alpha_a = params[P_ALPHA_A]
    alpha_j = params[P_ALPHA_J]
    for c in range(N_FLOW):
        flow = grid[ROW_FLOW + c]
        mass = grid[ROW_MASS + c]
        for g in range(n_grid):
            mass[g] = (mass[g] + flow[g]) * decay
            flow[g] = 0.0
    _read_depth(levels, meta, grid_meta[G_BASE], grid)
    for c in range(N_CHANNELS):
        values = grid[ROW_MASS + c] if c < N_FLOW else grid[ROW_DEPTH + c - N_FLOW]
        prev = grid[ROW_PREV + c]
        vel = grid[ROW_CHAIN + c]
        acc = grid[ROW_CHAIN + N_CHANNELS + c]
        jerk = grid[ROW_CHAIN + 2 * N_CHANNELS + c]
        for g in range(n_grid):
            x = values[g]
            rate = (x - prev[g]) * inv_dt
            prev[g] = x
            v_old = vel[g]
            v_new = v_old + alpha_v * (rate - v_old)
            a_old = acc[g]
            a_new = a_old + alpha_a * ((v_new - v_old) * inv_dt - a_old)
            jerk[g] += alpha_j * ((a_new - a_old) * inv_dt - jerk[g])
            acc[g] = a_new
            vel[g] = v_new


@nb.njit(nogil=True, cache=True, inline="always")
def _reset_depth_baseline(
    levels: np.ndarray, meta: np.ndarray, grid: np.ndarray, grid_base: int, lo: int, hi: int
) -> None:
    """Ticks ``lo..hi`` enter the grid at rest: their previous depth is the book's depth now,
    so no spurious rate appears at the next bin end."""
    _read_depth(levels, meta, grid_base, grid)
    for g in range(lo, hi):
        for r in range(3):
            grid[ROW_PREV + CH_REST + r, g] = grid[ROW_DEPTH + r, g]


@nb.njit(nogil=True, cache=True, inline="always")
def _shift_grid(
    grid_meta: np.ndarray, new_base: int, levels: np.ndarray, meta: np.ndarray, grid: np.ndarray
) -> None:
    """Re-anchor: move the absolute window. Ticks that stay keep their state; new ones start
    from rest."""
    shift = new_base - grid_meta[G_BASE]
    n_grid = grid.shape[1]
    kept = max(0, n_grid - abs(shift))
    # Copy in the direction that never overwrites a tick before it is read.
    if shift > 0:
        for g in range(n_grid):
            for r in range(GRID_ROWS):
                grid[r, g] = grid[r, g + shift] if g < kept else 0.0
        entering_lo, entering_hi = kept, n_grid
    else:
        for g in range(n_grid - 1, -1, -1):
            for r in range(GRID_ROWS):
                grid[r, g] = grid[r, g + shift] if g >= n_grid - kept else 0.0
        entering_lo, entering_hi = 0, n_grid - kept
    grid_meta[G_BASE] = new_base
    _reset_depth_baseline(levels, meta, grid, new_base, entering_lo, entering_hi)
    grid_meta[G_REANCHORS] += 1


@nb.njit(nogil=True, cache=True, inline="always")
def close_bin(
    levels: np.ndarray,
    meta: np.ndarray,
    grid_meta: np.ndarray,
    params: np.ndarray,
    grid: np.ndarray,
    bins_out: np.ndarray,
    rows_float: np.ndarray,
    rows_depth: np.ndarray,
) -> None:
    """Close the open bin: update the grid, write the bin and its window, open the next bin."""
    width_ns = np.int64(params[P_BIN_WIDTH_NS])
    radius = np.int64(params[P_RADIUS])
    b = grid_meta[G_OUT_BINS]
    row0 = grid_meta[G_OUT_ROWS]
    start = grid_meta[G_BIN_START]
    if grid_meta[G_ANCHORED] == 1:
        _update_grid(levels, meta, grid_meta, params, grid)

    bins_out[b, B_SEQ] = grid_meta[G_BIN_SEQ]
    bins_out[b, B_START] = start
    bins_out[b, B_END] = start + width_ns
    bins_out[b, B_EVENTS] = grid_meta[G_BIN_EVENTS]
    bins_out[b, B_CUM_EVENTS] = meta[bk.M_EVENTS]
    base = meta[bk.M_BASE_TICK]
    has_bid = meta[bk.M_BEST_BID] != bk.EMPTY
    has_ask = meta[bk.M_BEST_ASK] != bk.EMPTY
    bid_tick = meta[bk.M_BEST_BID] + base
    ask_tick = meta[bk.M_BEST_ASK] + base
    bins_out[b, B_HAS_BID] = has_bid
    bins_out[b, B_HAS_ASK] = has_ask
    bins_out[b, B_BEST_BID] = bid_tick if has_bid else 0
    bins_out[b, B_BEST_ASK] = ask_tick if has_ask else 0
    valid = bk.book_valid(meta)
    bins_out[b, B_VALID] = valid
    labels_valid = valid and grid_meta[G_PREV_VALID] == 1
    bins_out[b, B_LABELS_VALID] = labels_valid
    bins_out[b, B_ASK_MOVE] = ask_tick - grid_meta[G_PREV_ASK] if labels_valid else 0
    bins_out[b, B_BID_MOVE] = bid_tick - grid_meta[G_PREV_BID] if labels_valid else 0
    if valid:
        grid_meta[G_PREV_BID] = bid_tick
        grid_meta[G_PREV_ASK] = ask_tick
        grid_meta[G_SPOT_X2] = bid_tick + ask_tick
        grid_meta[G_HAS_SPOT] = 1
    grid_meta[G_PREV_VALID] = 1 if valid else 0
    bins_out[b, B_SPOT_X2] = grid_meta[G_SPOT_X2]
    bins_out[b, B_HAS_SPOT] = grid_meta[G_HAS_SPOT]

    n_rows = 0
    first_tick = 0
    if grid_meta[G_ANCHORED] == 1 and grid_meta[G_HAS_SPOT] == 1:
        spot_x2 = grid_meta[G_SPOT_X2]
        # Ticks t with |2t - spot_x2| <= 2 * radius: symmetric around the spot.
        first_tick = -((2 * radius - spot_x2) // 2)
        last_tick = (spot_x2 + 2 * radius) // 2
        n_rows = last_tick - first_tick + 1
        n_grid = grid.shape[1]
        # Keep the window at least ``radius`` ticks inside the grid, so flow around it is tracked.
        if (
            first_tick - grid_meta[G_BASE] < radius
            or last_tick - grid_meta[G_BASE] > n_grid - 1 - radius
        ):
            _shift_grid(
                grid_meta,
                spot_x2 // 2 - n_grid // 2,
                levels,
                meta,
                grid,
            )
        grid_base = grid_meta[G_BASE]
        for r in range(n_rows):
            g = first_tick + r - grid_base
            out = row0 + r
            for c in range(N_FLOW):
                rows_float[c, out] = grid[ROW_MASS + c, g]
            for c in range(3 * N_CHANNELS):
                rows_float[N_FLOW + c, out] = grid[ROW_CHAIN + c, g]
            for c in range(3):
                rows_depth[c, out] = np.int32(grid[ROW_PREV + CH_REST + c, g])
    bins_out[b, B_FIRST_TICK] = first_tick
    bins_out[b, B_N_TICKS] = n_rows
    grid_meta[G_OUT_BINS] = b + 1
    grid_meta[G_OUT_ROWS] = row0 + n_rows
    grid_meta[G_BIN_SEQ] += 1
    grid_meta[G_BIN_START] = start + width_ns
    grid_meta[G_BIN_EVENTS] = 0


@nb.njit(nogil=True, cache=True, inline="always")
def _anchor(levels: np.ndarray, meta: np.ndarray, grid_meta: np.ndarray, grid: np.ndarray) -> None:
    """Place the absolute grid around the first valid spot."""
    base = meta[bk.M_BASE_TICK]
    spot = (meta[bk.M_BEST_BID] + meta[bk.M_BEST_ASK] + 2 * base) // 2
    n_grid = grid.shape[1]
    grid_base = spot - n_grid // 2
    grid_meta[G_BASE] = grid_base
    grid_meta[G_ANCHORED] = 1
    _reset_depth_baseline(levels, meta, grid, grid_base, 0, n_grid)


@hot_kernel
def build_silver(
    events: np.ndarray,
    start: int,
    orders: np.ndarray,
    order_ids: np.ndarray,
    order_map: np.ndarray,
    levels: np.ndarray,
    free_slots: np.ndarray,
    meta: np.ndarray,
    anomalies: np.ndarray,
    grid_meta: np.ndarray,
    params: np.ndarray,
    grid: np.ndarray,
    bins_out: np.ndarray,
    rows_float: np.ndarray,
    rows_depth: np.ndarray,
    changes: np.ndarray,
    stop_at_bin_seq: int,
) -> tuple[int, int]:
    """Book + silver over ``events[start:]``. Returns ``(status, next_index)``.

    Stops (``STATUS_STOPPED``, before applying the returned index) when the output buffers are
    full, or when bin ``stop_at_bin_seq`` is complete and about to close (a checkpoint point).
    A negative-free ``bk.STATUS_NEED_*`` status means a book array must grow first.
    """
    width_ns = np.int64(params[P_BIN_WIDTH_NS])
    clock_is_recv = params[P_CLOCK_IS_RECV] != 0.0
    inv_tau_ns = params[P_INV_TAU_REST_NS]
    max_bins = bins_out.shape[0]
    max_rows = rows_float.shape[1]
    window_rows = 2 * np.int64(params[P_RADIUS]) + 1
    n_grid = grid.shape[1]
    n = events.shape[0]
    book_width = meta[bk.M_WIDTH]
    book_base = meta[bk.M_BASE_TICK]
    tick_size = meta[bk.M_TICK_SIZE]
    inverse_tick = 1.0 / tick_size
    for i in range(start, n):
        ev = events[i]
        flags = ev.flags
        # Snapshot records, and records before the session start, only build the book.
        warmup = (flags & F_SNAPSHOT) != 0
        t = np.int64(0)
        if not warmup:
            t = np.int64(ev.ts_recv) if clock_is_recv else np.int64(ev.ts_event)
            warmup = t < grid_meta[G_SESSION_START]
        if not warmup:
            if grid_meta[G_STARTED] == 0:
                origin = grid_meta[G_SESSION_START] if grid_meta[G_SESSION_START] > 0 else t
                grid_meta[G_BIN_START] = origin - origin % width_ns
                grid_meta[G_STARTED] = 1
            consistent = meta[bk.M_CONSISTENT] == 1 or meta[bk.M_IN_SNAPSHOT] == 1
            if consistent:
                while t >= grid_meta[G_BIN_START] + width_ns:
                    if (
                        grid_meta[G_OUT_BINS] == max_bins
                        or grid_meta[G_OUT_ROWS] + window_rows > max_rows
                        or grid_meta[G_BIN_SEQ] == stop_at_bin_seq
                    ):
                        return STATUS_STOPPED, i
                    close_bin(
                        levels,
                        meta,
                        grid_meta,
                        params,
                        grid,
                        bins_out,
                        rows_float,
                        rows_depth,
                    )
        n_changes = bk.apply_event(
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
            book_width,
            book_base,
            tick_size,
            inverse_tick,
        )
        if n_changes < 0:
            return -n_changes, i
        meta[bk.M_EVENTS] += 1
        if warmup:
            continue
        grid_meta[G_BIN_EVENTS] += 1
        bin_start = grid_meta[G_BIN_START]
        if t < bin_start:
            grid_meta[G_LATE_EVENTS] += 1
            t = bin_start
        if grid_meta[G_ANCHORED] == 1:
            if n_changes > 0:
                weight = math.exp((t - bin_start) * inv_tau_ns)
                grid_base = grid_meta[G_BASE]
                for c in range(n_changes):
                    g = changes[c, 2] - grid_base
                    if 0 <= g < n_grid:
                        grid[ROW_FLOW + changes[c, 0], g] += changes[c, 3] * weight
        elif (flags & F_LAST) != 0 and bk.book_valid(meta):
            _anchor(levels, meta, grid_meta, grid)
    return STATUS_DONE, n


@hot_kernel
def finish_silver(
    levels: np.ndarray,
    meta: np.ndarray,
    grid_meta: np.ndarray,
    params: np.ndarray,
    grid: np.ndarray,
    bins_out: np.ndarray,
    rows_float: np.ndarray,
    rows_depth: np.ndarray,
    until_ns: int,
) -> int:
    """End of stream: close the open bin, and then every bin that starts before ``until_ns``
    (a session end). Returns ``STATUS_STOPPED`` when the buffers filled up first."""
    if grid_meta[G_STARTED] == 0:
        return STATUS_DONE
    window_rows = 2 * np.int64(params[P_RADIUS]) + 1
    first = True
    while first or grid_meta[G_BIN_START] < until_ns:
        if (
            grid_meta[G_OUT_BINS] == bins_out.shape[0]
            or grid_meta[G_OUT_ROWS] + window_rows > rows_float.shape[1]
        ):
            return STATUS_STOPPED
        close_bin(levels, meta, grid_meta, params, grid, bins_out, rows_float, rows_depth)
        first = False
    return STATUS_DONE
