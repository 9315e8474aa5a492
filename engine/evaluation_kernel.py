"""Numba kernels of evaluation: firing, TP/SL resolution on the best bid/ask path, metrics.

Trades and metrics live in flat arrays passed in by the caller. :func:`simulate` runs one parameter
point over a score; :func:`evaluate_points` runs many points over the same score and BBO arrays,
reusing one set of trade buffers, so a sweep evaluates every point without leaving compiled code.
The rules are documented on :func:`engine.evaluation.evaluate`.
"""

from __future__ import annotations

import numba as nb
import numpy as np

OUTCOME_SL = -1
OUTCOME_TIMEOUT = 0
OUTCOME_TP = 1

# Columns of a metrics row (float64); engine.evaluation.METRICS_DTYPE names them.
M_SIGNALS = 0
M_UP = 1
M_DOWN = 2
M_HIT_RATE = 3
M_SL_RATE = 4
M_TIMEOUTS = 5
M_MEAN_PNL = 6
M_TOTAL_PNL = 7
M_PNL_PER_HOUR = 8
M_MAX_DRAWDOWN = 9
M_MEDIAN_BINS = 10
N_METRICS = 11

# Columns of the integer trade-geometry matrix of evaluate_points.
G_TP = 0
G_SL = 1
G_HOLD = 2
G_WARMUP = 3
G_COOLDOWN = 4
N_GEOMETRY = 5


@nb.njit(nogil=True, cache=True)
def resolve(
    bid: np.ndarray,
    ask: np.ndarray,
    tradable: np.ndarray,
    entry_bin: int,
    direction: int,
    entry_tick: int,
    tp: int,
    sl: int,
    hold: int,
) -> tuple[int, int, int]:
    """``(exit_bin, exit_tick, outcome)`` of a trade entered at ``entry_bin``'s close."""
    last = min(entry_bin + hold, bid.shape[0] - 1)
    # Until a later bin is tradable the position is worth its exit side at entry.
    mark = bid[entry_bin] if direction > 0 else ask[entry_bin]
    for k in range(entry_bin + 1, last + 1):
        if not tradable[k]:
            continue
        mark = bid[k] if direction > 0 else ask[k]
        gain = (mark - entry_tick) * direction
        # The stop is tested first: a bin that could be read as both counts against the trade.
        if gain <= -sl:
            return k, mark, OUTCOME_SL
        if gain >= tp:
            # A resting take-profit fills at its limit, never better, even across a gap.
            return k, entry_tick + direction * tp, OUTCOME_TP
    return last, mark, OUTCOME_TIMEOUT


@nb.njit(nogil=True, cache=True)
def simulate(
    score: np.ndarray,
    bid: np.ndarray,
    ask: np.ndarray,
    tradable: np.ndarray,
    threshold: float,
    tp: int,
    sl: int,
    hold: int,
    warmup: int,
    cooldown: int,
    entry_bin: np.ndarray,
    exit_bin: np.ndarray,
    direction: np.ndarray,
    entry_tick: np.ndarray,
    exit_tick: np.ndarray,
    outcome: np.ndarray,
) -> int:
    """Fire and resolve the trades of one parameter point; returns how many were written."""
    n = score.shape[0]
    n_trades = 0
    t = max(warmup, 1)
    # A fire needs a later bin to mark the position on, hence t < n - 1.
    while t < n - 1:
        before = score[t - 1]
        now = score[t]
        side = 0
        # Comparisons with NaN are false, so a NaN on either side of a crossing never fires.
        if before < threshold <= now:
            side = 1
        elif before > -threshold >= now:
            side = -1
        if side == 0 or not tradable[t]:
            t += 1
            continue
        entry = ask[t] if side > 0 else bid[t]
        k, tick, code = resolve(bid, ask, tradable, t, side, entry, tp, sl, hold)
        entry_bin[n_trades] = t
        exit_bin[n_trades] = k
        direction[n_trades] = side
        entry_tick[n_trades] = entry
        exit_tick[n_trades] = tick
        outcome[n_trades] = code
        n_trades += 1
        t = k + 1 + cooldown
    return n_trades


@nb.njit(nogil=True, cache=True)
def trade_metrics(
    entry_bin: np.ndarray,
    exit_bin: np.ndarray,
    direction: np.ndarray,
    entry_tick: np.ndarray,
    exit_tick: np.ndarray,
    outcome: np.ndarray,
    n_trades: int,
    hours: float,
    out: np.ndarray,
) -> None:
    """One metrics row from the first ``n_trades`` trades (in entry order) over ``hours``."""
    up = 0
    hits = 0
    stops = 0
    timeouts = 0
    total = 0
    equity = 0
    peak = 0
    drawdown = 0
    bins_to_outcome = np.empty(n_trades)
    for i in range(n_trades):
        if direction[i] > 0:
            up += 1
        if outcome[i] == OUTCOME_TP:
            hits += 1
        elif outcome[i] == OUTCOME_SL:
            stops += 1
        else:
            timeouts += 1
        pnl = (exit_tick[i] - entry_tick[i]) * direction[i]
        total += pnl
        equity += pnl
        peak = max(peak, equity)
        drawdown = max(drawdown, peak - equity)
        bins_to_outcome[i] = exit_bin[i] - entry_bin[i]
    out[M_SIGNALS] = n_trades
    out[M_UP] = up
    out[M_DOWN] = n_trades - up
    out[M_TIMEOUTS] = timeouts
    out[M_TOTAL_PNL] = total
    out[M_MAX_DRAWDOWN] = drawdown
    out[M_PNL_PER_HOUR] = total / hours if hours > 0.0 else np.nan
    if n_trades == 0:
        out[M_HIT_RATE] = np.nan
        out[M_SL_RATE] = np.nan
        out[M_MEAN_PNL] = np.nan
        out[M_MEDIAN_BINS] = np.nan
    else:
        out[M_HIT_RATE] = hits / n_trades
        out[M_SL_RATE] = stops / n_trades
        out[M_MEAN_PNL] = total / n_trades
        out[M_MEDIAN_BINS] = np.median(bins_to_outcome)


@nb.njit(nogil=True, cache=True)
def evaluate_points(
    score: np.ndarray,
    bid: np.ndarray,
    ask: np.ndarray,
    tradable: np.ndarray,
    thresholds: np.ndarray,
    geometry: np.ndarray,
    hours_per_bin: float,
    out: np.ndarray,
) -> None:
    """Metrics row ``out[p]`` for every point ``p`` (``thresholds[p]``, ``geometry[p]``)."""
    n = score.shape[0]
    capacity = n // 2 + 1  # a trade holds its entry bin and at least one more
    entry_bin = np.empty(capacity, dtype=np.int64)
    exit_bin = np.empty(capacity, dtype=np.int64)
    direction = np.empty(capacity, dtype=np.int64)
    entry_tick = np.empty(capacity, dtype=np.int64)
    exit_tick = np.empty(capacity, dtype=np.int64)
    outcome = np.empty(capacity, dtype=np.int64)
    for p in range(thresholds.shape[0]):
        warmup = geometry[p, G_WARMUP]
        n_trades = simulate(
            score,
            bid,
            ask,
            tradable,
            thresholds[p],
            geometry[p, G_TP],
            geometry[p, G_SL],
            geometry[p, G_HOLD],
            warmup,
            geometry[p, G_COOLDOWN],
            entry_bin,
            exit_bin,
            direction,
            entry_tick,
            exit_tick,
            outcome,
        )
        hours = (n - min(warmup, n)) * hours_per_bin
        trade_metrics(
            entry_bin, exit_bin, direction, entry_tick, exit_tick, outcome, n_trades, hours, out[p]
        )


@nb.njit(nogil=True, cache=True)
def outcome_labels(
    bid: np.ndarray,
    ask: np.ndarray,
    tradable: np.ndarray,
    tp: int,
    sl: int,
    hold: int,
    long_outcome: np.ndarray,
    short_outcome: np.ndarray,
    label_end_bin: np.ndarray,
) -> None:
    """Outcome of a long and of a short entered at every bin; -1 ends where none can enter."""
    n = bid.shape[0]
    for t in range(n):
        long_outcome[t] = OUTCOME_TIMEOUT
        short_outcome[t] = OUTCOME_TIMEOUT
        label_end_bin[t] = -1
        if t == n - 1 or not tradable[t]:
            continue
        long_exit, _, long_code = resolve(bid, ask, tradable, t, 1, ask[t], tp, sl, hold)
        short_exit, _, short_code = resolve(bid, ask, tradable, t, -1, bid[t], tp, sl, hold)
        long_outcome[t] = long_code
        short_outcome[t] = short_code
        label_end_bin[t] = max(long_exit, short_exit)
