"""Evaluation: a score turned into trades at the touch, resolved in ticks on the best bid/ask path.

The rules, for one parameter point (:class:`EvalParams`) over bins ``0 .. n-1``:

* **Fire.** A long fires at bin ``t`` when ``score[t-1] < threshold <= score[t]``, a short when
  ``score[t-1] > -threshold >= score[t]`` (crossings, not levels: a score that stays beyond the
  threshold fires once). Also required: ``t >= warmup_bins``, ``t >= 1``, ``t < n - 1`` (a later
  bin must exist to mark the trade on), ``tradable[t]``, no open position, and the cooldown. A NaN
  at ``t-1`` or ``t`` never fires.
* **One position at a time; cooldown counts from the exit.** A trade holds its bins
  ``entry_bin .. exit_bin`` (it leaves at ``exit_bin``'s close), so the next fire is at
  ``t >= exit_bin + 1 + cooldown_bins``; crossings inside a position or its cooldown are lost,
  not queued.
* **Entry at the touch,** at bin ``t``'s close: a long buys at ``best_ask[t]``, a short sells at
  ``best_bid[t]``, never at mid.
* **Exit.** From bin ``t+1`` a long is marked at ``best_bid[k]``, a short at ``best_ask[k]`` (the
  side it would exit on); untradable bins are skipped. The stop is tested first: SL when the mark
  is ``sl_ticks`` or more against the entry (exit at the mark, so a gap through the stop costs its
  slippage); otherwise TP when it is ``tp_ticks`` or more in favour (exit at the target, a resting
  limit never fills better). A bin whose wide spread spans both levels (bid at the stop, ask past
  the target, for a long) is a stop: the favourable side of the spread is not the exit side.
  With no outcome by ``t + max_hold_bins`` the trade times out at that bin at the last mark (the
  entry bin's exit side if no later bin was tradable); if the data ends first, at the last bin.
* **Metrics** (:data:`METRIC_NAMES`): ``signals`` trades, ``up``/``down`` longs/shorts,
  ``hit_rate``/``sl_rate`` TP/SL per trade, ``timeouts``, mean and total PnL in ticks,
  ``pnl_per_hour_ticks`` (total over the hours of bins ``warmup_bins .. n-1``),
  ``max_drawdown_ticks`` (largest fall of cumulative PnL from a running peak, the peak starting
  at 0, in trade order), ``median_bins_to_outcome`` (``exit_bin - entry_bin``). Ratios, means and
  the median are NaN without trades.

``tradable`` is the caller's; for silver it is :func:`tradable_bins`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from engine import evaluation_kernel as ek
from engine.silver_frame import SilverFrame

NS_PER_HOUR = 3_600_000_000_000
DEFAULT_MIN_TRADES = 10

TRADE_DTYPE = np.dtype(
    [
        ("entry_bin", np.int64),
        ("exit_bin", np.int64),
        ("direction", np.int8),  # +1 long, -1 short
        ("entry_tick", np.int64),
        ("exit_tick", np.int64),
        ("pnl_ticks", np.int64),
        ("outcome", np.int8),  # OUTCOME_TP, OUTCOME_SL or OUTCOME_TIMEOUT
    ]
)
OUTCOME_TP = ek.OUTCOME_TP
OUTCOME_SL = ek.OUTCOME_SL
OUTCOME_TIMEOUT = ek.OUTCOME_TIMEOUT

# In the kernel's column order (ek.M_*); counts and tick totals are integers.
METRIC_NAMES = (
    "signals",
    "up",
    "down",
    "hit_rate",
    "sl_rate",
    "timeouts",
    "mean_pnl_ticks",
    "total_pnl_ticks",
    "pnl_per_hour_ticks",
    "max_drawdown_ticks",
    "median_bins_to_outcome",
)
INTEGER_METRICS = frozenset(
    {"signals", "up", "down", "timeouts", "total_pnl_ticks", "max_drawdown_ticks"}
)
METRICS_DTYPE = np.dtype(
    [(name, np.int64 if name in INTEGER_METRICS else np.float64) for name in METRIC_NAMES]
)

Metrics = dict[str, float | int]


class ThresholdSelectionError(ValueError):
    """No candidate threshold traded often enough on the training span."""


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"EvalParams.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"EvalParams.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class EvalParams:
    """One evaluation point: firing threshold and trade geometry (ticks and bins)."""

    threshold: float
    tp_ticks: int
    sl_ticks: int
    max_hold_bins: int
    warmup_bins: int
    cooldown_bins: int

    def __post_init__(self) -> None:
        threshold = self.threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float | np.number)
            or not math.isfinite(threshold)
            or threshold <= 0
        ):
            raise ValueError(f"EvalParams.threshold must be a finite number > 0, got {threshold!r}")
        _check_int("tp_ticks", self.tp_ticks, 1)
        _check_int("sl_ticks", self.sl_ticks, 1)
        _check_int("max_hold_bins", self.max_hold_bins, 1)
        _check_int("warmup_bins", self.warmup_bins, 0)
        _check_int("cooldown_bins", self.cooldown_bins, 0)


@dataclass(frozen=True)
class EvalResult:
    """The trades (``TRADE_DTYPE``, in entry order) and their metrics."""

    trades: np.ndarray
    metrics: Metrics


def _bbo_arrays(
    best_bid_tick: np.ndarray, best_ask_tick: np.ndarray, tradable: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-bin BBO arrays as contiguous int64/int64/bool of one length."""
    bid = np.ascontiguousarray(best_bid_tick, dtype=np.int64)
    ask = np.ascontiguousarray(best_ask_tick, dtype=np.int64)
    tradable = np.ascontiguousarray(tradable, dtype=np.bool_)
    n = len(bid)
    for name, array in (("best_bid_tick", bid), ("best_ask_tick", ask), ("tradable", tradable)):
        if array.shape != (n,):
            raise ValueError(f"{name} has shape {array.shape}; expected ({n},) like best_bid_tick")
    return bid, ask, tradable


def _market_arrays(
    score: np.ndarray, best_bid_tick: np.ndarray, best_ask_tick: np.ndarray, tradable: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The score and the BBO arrays, as :func:`_bbo_arrays`, the score float64 of their length."""
    bid, ask, tradable = _bbo_arrays(best_bid_tick, best_ask_tick, tradable)
    score = np.ascontiguousarray(score, dtype=np.float64)
    if score.shape != bid.shape:
        raise ValueError(f"score has shape {score.shape}; expected {bid.shape} like the BBO")
    return score, bid, ask, tradable


def _hours_per_bin(bin_width_ns: int) -> float:
    if bin_width_ns <= 0:
        raise ValueError(f"bin_width_ns must be > 0, got {bin_width_ns}")
    return bin_width_ns / NS_PER_HOUR


def metrics_of(row: np.void) -> Metrics:
    """A ``METRICS_DTYPE`` row as a plain dict."""
    return {
        name: int(row[name]) if name in INTEGER_METRICS else float(row[name])
        for name in METRIC_NAMES
    }


def _metrics_rows(matrix: np.ndarray) -> np.ndarray:
    rows = np.empty(len(matrix), dtype=METRICS_DTYPE)
    for column, name in enumerate(METRIC_NAMES):
        rows[name] = matrix[:, column]
    return rows


def evaluate(
    score: np.ndarray,
    best_bid_tick: np.ndarray,
    best_ask_tick: np.ndarray,
    tradable: np.ndarray,
    params: EvalParams,
    bin_width_ns: int,
) -> EvalResult:
    """Trades and metrics of one parameter point (rules in the module docstring)."""
    score, bid, ask, tradable = _market_arrays(score, best_bid_tick, best_ask_tick, tradable)
    n = len(score)
    capacity = n // 2 + 1  # a trade holds its entry bin and at least one more
    entry_bin, exit_bin, direction, entry_tick, exit_tick, outcome = (
        np.empty(capacity, dtype=np.int64) for _ in range(6)
    )
    n_trades = ek.simulate(
        score,
        bid,
        ask,
        tradable,
        float(params.threshold),
        int(params.tp_ticks),
        int(params.sl_ticks),
        int(params.max_hold_bins),
        int(params.warmup_bins),
        int(params.cooldown_bins),
        entry_bin,
        exit_bin,
        direction,
        entry_tick,
        exit_tick,
        outcome,
    )
    row = np.empty(ek.N_METRICS)
    hours = (n - min(int(params.warmup_bins), n)) * _hours_per_bin(bin_width_ns)
    ek.trade_metrics(
        entry_bin, exit_bin, direction, entry_tick, exit_tick, outcome, n_trades, hours, row
    )
    trades = np.empty(n_trades, dtype=TRADE_DTYPE)
    trades["entry_bin"] = entry_bin[:n_trades]
    trades["exit_bin"] = exit_bin[:n_trades]
    trades["direction"] = direction[:n_trades]
    trades["entry_tick"] = entry_tick[:n_trades]
    trades["exit_tick"] = exit_tick[:n_trades]
    trades["pnl_ticks"] = (exit_tick[:n_trades] - entry_tick[:n_trades]) * direction[:n_trades]
    trades["outcome"] = outcome[:n_trades]
    return EvalResult(trades, metrics_of(_metrics_rows(row[None, :])[0]))


def _span_bounds(n: int, span: slice, what: str) -> tuple[int, int]:
    start, stop, step = span.indices(n)
    if step != 1 or start >= stop:
        raise ValueError(f"{what} span {span} must be a non-empty forward slice of {n} bins")
    return start, stop


def evaluate_many(
    score: np.ndarray,
    best_bid_tick: np.ndarray,
    best_ask_tick: np.ndarray,
    tradable: np.ndarray,
    params: Sequence[EvalParams],
    bin_width_ns: int,
    span: slice | None = None,
) -> np.ndarray:
    """``METRICS_DTYPE`` rows, one per point, from one compiled pass over the shared arrays.

    With ``span`` the points fire only inside it and every trade is cut at its end (a timeout
    at the span's last bin): bins after the span are never read; bins before it are read only
    as the past (the crossing at its first bin compares with the bin before).
    """
    score, bid, ask, tradable = _market_arrays(score, best_bid_tick, best_ask_tick, tradable)
    start = 0
    if span is not None:
        start, stop = _span_bounds(len(score), span, "evaluation")
        score, bid, ask, tradable = score[:stop], bid[:stop], ask[:stop], tradable[:stop]
    thresholds = np.array([float(p.threshold) for p in params], dtype=np.float64)
    geometry = np.empty((len(params), ek.N_GEOMETRY), dtype=np.int64)
    for i, p in enumerate(params):
        geometry[i, ek.G_TP] = p.tp_ticks
        geometry[i, ek.G_SL] = p.sl_ticks
        geometry[i, ek.G_HOLD] = p.max_hold_bins
        geometry[i, ek.G_WARMUP] = max(int(p.warmup_bins), start)
        geometry[i, ek.G_COOLDOWN] = p.cooldown_bins
    matrix = np.empty((len(params), ek.N_METRICS))
    ek.evaluate_points(
        score, bid, ask, tradable, thresholds, geometry, _hours_per_bin(bin_width_ns), matrix
    )
    return _metrics_rows(matrix)


def outcome_labels(
    best_bid_tick: np.ndarray,
    best_ask_tick: np.ndarray,
    tradable: np.ndarray,
    tp_ticks: int,
    sl_ticks: int,
    max_hold_bins: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(long_outcome, short_outcome, label_end_bin)`` of a trade entered at every bin.

    Outcomes are int8 ``OUTCOME_TP`` (+1), ``OUTCOME_SL`` (-1) or ``OUTCOME_TIMEOUT`` (0) under
    :func:`evaluate`'s exit rules. ``label_end_bin[t]`` is the later of the two exit bins (the
    last bin either label read); -1, with outcomes 0, where no trade can enter (bin not
    tradable, or the last bin).
    """
    EvalParams(1.0, tp_ticks, sl_ticks, max_hold_bins, 0, 0)  # same checks, same messages
    bid, ask, tradable = _bbo_arrays(best_bid_tick, best_ask_tick, tradable)
    n = len(bid)
    long_outcome = np.empty(n, dtype=np.int8)
    short_outcome = np.empty(n, dtype=np.int8)
    label_end_bin = np.empty(n, dtype=np.int64)
    ek.outcome_labels(
        bid,
        ask,
        tradable,
        int(tp_ticks),
        int(sl_ticks),
        int(max_hold_bins),
        long_outcome,
        short_outcome,
        label_end_bin,
    )
    return long_outcome, short_outcome, label_end_bin


def select_threshold(
    score: np.ndarray,
    best_bid_tick: np.ndarray,
    best_ask_tick: np.ndarray,
    tradable: np.ndarray,
    candidates: Sequence[float],
    train: slice,
    test: slice,
    base_params: EvalParams,
    bin_width_ns: int,
    *,
    min_trades: int = DEFAULT_MIN_TRADES,
) -> tuple[float, Metrics, Metrics]:
    """``(best_threshold, train_metrics, test_metrics)``: chosen on ``train``, reported on ``test``.

    Criterion: the highest ``total_pnl_ticks`` on the train span among candidates with at least
    ``min_trades`` trades there; ties go to the larger threshold (fewer, stronger signals). Both
    spans are evaluated as :func:`evaluate_many` does with ``span``, so the choice never reads a
    bin at or after ``train``'s end, and ``test`` must start at or after it.
    """
    if not candidates:
        raise ValueError("select_threshold needs at least one candidate threshold")
    n = len(score)
    _, train_stop = _span_bounds(n, train, "train")
    test_start, _ = _span_bounds(n, test, "test")
    if test_start < train_stop:
        raise ValueError(
            f"the test span must start at or after the train span ends: test starts at bin "
            f"{test_start}, train ends at bin {train_stop}"
        )
    points = [replace(base_params, threshold=float(c)) for c in candidates]
    train_rows = evaluate_many(
        score, best_bid_tick, best_ask_tick, tradable, points, bin_width_ns, train
    )
    eligible = [i for i in range(len(points)) if train_rows["signals"][i] >= min_trades]
    if not eligible:
        raise ThresholdSelectionError(
            f"no candidate threshold made {min_trades} trades on the train span "
            f"(most: {int(train_rows['signals'].max())})"
        )
    best = max(eligible, key=lambda i: (train_rows["total_pnl_ticks"][i], points[i].threshold))
    test_rows = evaluate_many(
        score, best_bid_tick, best_ask_tick, tradable, [points[best]], bin_width_ns, test
    )
    return points[best].threshold, metrics_of(train_rows[best]), metrics_of(test_rows[0])


def tradable_bins(frame: SilverFrame) -> np.ndarray:
    """Bins one can trade at: a consistent book with both sides present and not crossed."""
    return np.asarray(
        frame.has_bbo & frame.book_valid & (frame.best_bid_tick < frame.best_ask_tick),
        dtype=np.bool_,
    )


def bin_width_ns_of(frame: SilverFrame) -> int:
    """The bin width the silver was built with (from its schema metadata)."""
    metadata = frame.table.schema.metadata or {}
    config = metadata.get(b"qmachina.grid_config")
    if config is None:
        raise ValueError("silver table has no qmachina.grid_config metadata (bin width unknown)")
    return int(json.loads(config)["bin_width_ns"])
