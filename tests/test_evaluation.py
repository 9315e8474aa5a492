"""Evaluation: hand-built price paths, a plain-Python reference, and planted look-ahead."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.recfunctions import structured_to_unstructured

from engine.evaluation import (
    NS_PER_HOUR,
    OUTCOME_SL,
    OUTCOME_TIMEOUT,
    OUTCOME_TP,
    EvalParams,
    EvalResult,
    ThresholdSelectionError,
    evaluate,
    evaluate_many,
    metrics_of,
    outcome_labels,
    select_threshold,
)

BIN_NS = 100_000_000
Trade = tuple[int, int, int, int, int, int]  # entry_bin, exit_bin, direction, entry, exit, outcome


def params(**changes: Any) -> EvalParams:
    base = EvalParams(
        threshold=1.0, tp_ticks=2, sl_ticks=2, max_hold_bins=10, warmup_bins=0, cooldown_bins=0
    )
    return replace(base, **changes)


def run(
    score: Sequence[float],
    bid: Sequence[int],
    ask: Sequence[int] | None = None,
    tradable: Sequence[bool] | None = None,
    p: EvalParams | None = None,
    bin_width_ns: int = BIN_NS,
) -> EvalResult:
    ask = ask if ask is not None else [b + 1 for b in bid]
    tradable = tradable if tradable is not None else [True] * len(bid)
    return evaluate(
        np.array(score, dtype=float),
        np.array(bid),
        np.array(ask),
        np.array(tradable),
        p or params(),
        bin_width_ns,
    )


def trades_of(result: EvalResult) -> list[Trade]:
    t = result.trades
    return [
        (int(a), int(b), int(c), int(d), int(e), int(f))
        for a, b, c, d, e, f in zip(
            t["entry_bin"],
            t["exit_bin"],
            t["direction"],
            t["entry_tick"],
            t["exit_tick"],
            t["outcome"],
            strict=True,
        )
    ]


# -- the plain-Python reference ----------------------------------------------------------------


def reference_trades(
    score: np.ndarray, bid: np.ndarray, ask: np.ndarray, tradable: np.ndarray, p: EvalParams
) -> list[Trade]:
    """The rules of engine.evaluation's docstring, bin by bin, as plainly as possible."""
    n = len(score)
    trades: list[Trade] = []
    next_allowed = 0
    for t in range(n):
        if t < 1 or t < p.warmup_bins or t >= n - 1 or t < next_allowed or not tradable[t]:
            continue
        before, now = float(score[t - 1]), float(score[t])
        if math.isnan(before) or math.isnan(now):
            continue
        if before < p.threshold <= now:
            side = 1
        elif before > -p.threshold >= now:
            side = -1
        else:
            continue
        entry = int(ask[t]) if side == 1 else int(bid[t])
        last = min(t + p.max_hold_bins, n - 1)
        mark = int(bid[t]) if side == 1 else int(ask[t])
        exit_bin, exit_tick, outcome = last, mark, OUTCOME_TIMEOUT
        for k in range(t + 1, last + 1):
            if not tradable[k]:
                continue
            mark = int(bid[k]) if side == 1 else int(ask[k])
            exit_tick = mark
            if side * (mark - entry) <= -p.sl_ticks:
                exit_bin, outcome = k, OUTCOME_SL
                break
            if side * (mark - entry) >= p.tp_ticks:
                exit_bin, exit_tick, outcome = k, entry + side * p.tp_ticks, OUTCOME_TP
                break
        trades.append((t, exit_bin, side, entry, exit_tick, outcome))
        next_allowed = exit_bin + 1 + p.cooldown_bins
    return trades


def reference_metrics(trades: list[Trade], hours: float) -> dict[str, float]:
    pnl = [d * (x - e) for _, _, d, e, x, _ in trades]
    n = len(trades)
    equity, peak, drawdown = 0, 0, 0
    for value in pnl:
        equity += value
        peak = max(peak, equity)
        drawdown = max(drawdown, peak - equity)
    nan = float("nan")
    return {
        "signals": n,
        "up": sum(1 for t in trades if t[2] == 1),
        "down": sum(1 for t in trades if t[2] == -1),
        "hit_rate": sum(1 for t in trades if t[5] == OUTCOME_TP) / n if n else nan,
        "sl_rate": sum(1 for t in trades if t[5] == OUTCOME_SL) / n if n else nan,
        "timeouts": sum(1 for t in trades if t[5] == OUTCOME_TIMEOUT),
        "mean_pnl_ticks": sum(pnl) / n if n else nan,
        "total_pnl_ticks": sum(pnl),
        "pnl_per_hour_ticks": sum(pnl) / hours if hours > 0 else nan,
        "max_drawdown_ticks": drawdown,
        "median_bins_to_outcome": statistics.median(t[1] - t[0] for t in trades) if n else nan,
    }


def same_metrics(actual: dict[str, float | int], expected: dict[str, float]) -> bool:
    assert set(actual) == set(expected)
    return all(
        (math.isnan(expected[k]) and math.isnan(actual[k]))
        or actual[k] == pytest.approx(expected[k], rel=1e-12)
        for k in expected
    )


def same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Metrics rows equal field by field (NaN equal to NaN)."""
    matrix_a = structured_to_unstructured(a, dtype=np.float64)
    matrix_b = structured_to_unstructured(b, dtype=np.float64)
    return bool(np.array_equal(matrix_a, matrix_b, equal_nan=True))


@st.composite
def markets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, EvalParams]:
    n = draw(st.integers(2, 80))
    levels = st.sampled_from([-2.5, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.5, math.nan])
    score = np.array(draw(st.lists(levels, min_size=n, max_size=n)))
    steps = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    bid = 1000 + np.cumsum(steps)
    spread = np.array(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
    mostly_true = st.sampled_from([True, True, True, False])
    tradable = np.array(draw(st.lists(mostly_true, min_size=n, max_size=n)))
    p = EvalParams(
        threshold=draw(st.sampled_from([0.5, 1.0, 1.5, 2.0])),
        tp_ticks=draw(st.integers(1, 6)),
        sl_ticks=draw(st.integers(1, 6)),
        max_hold_bins=draw(st.integers(1, 15)),
        warmup_bins=draw(st.integers(0, 10)),
        cooldown_bins=draw(st.integers(0, 6)),
    )
    return score, bid, bid + spread, tradable, p


@given(markets())
@settings(max_examples=400, deadline=None)
def test_numba_evaluator_equals_reference(
    market: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, EvalParams],
) -> None:
    score, bid, ask, tradable, p = market
    result = evaluate(score, bid, ask, tradable, p, BIN_NS)
    expected = reference_trades(score, bid, ask, tradable, p)
    assert trades_of(result) == expected
    assert list(result.trades["pnl_ticks"]) == [d * (x - e) for _, _, d, e, x, _ in expected]
    hours = (len(score) - min(p.warmup_bins, len(score))) * BIN_NS / NS_PER_HOUR
    assert same_metrics(result.metrics, reference_metrics(expected, hours))


# -- hand-built paths --------------------------------------------------------------------------


def test_long_take_profit_exits_at_the_target_on_the_bid() -> None:
    # Long fires at bin 1 (0 < 1 <= 1), buys the ask 101; the bid reaches 103 at bin 3.
    result = run([0, 1, 1, 1, 1], [100, 100, 102, 103, 103])
    assert trades_of(result) == [(1, 3, 1, 101, 103, OUTCOME_TP)]
    assert list(result.trades["pnl_ticks"]) == [2]


def test_take_profit_across_a_gap_fills_at_the_limit() -> None:
    result = run([0, 1, 1, 1], [100, 100, 110, 110])
    assert trades_of(result) == [(1, 2, 1, 101, 103, OUTCOME_TP)]


def test_stop_loss_exits_at_the_mark_including_gap_slippage() -> None:
    result = run([0, 1, 1, 1, 1], [100, 100, 100, 99, 99])
    assert trades_of(result) == [(1, 3, 1, 101, 99, OUTCOME_SL)]
    gapped = run([0, 1, 1, 1], [100, 100, 95, 95])
    assert trades_of(gapped) == [(1, 2, 1, 101, 95, OUTCOME_SL)]
    assert list(gapped.trades["pnl_ticks"]) == [-6]


def test_wide_spread_bin_spanning_stop_and_target_counts_as_stop() -> None:
    # Long at 101; bin 2: bid 99 (at the stop) and ask 104 (past the target) -> SL, not TP.
    result = run([0, 1, 1, 1], [100, 100, 99, 99], ask=[101, 101, 104, 100])
    assert trades_of(result) == [(1, 2, 1, 101, 99, OUTCOME_SL)]
    # The mirror for a short at bid 100: ask 102 (stop) while the bid 97 is past the target.
    short = run([0, -1, -1, -1], [100, 100, 97, 100], ask=[101, 101, 102, 101])
    assert trades_of(short) == [(1, 2, -1, 100, 102, OUTCOME_SL)]


def test_timeout_exits_at_the_mark_after_max_hold() -> None:
    result = run([0, 1] + [1] * 8, [100] * 10, p=params(max_hold_bins=3))
    assert trades_of(result) == [(1, 4, 1, 101, 100, OUTCOME_TIMEOUT)]
    assert list(result.trades["pnl_ticks"]) == [-1]  # the spread paid


def test_trade_cut_by_the_end_of_data_times_out_at_the_last_bin() -> None:
    result = run([0, 1, 1, 1], [100, 100, 101, 101], p=params(max_hold_bins=50))
    assert trades_of(result) == [(1, 3, 1, 101, 101, OUTCOME_TIMEOUT)]


def test_entry_is_at_the_touch_not_mid_with_a_wide_spread() -> None:
    bid = [100, 100, 100, 100]
    ask = [104, 104, 104, 104]
    long = run([0, 1, 1, 1], bid, ask, p=params(tp_ticks=50, sl_ticks=50))
    assert trades_of(long) == [(1, 3, 1, 104, 100, OUTCOME_TIMEOUT)]
    short = run([0, -1, -1, -1], bid, ask, p=params(tp_ticks=50, sl_ticks=50))
    assert trades_of(short) == [(1, 3, -1, 100, 104, OUTCOME_TIMEOUT)]


def test_short_take_profit_on_the_ask() -> None:
    result = run([0, -1, -1, -1], [100, 100, 98, 97], ask=[101, 101, 99, 98])
    assert trades_of(result) == [(1, 3, -1, 100, 98, OUTCOME_TP)]


def test_untradable_bins_are_skipped_for_marking_and_entry() -> None:
    # Bin 2 shows a collapse but has no BBO: ignored; bin 3 marks the trade.
    result = run(
        [0, 1, 1, 1, 1], [100, 100, 50, 103, 103], tradable=[True, True, False, True, True]
    )
    assert trades_of(result) == [(1, 3, 1, 101, 103, OUTCOME_TP)]
    # A crossing at an untradable bin does not fire (and is not carried to the next bin).
    assert trades_of(run([0, 1, 1, 1], [100] * 4, tradable=[True, False, True, True])) == []


def test_crossings_fire_not_levels() -> None:
    # The score sits above the threshold the whole time after bin 1: exactly one long.
    result = run([0] + [2] * 11, [100] * 12, p=params(max_hold_bins=2))
    assert [t[0] for t in trades_of(result)] == [1]
    # Already above at bin 0: no crossing at all.
    assert trades_of(run([2] * 12, [100] * 12, p=params(max_hold_bins=2))) == []


def test_nan_scores_never_fire() -> None:
    assert trades_of(run([math.nan, 1, 1, 1], [100] * 4)) == []
    assert trades_of(run([0, math.nan, 1, 1], [100] * 4)) == []


def test_crossings_during_a_position_are_lost() -> None:
    # Crossings at 1, 3, 5, 7: the first trade holds bins 1..4 (timeout), so 3 is lost; 5 fires.
    score = [0, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    result = run(score, [100] * 10, p=params(max_hold_bins=3))
    assert [(t[0], t[1]) for t in trades_of(result)] == [(1, 4), (5, 8)]


def test_cooldown_counts_from_the_exit_bin() -> None:
    # The first trade exits at bin 2 (TP); crossings every other bin after it.
    score = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    bid = [100, 100, 103] + [100] * 9

    def entries(cooldown: int) -> list[int]:
        return [t[0] for t in trades_of(run(score, bid, p=params(cooldown_bins=cooldown)))]

    assert entries(0)[:2] == [1, 3]  # 3 >= 2 + 1 + 0
    assert entries(1)[:2] == [1, 5]  # 3 < 2 + 1 + 1
    assert entries(2)[:2] == [1, 5]  # 5 >= 2 + 1 + 2
    assert entries(3)[:2] == [1, 7]


def test_warmup_excludes_early_crossings() -> None:
    score = [0, 1, 0, 1, 0, 1, 0, 0]
    assert [t[0] for t in trades_of(run(score, [100] * 8, p=params(max_hold_bins=1)))] == [1, 3, 5]
    warm = run(score, [100] * 8, p=params(max_hold_bins=1, warmup_bins=3))
    assert [t[0] for t in trades_of(warm)] == [3, 5]
    assert [t[0] for t in trades_of(run(score, [100] * 8, p=params(warmup_bins=4)))] == [5]


def test_metrics_by_hand() -> None:
    # Four trades: long TP +2 (1 bin), long SL through a gap -4 (2 bins), long timeout -1
    # (4 bins), short TP +2 (1 bin).
    score = [0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, -1, 0, 0]
    bid = [100, 100, 103, 100, 99, 97, 100, 100, 100, 100, 100, 100, 100, 97, 100]
    ask = [101, 101, 104, 101, 100, 98, 101, 101, 101, 101, 101, 101, 101, 98, 101]
    quarter_hour = NS_PER_HOUR // 4
    result = run(score, bid, ask, p=params(sl_ticks=3, max_hold_bins=4), bin_width_ns=quarter_hour)
    assert trades_of(result) == [
        (1, 2, 1, 101, 103, OUTCOME_TP),
        (3, 5, 1, 101, 97, OUTCOME_SL),
        (7, 11, 1, 101, 100, OUTCOME_TIMEOUT),
        (12, 13, -1, 100, 98, OUTCOME_TP),
    ]
    m = result.metrics
    assert (m["signals"], m["up"], m["down"], m["timeouts"]) == (4, 3, 1, 1)
    assert (m["hit_rate"], m["sl_rate"]) == (0.5, 0.25)
    assert (m["total_pnl_ticks"], m["mean_pnl_ticks"]) == (-1, -0.25)
    assert m["max_drawdown_ticks"] == 5  # equity 2, -2, -3, -1: peak 2, trough -3
    assert m["median_bins_to_outcome"] == 1.5  # of 1, 2, 4, 1
    assert m["pnl_per_hour_ticks"] == pytest.approx(-1 / 3.75)  # 15 bins of 15 minutes
    assert isinstance(m["signals"], int)
    assert isinstance(m["total_pnl_ticks"], int)


def test_metrics_without_trades() -> None:
    m = run([0, 0, 0], [100] * 3).metrics
    assert (m["signals"], m["total_pnl_ticks"], m["max_drawdown_ticks"]) == (0, 0, 0)
    assert all(math.isnan(m[k]) for k in ("hit_rate", "mean_pnl_ticks", "median_bins_to_outcome"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", 0.0),
        ("threshold", math.nan),
        ("tp_ticks", 0),
        ("sl_ticks", -1),
        ("max_hold_bins", 0),
        ("warmup_bins", -1),
        ("cooldown_bins", -2),
        ("tp_ticks", 2.5),
        ("cooldown_bins", True),
    ],
)
def test_eval_params_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"EvalParams\.{field}"):
        params(**{field: value})


def test_arrays_of_different_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="best_ask_tick"):
        evaluate(np.zeros(4), np.zeros(4), np.zeros(3), np.ones(4, bool), params(), BIN_NS)


# -- labels ------------------------------------------------------------------------------------


def test_outcome_labels_by_hand() -> None:
    bid = np.array([100, 100, 102, 103, 97, 97])
    ask = bid + 1
    tradable = np.array([True, True, True, True, True, False])
    long, short, end = outcome_labels(bid, ask, tradable, 2, 2, 10)
    # Bin 0: long at 101 hits 103 at bin 3; short at 100 is stopped when the ask hits 103 (bin 2).
    assert (long[0], short[0]) == (OUTCOME_TP, OUTCOME_SL)
    assert end[0] == 3
    # Bin 4 has no tradable bin after it: both time out at the last bin; bin 5 cannot enter.
    assert (long[4], short[4], end[4]) == (OUTCOME_TIMEOUT, OUTCOME_TIMEOUT, 5)
    assert (long[5], short[5], end[5]) == (OUTCOME_TIMEOUT, OUTCOME_TIMEOUT, -1)


@given(markets())
@settings(max_examples=100, deadline=None)
def test_outcome_labels_agree_with_a_forced_trade(
    market: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, EvalParams],
) -> None:
    _, bid, ask, tradable, p = market
    long, short, end = outcome_labels(bid, ask, tradable, p.tp_ticks, p.sl_ticks, p.max_hold_bins)
    n = len(bid)
    assert end[n - 1] == -1
    for t in range(1, n - 1):  # a crossing needs a bin before it
        if not tradable[t]:
            assert end[t] == -1
            continue
        exits = []
        for side, outcome in ((1, long[t]), (-1, short[t])):
            # A score that crosses exactly at bin t, and the warmup keeps earlier bins out.
            score = np.zeros(n)
            score[t:] = side * 2.0
            forced = reference_trades(score, bid, ask, tradable, replace(p, warmup_bins=t))
            assert forced[0][0] == t
            assert outcome == forced[0][5]
            exits.append(forced[0][1])
        assert end[t] == max(exits)


# -- planted look-ahead ------------------------------------------------------------------------


@given(markets(), st.data())
@settings(max_examples=300, deadline=None)
def test_the_future_never_changes_past_fires(
    market: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, EvalParams], data: st.DataObject
) -> None:
    score, bid, ask, tradable, p = market
    n = len(score)
    cut = data.draw(st.integers(0, n - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    score2, bid2, ask2, tradable2 = score.copy(), bid.copy(), ask.copy(), tradable.copy()
    later = slice(cut + 1, n)
    score2[later] = rng.choice([-3.0, 0.0, 3.0, math.nan], n - cut - 1)
    bid2[later] = bid[later] + rng.integers(-20, 21, n - cut - 1)
    ask2[later] = bid2[later] + rng.integers(1, 5, n - cut - 1)
    tradable2[later] = rng.random(n - cut - 1) < 0.7

    def fired(result: EvalResult) -> list[tuple[int, int, int]]:
        return [(t[0], t[2], t[3]) for t in trades_of(result) if t[0] <= cut]

    before = evaluate(score, bid, ask, tradable, p, BIN_NS)
    after = evaluate(score2, bid2, ask2, tradable2, p, BIN_NS)
    assert fired(before) == fired(after)
    # Trades that also closed by the cut are entirely unchanged.
    closed = [t for t in trades_of(before) if t[1] <= cut]
    assert closed == [t for t in trades_of(after) if t[1] <= cut]


def random_market(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 0.4, n)
    score = np.empty(n)
    score[0] = noise[0]
    for t in range(1, n):  # a mean-reverting AR(1) score: crosses often, at every level
        score[t] = 0.95 * score[t - 1] + noise[t]
    bid = 5000 + np.cumsum(rng.integers(-1, 2, n))
    return score, bid, bid + rng.integers(1, 3, n), rng.random(n) < 0.97


def test_threshold_selection_never_sees_the_test_span() -> None:
    n = 6000
    score, bid, ask, tradable = random_market(3, n)
    candidates = [0.5, 1.0, 1.5, 2.0, 3.0]
    base = params(tp_ticks=4, sl_ticks=3, max_hold_bins=200, warmup_bins=50)
    train, test = slice(0, 4000), slice(4000, n)
    chosen, train_m, test_m = select_threshold(
        score, bid, ask, tradable, candidates, train, test, base, BIN_NS, min_trades=5
    )
    rows = evaluate_many(
        score[:4000],
        bid[:4000],
        ask[:4000],
        tradable[:4000],
        [replace(base, threshold=c) for c in candidates],
        BIN_NS,
    )
    eligible = [i for i, r in enumerate(rows) if r["signals"] >= 5]
    assert chosen == max((rows["total_pnl_ticks"][i], candidates[i]) for i in eligible)[1]
    assert train_m == metrics_of(rows[candidates.index(chosen)])
    # Everything from the test span on is replaced: the choice and its train metrics stay.
    rng = np.random.default_rng(11)
    score2, bid2, ask2 = score.copy(), bid.copy(), ask.copy()
    score2[4000:] = rng.normal(0, 5, n - 4000)
    bid2[4000:] += rng.integers(-30, 30, n - 4000)
    ask2[4000:] = bid2[4000:] + 1
    chosen2, train_m2, test_m2 = select_threshold(
        score2, bid2, ask2, tradable, candidates, train, test, base, BIN_NS, min_trades=5
    )
    assert (chosen2, train_m2) == (chosen, train_m)
    assert test_m2 != test_m  # the test span itself was read
    # The test span is reported, not re-selected: fires only inside it.
    only_test = evaluate_many(
        score, bid, ask, tradable, [replace(base, threshold=chosen)], BIN_NS, test
    )
    assert test_m == metrics_of(only_test[0])


def test_test_span_must_start_after_train_ends() -> None:
    score, bid, ask, tradable = random_market(4, 1000)
    base = params()
    with pytest.raises(ValueError, match="test span must start at or after"):
        select_threshold(
            score, bid, ask, tradable, [1.0], slice(0, 600), slice(500, 1000), base, BIN_NS
        )
    with pytest.raises(ThresholdSelectionError, match="1000 trades"):
        select_threshold(
            score,
            bid,
            ask,
            tradable,
            [1.0],
            slice(0, 600),
            slice(600, 1000),
            base,
            BIN_NS,
            min_trades=1000,
        )


def test_span_evaluation_reads_nothing_after_the_span() -> None:
    score, bid, ask, tradable = random_market(5, 3000)
    points = [params(threshold=t, max_hold_bins=400) for t in (0.5, 1.0, 2.0)]
    span = slice(1000, 2000)
    full = evaluate_many(score, bid, ask, tradable, points, BIN_NS, span)
    cut = evaluate_many(score[:2000], bid[:2000], ask[:2000], tradable[:2000], points, BIN_NS, span)
    assert same_rows(full, cut)
    # Fires start at the span: the same as a warmup at its first bin.
    warm = [replace(p, warmup_bins=1000) for p in points]
    direct = evaluate_many(score[:2000], bid[:2000], ask[:2000], tradable[:2000], warm, BIN_NS)
    assert same_rows(full, direct)
