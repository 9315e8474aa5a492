"""The statistical signals (derivative, flow_threshold, ema_ensemble) and their causal kernels.

Each signal is proved equal to a slow, plain-Python reference written from its documented formula
on random books and gold grids. The references sum each side of spot nearest tick first, compute
weights with ``math`` and medians with :mod:`statistics`, i.e. the same floating-point operations
in the same order as the kernels, so robust z-scores (which amplify any last-bit difference when a
window's MAD is tiny) agree exactly and the scores to ``TOLERANCE`` (``tanh`` may differ by an ulp
between numpy and libm). The EMA reference sums its weights directly instead of recursing, so it
is held to ``EMA_TOLERANCE``: operands of about 1e3 ticks, divided by a scale floored at 1e-2.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.signals.causal import MAD_TO_SIGMA, ema, robust_z
from engine.signals.derivative import DerivativeSignal
from engine.signals.ema_ensemble import EmaEnsembleSignal
from engine.signals.flow_threshold import FlowThresholdSignal
from engine.signals.registry import (
    ParamValue,
    SignalError,
    SignalInputs,
    get_signal,
    signal_names,
    validate_params,
)
from engine.silver_frame import SilverFrame
from tests.silver_tables import TICK_SIZE, silver_frame

SIGNALS = {
    "derivative": DerivativeSignal,
    "flow_threshold": FlowThresholdSignal,
    "ema_ensemble": EmaEnsembleSignal,
}
TOLERANCE = 1e-12
EMA_TOLERANCE = 1e-9
BASE_TICK = 1000
ABSOLUTE_TICKS = 200  # gold is drawn per absolute tick BASE_TICK - 100 .. BASE_TICK + 99
ABSOLUTE_FIRST = BASE_TICK - ABSOLUTE_TICKS // 2
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- scenarios: a book path, its silver frame and gold grids on absolute ticks ----------------


@dataclass(frozen=True)
class Scenario:
    """A book path per bin plus a gold value per bin and absolute tick."""

    best_bid: tuple[int | None, ...]
    best_ask: tuple[int | None, ...]
    radius: int
    # [n_bins, ABSOLUTE_TICKS]: column j is absolute tick ABSOLUTE_FIRST + j
    gold: np.ndarray
    window_only: bool  # gold NaN outside each bin's silver window, as gold derived from silver is

    def frame(self) -> SilverFrame:
        return silver_frame(self.best_bid, self.best_ask, radius=self.radius)

    def inputs(self) -> SignalInputs:
        """The frame, with the gold as both the ``state`` and the ``flow_score`` grid."""
        frame = self.frame()
        grid = on_frame(frame, self.gold, self.window_only)
        return SignalInputs(frame=frame, gold={"state": grid, "flow_score": grid})


def on_frame(frame: SilverFrame, gold: np.ndarray, window_only: bool) -> np.ndarray:
    """The absolute-tick gold on the frame's columns ``first_tick + c``."""
    start = frame.first_tick - ABSOLUTE_FIRST
    grid = gold[:, start : start + frame.n_ticks].copy()
    if window_only:
        grid[np.isnan(frame.field("add_mass"))] = np.nan
    return grid


def book_path(
    rng: np.random.Generator, n_bins: int, n_missing: int
) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
    """A random walk of the best bid with spreads of 1-3 ticks, the first ``n_missing`` bins
    empty and about one bin in ten invalid (a side missing or the book crossed)."""
    bids: list[int | None] = []
    asks: list[int | None] = []
    bid = BASE_TICK
    for b in range(n_bins):
        bid = int(np.clip(bid + rng.integers(-2, 3), BASE_TICK - 40, BASE_TICK + 40))
        level: int | None = bid
        ask: int | None = bid + int(rng.choice([1, 1, 1, 2, 3]))
        if b < n_missing:
            level, ask = None, None
        elif rng.random() < 0.1:
            fault = rng.integers(3)
            if fault == 0:
                level = None
            elif fault == 1:
                ask = None
            else:
                ask = bid - 1
        bids.append(level)
        asks.append(ask)
    return tuple(bids), tuple(asks)


def gold_values(
    rng: np.random.Generator, n_bins: int, discrete: bool, nan_rate: float
) -> np.ndarray:
    """Gold per bin and absolute tick: states in {-1, 0, 1} or continuous scores in [-1, 1]."""
    shape = (n_bins, ABSOLUTE_TICKS)
    gold = rng.integers(-1, 2, shape).astype(float) if discrete else rng.uniform(-1, 1, shape)
    gold[rng.random(shape) < nan_rate] = np.nan
    return gold


@st.composite
def scenarios(draw: st.DrawFn, min_bins: int = 1) -> Scenario:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_bins = draw(st.integers(min_bins, 60))
    bids, asks = book_path(rng, n_bins, draw(st.integers(0, 4)))
    gold = gold_values(rng, n_bins, draw(st.booleans()), draw(st.sampled_from([0.0, 0.0, 0.1])))
    return Scenario(bids, asks, draw(st.integers(1, 6)), gold, draw(st.booleans()))


def side_params() -> st.SearchStrategy[dict[str, ParamValue]]:
    return st.fixed_dictionaries(
        {
            "k_ticks": st.integers(1, 9),
            "weighting": st.sampled_from(["uniform", "inverse", "exp"]),
            "decay_ticks": st.floats(0.5, 8.0),
        }
    )


@st.composite
def derivative_params(draw: st.DrawFn) -> dict[str, ParamValue]:
    window = draw(st.integers(2, 20))
    weights = draw(
        st.lists(st.sampled_from([0.0, 0.2, 0.5, 1.0]), min_size=3, max_size=3).filter(any)
    )
    return {
        **draw(side_params()),
        "z_window": window,
        "z_min_periods": draw(st.integers(1, window)),
        "w_d1": weights[0],
        "w_d2": weights[1],
        "w_d3": weights[2],
    }


@st.composite
def ema_params(draw: st.DrawFn) -> dict[str, ParamValue]:
    params: dict[str, ParamValue] = {}
    for i in (1, 2, 3):
        fast = draw(st.integers(1, 12))
        params[f"fast_span_{i}"] = fast
        params[f"slow_span_{i}"] = fast + draw(st.integers(1, 30))
    params["scale_span"] = draw(st.integers(1, 40))
    params["min_scale_ticks"] = draw(st.sampled_from([0.01, 0.5, 2.0]))
    params["gain"] = draw(st.floats(0.0, 3.0))
    return params


def score(signal: str, inputs: SignalInputs, params: dict[str, ParamValue]) -> np.ndarray:
    return get_signal(signal).score(inputs, params)


def scorer(signal: str, params: dict[str, ParamValue]) -> Callable[[SignalInputs], np.ndarray]:
    return lambda inputs: score(signal, inputs, params)


# -- slow references, from the documented formulas --------------------------------------------


def reference_weight(weighting: str, d: int, decay_ticks: float) -> float:
    if weighting == "uniform":
        return 1.0
    if weighting == "inverse":
        return 1 / (1 + d)
    return math.exp(-d / decay_ticks)


def reference_sides(
    frame: SilverFrame, grid: np.ndarray, params: dict[str, ParamValue], as_mean: bool
) -> tuple[list[float], list[float]]:
    """Per bin, the weighted sum or mean of the finite cells at distance rank < k below and above
    spot, scanning every column and placing it by its absolute tick."""
    k, weighting, decay = (
        int(params["k_ticks"]),
        str(params["weighting"]),
        float(params["decay_ticks"]),
    )
    below: list[float] = []
    above: list[float] = []
    for b in range(frame.n_bins):
        s = int(frame.spot_x2[b])
        cells: dict[int, list[tuple[int, float]]] = {-1: [], 1: []}
        for c in range(frame.n_ticks):
            tick = frame.first_tick + c
            if s < 0 or 2 * tick == s or not math.isfinite(grid[b, c]):
                continue
            rank = math.ceil(abs(2 * tick - s) / 2) - 1
            if rank < k:
                cells[1 if 2 * tick > s else -1].append((rank, float(grid[b, c])))
        for side, out in ((-1, below), (1, above)):
            total = weight = 0.0
            for rank, value in sorted(cells[side]):
                w = reference_weight(weighting, rank, decay)
                total += w * value
                weight += w
            if weight == 0.0:
                out.append(math.nan)
            else:
                out.append(total / weight if as_mean else total)
    return below, above


def reference_robust_z(values: Sequence[float], window: int, min_periods: int) -> list[float]:
    out = []
    for t, x in enumerate(values):
        past = [v for v in values[max(0, t - window + 1) : t + 1] if math.isfinite(v)]
        if not math.isfinite(x) or len(past) < min_periods:
            out.append(math.nan)
            continue
        median = statistics.median(past)
        mad = statistics.median([abs(v - median) for v in past])
        out.append(0.0 if mad == 0 else (x - median) / (1.4826 * mad))
    return out


def reference_derivative(inputs: SignalInputs, params: dict[str, ParamValue]) -> list[float]:
    frame = inputs.frame
    below, above = reference_sides(frame, np.asarray(inputs.gold["state"]), params, False)
    series = [lo - hi for lo, hi in zip(below, above, strict=True)]
    weights = [float(params[f"w_d{n}"]) for n in (1, 2, 3)]
    total = weights[0] + weights[1] + weights[2]
    blend = [0.0] * frame.n_bins
    for weight in weights:
        series = [math.nan] + [series[t] - series[t - 1] for t in range(1, len(series))]
        if weight > 0:
            z = reference_robust_z(series, int(params["z_window"]), int(params["z_min_periods"]))
            blend = [acc + weight / total * value for acc, value in zip(blend, z, strict=True)]
    return [math.tanh(value) for value in blend]


def reference_flow(inputs: SignalInputs, params: dict[str, ParamValue]) -> list[float]:
    below, above = reference_sides(
        inputs.frame, np.asarray(inputs.gold["flow_score"]), params, True
    )
    halves = [(lo - hi) / 2 for lo, hi in zip(below, above, strict=True)]
    return [math.nan if math.isnan(h) else min(1.0, max(-1.0, h)) for h in halves]


def reference_ema(values: Sequence[float], span: int) -> list[float]:
    """The weighted mean ``sum (1 - a)**(t - i) x_i / sum (1 - a)**(t - i)`` over finite x_i."""
    keep = 1 - 2 / (span + 1)
    out = []
    for t in range(len(values)):
        seen = [(keep ** (t - i), x) for i, x in enumerate(values[: t + 1]) if math.isfinite(x)]
        weight = sum(w for w, _ in seen)
        out.append(sum(w * x for w, x in seen) / weight if weight > 0 else math.nan)
    return out


def reference_ema_ensemble(inputs: SignalInputs, params: dict[str, ParamValue]) -> list[float]:
    spot = [s / 2 if s >= 0 else math.nan for s in inputs.frame.spot_x2]
    crossover = [0.0] * len(spot)
    for i in (1, 2, 3):
        fast = reference_ema(spot, int(params[f"fast_span_{i}"]))
        slow = reference_ema(spot, int(params[f"slow_span_{i}"]))
        crossover = [c + (f - s) / 3 for c, f, s in zip(crossover, fast, slow, strict=True)]
    moves = [math.nan] + [abs(spot[t] - spot[t - 1]) for t in range(1, len(spot))]
    floor = float(params["min_scale_ticks"])
    scale = [
        max(v, floor) if math.isfinite(v) else floor
        for v in reference_ema(moves, int(params["scale_span"]))
    ]
    gain = float(params["gain"])
    return [
        math.tanh(gain * c / sc) if s >= 0 else math.nan
        for c, sc, s in zip(crossover, scale, inputs.frame.spot_x2, strict=True)
    ]


def assert_same_scores(fast: np.ndarray, reference: Sequence[float], tolerance: float) -> None:
    expected = np.array(reference, dtype=float)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(expected))
    np.testing.assert_allclose(fast, expected, rtol=0, atol=tolerance, equal_nan=True)


# -- the registry and its parameter schemas ---------------------------------------------------


SIDE_SCHEMA = {"grid": str, "k_ticks": int, "weighting": str, "decay_ticks": float}
SCHEMAS: dict[str, dict[str, type]] = {
    "derivative": {
        **SIDE_SCHEMA,
        "z_window": int,
        "z_min_periods": int,
        "w_d1": float,
        "w_d2": float,
        "w_d3": float,
    },
    "flow_threshold": SIDE_SCHEMA,
    "ema_ensemble": {
        **{f"{speed}_span_{i}": int for i in (1, 2, 3) for speed in ("fast", "slow")},
        "scale_span": int,
        "min_scale_ticks": float,
        "gain": float,
    },
}


def test_registry_holds_the_three_signals_with_typed_parameters() -> None:
    assert set(SIGNALS) <= set(signal_names())
    for name, kind in SIGNALS.items():
        signal = get_signal(name)
        assert isinstance(signal, kind)
        assert signal.name == name
        assert {spec.name: spec.kind for spec in signal.params} == SCHEMAS[name]
        defaults = validate_params(name, {})
        assert list(defaults) == [p.name for p in signal.params]
        for spec in signal.params:
            assert spec.kind in (int, float, str)
            assert spec.doc
            assert type(spec.default) is spec.kind
            assert spec.check(name, spec.default) == spec.default
            if spec.kind is not str:
                assert spec.minimum is not None
                assert spec.maximum is not None
    assert validate_params("derivative", {})["grid"] == "state"
    assert validate_params("flow_threshold", {})["grid"] == "flow_score"


@pytest.mark.parametrize(
    ("signal", "param", "value", "message"),
    [
        ("derivative", "k_tick", 3, "has no parameter 'k_tick'"),
        ("derivative", "grid", 3, "parameter 'grid': expected a string"),
        ("derivative", "w_d1", "0.5", "parameter 'w_d1': expected a number"),
        ("derivative", "k_ticks", 0, "parameter 'k_ticks': 0 is below the minimum"),
        ("derivative", "z_window", True, "parameter 'z_window': expected an integer"),
        ("derivative", "weighting", "gauss", "parameter 'weighting': 'gauss' is not one of"),
        ("flow_threshold", "k_ticks", 2.0, "parameter 'k_ticks': expected an integer"),
        ("flow_threshold", "decay_ticks", 1e9, "parameter 'decay_ticks': 1000000000.0 is above"),
        ("flow_threshold", "grid", None, "parameter 'grid': expected a string"),
        ("ema_ensemble", "gain", "1", "parameter 'gain': expected a number"),
        ("ema_ensemble", "fast_span_1", True, "parameter 'fast_span_1': expected an integer"),
        ("ema_ensemble", "scale_span", 0, "parameter 'scale_span': 0 is below the minimum"),
        ("ema_ensemble", "spans", "4,16", "has no parameter 'spans'"),
    ],
)
def test_validate_params_rejects_unknown_and_ill_typed(
    signal: str, param: str, value: object, message: str
) -> None:
    with pytest.raises(SignalError, match=f"signal '{signal}' {message}"):
        validate_params(signal, {param: value})


def test_score_validates_its_parameters() -> None:
    inputs = Scenario(
        (BASE_TICK,), (BASE_TICK + 1,), 2, np.zeros((1, ABSOLUTE_TICKS)), True
    ).inputs()
    with pytest.raises(SignalError, match="signal 'flow_threshold' has no parameter 'threshold'"):
        score("flow_threshold", inputs, {"threshold": 0.5})


def test_parameter_combinations_and_gold_inputs_are_checked() -> None:
    inputs = Scenario(
        (BASE_TICK,), (BASE_TICK + 1,), 2, np.zeros((1, ABSOLUTE_TICKS)), True
    ).inputs()
    with pytest.raises(SignalError, match="'z_min_periods': 30 exceeds z_window 20"):
        score("derivative", inputs, {"z_window": 20, "z_min_periods": 30})
    with pytest.raises(SignalError, match="w_d1, w_d2, w_d3: all are zero"):
        score("derivative", inputs, {"w_d1": 0.0, "w_d2": 0.0, "w_d3": 0.0})
    with pytest.raises(SignalError, match="'fast_span_2', 'slow_span_2': the fast span 64 must"):
        score("ema_ensemble", inputs, {"fast_span_2": 64})
    with pytest.raises(SignalError, match="parameter 'grid': no gold output 'vacuum'"):
        score("flow_threshold", inputs, {"grid": "vacuum"})
    flat = replace(inputs, gold={"state": np.zeros(1)})
    with pytest.raises(
        SignalError, match=r"'derivative' parameter 'grid': gold output 'state' has"
    ):
        score("derivative", flat, {})


# -- each signal equals its reference ---------------------------------------------------------


@EXAMPLES
@given(scenarios(), derivative_params())
def test_derivative_equals_reference(scenario: Scenario, params: dict[str, ParamValue]) -> None:
    inputs = scenario.inputs()
    assert_same_scores(
        score("derivative", inputs, params), reference_derivative(inputs, params), TOLERANCE
    )


@EXAMPLES
@given(scenarios(), side_params())
def test_flow_threshold_equals_reference(scenario: Scenario, params: dict[str, ParamValue]) -> None:
    inputs = scenario.inputs()
    fast = score("flow_threshold", inputs, params)
    assert_same_scores(fast, reference_flow(inputs, params), TOLERANCE)
    assert np.all(np.abs(fast[~np.isnan(fast)]) <= 1.0)


@EXAMPLES
@given(scenarios(), ema_params())
def test_ema_ensemble_equals_reference(scenario: Scenario, params: dict[str, ParamValue]) -> None:
    inputs = scenario.inputs()
    fast = score("ema_ensemble", inputs, params)
    assert_same_scores(fast, reference_ema_ensemble(inputs, params), EMA_TOLERANCE)


# -- causality ---------------------------------------------------------------------------------


def with_new_future(scenario: Scenario, t: int, seed: int) -> Scenario:
    """The same bins up to ``t``; a different book and different gold after it. Gold stays NaN
    outside each bin's window: the frame's columns span every bin's window, so cells outside a
    bin's own window would otherwise exist or not depending on where later bins' windows are."""
    rng = np.random.default_rng(seed)
    n_bins = len(scenario.best_bid)
    bids, asks = book_path(rng, n_bins, 0)
    gold = scenario.gold.copy()
    gold[t + 1 :] = gold_values(rng, n_bins, False, 0.0)[t + 1 :]
    return replace(
        scenario,
        window_only=True,
        best_bid=scenario.best_bid[: t + 1] + bids[t + 1 :],
        best_ask=scenario.best_ask[: t + 1] + asks[t + 1 :],
        gold=gold,
    )


def future_changes_past(
    score_of: Callable[[SignalInputs], np.ndarray], scenario: Scenario, t: int, seed: int
) -> bool:
    before = score_of(replace(scenario, window_only=True).inputs())[: t + 1]
    after = score_of(with_new_future(scenario, t, seed).inputs())[: t + 1]
    return not np.array_equal(before, after, equal_nan=True)


CAUSAL_PARAMS: dict[str, dict[str, ParamValue]] = {
    "derivative": {"z_window": 8, "z_min_periods": 2},
    "flow_threshold": {},
    "ema_ensemble": {"fast_span_1": 2, "slow_span_1": 5, "scale_span": 5},
}


@EXAMPLES
@given(scenarios(min_bins=2), st.data())
def test_scores_use_no_future_bins(scenario: Scenario, data: st.DataObject) -> None:
    t = data.draw(st.integers(0, len(scenario.best_bid) - 2))
    seed = data.draw(st.integers(0, 2**32 - 1))
    for name, params in CAUSAL_PARAMS.items():
        assert not future_changes_past(scorer(name, params), scenario, t, seed), name


def test_causality_check_catches_a_planted_look_ahead() -> None:
    rng = np.random.default_rng(7)
    bids, asks = book_path(rng, 60, 0)
    scenario = Scenario(bids, asks, 5, gold_values(rng, 60, False, 0.0), True)
    for name, params in CAUSAL_PARAMS.items():
        honest = scorer(name, params)

        def peeking(inputs: SignalInputs, honest: Callable[..., np.ndarray] = honest) -> np.ndarray:
            return np.roll(honest(inputs), -1)  # bin t reads the score of bin t + 1

        assert not future_changes_past(honest, scenario, 30, 1), name
        assert future_changes_past(peeking, scenario, 30, 1), name


# -- robust z -----------------------------------------------------------------------------------


def test_robust_z_of_a_known_window() -> None:
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), 5, 3)
    np.testing.assert_array_equal(z[:2], [np.nan, np.nan])
    assert z[2] == pytest.approx(1 / MAD_TO_SIGMA)  # 1, 2, 3: median 2, MAD 1
    assert z[3] == pytest.approx(1.5 / MAD_TO_SIGMA)  # 1..4: median 2.5, deviations 1.5, 0.5: MAD 1
    assert z[4] == pytest.approx(97 / MAD_TO_SIGMA)  # 1..4, 100: median 3, MAD 1


def test_robust_z_window_min_periods_and_flat_windows() -> None:
    values = np.array([1e6, 1.0, np.nan, 2.0, 3.0, 3.0, 3.0, 3.0])
    z = robust_z(values, 3, 2)
    # Bin 1: {1e6, 1}; bin 2 is NaN; bin 3: {1, 2} (1e6 has left the window, the NaN not counted).
    assert np.isnan(z[0])
    assert np.isnan(z[2])
    assert z[1] == pytest.approx((1.0 - 500000.5) / (MAD_TO_SIGMA * 499999.5))
    assert z[3] == pytest.approx(0.5 / (MAD_TO_SIGMA * 0.5))
    assert z[7] == 0.0  # a window without spread reads neutral
    np.testing.assert_array_equal(np.isnan(robust_z(values, 3, 3)), [1, 1, 1, 1, 1, 0, 0, 0])


@EXAMPLES
@given(
    st.lists(st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0, np.nan]), min_size=1, max_size=50),
    st.integers(1, 12),
    st.data(),
)
def test_robust_z_equals_reference_and_reads_only_the_past(
    values: list[float], window: int, data: st.DataObject
) -> None:
    min_periods = data.draw(st.integers(1, window))
    z = robust_z(np.array(values), window, min_periods)
    np.testing.assert_array_equal(z, reference_robust_z(values, window, min_periods))
    t = data.draw(st.integers(0, len(values) - 1))
    changed = np.array(values)
    changed[t + 1 :] = data.draw(st.sampled_from([np.nan, -50.0, 1e9]))
    np.testing.assert_array_equal(robust_z(changed, window, min_periods)[: t + 1], z[: t + 1])


@EXAMPLES
@given(
    st.lists(st.floats(-1e3, 1e3) | st.just(np.nan), min_size=1, max_size=40), st.integers(1, 30)
)
def test_ema_equals_its_weighted_mean_definition(values: list[float], span: int) -> None:
    fast = ema(np.array(values), span)
    np.testing.assert_allclose(fast, reference_ema(values, span), rtol=1e-12, atol=1e-9)


# -- symmetry, direction, missing spot ----------------------------------------------------------


def mirrored(frame: SilverFrame, grid: np.ndarray) -> np.ndarray:
    """The grid reflected around each bin's spot: tick t takes the value of tick spot_x2 - t."""
    out = np.full_like(grid, np.nan)
    columns = np.arange(frame.n_ticks)
    for b in range(frame.n_bins):
        if frame.spot_x2[b] < 0:
            continue
        source = frame.spot_x2[b] - (frame.first_tick + columns) - frame.first_tick
        inside = (source >= 0) & (source < frame.n_ticks)
        out[b, inside] = grid[b, source[inside]]
    return out


@EXAMPLES
@given(scenarios(), derivative_params())
def test_mirroring_the_book_flips_the_sign(
    scenario: Scenario, params: dict[str, ParamValue]
) -> None:
    inputs = replace(scenario, window_only=True).inputs()
    reflected = mirrored(inputs.frame, inputs.gold["state"])
    flipped = replace(inputs, gold={"state": reflected, "flow_score": reflected})
    for name, signal_params in (
        ("derivative", params),
        ("flow_threshold", {key: params[key] for key in ("k_ticks", "weighting", "decay_ticks")}),
    ):
        original = score(name, inputs, signal_params)
        np.testing.assert_allclose(score(name, flipped, signal_params), -original, atol=TOLERANCE)


def test_pressure_below_and_vacuum_above_score_up() -> None:
    n_bins = 40
    frame = silver_frame([BASE_TICK] * n_bins, [BASE_TICK + 1] * n_bins, radius=4)
    ticks = frame.first_tick + np.arange(frame.n_ticks)
    build = (np.arange(n_bins, dtype=float)[:, None] / n_bins) ** 2  # a tilt that accelerates
    state = np.where(ticks <= BASE_TICK, build, -build)  # pressure under spot, vacuum over it
    inputs = SignalInputs(frame=frame, gold={"state": state, "flow_score": state})
    up = score("derivative", inputs, {"z_min_periods": 5, "w_d1": 1.0, "w_d2": 0.0, "w_d3": 0.0})
    assert up[-1] > 0.5
    assert np.all(score("flow_threshold", inputs, {})[1:] > 0)


def spot_path(spots_x2: Sequence[int]) -> SilverFrame:
    """A book with a one- or two-tick spread whose spot_x2 follows ``spots_x2``."""
    bids = [s // 2 if s % 2 else s // 2 - 1 for s in spots_x2]
    return silver_frame(bids, [s - bid for s, bid in zip(spots_x2, bids, strict=True)])


def test_ema_ensemble_rises_on_a_rising_spot_and_falls_on_a_falling_one() -> None:
    flat = [2 * BASE_TICK + 1] * 30
    rise = [2 * BASE_TICK + 1 + 2 * (i // 3) for i in range(1, 301)]
    fall = [2 * flat[0] - s for s in rise]
    params: dict[str, ParamValue] = {"scale_span": 100}
    rising = score("ema_ensemble", SignalInputs(spot_path(flat + rise), {}), params)
    falling = score("ema_ensemble", SignalInputs(spot_path(flat + fall), {}), params)
    np.testing.assert_array_equal(rising[:30], 0.0)
    assert rising[40] > 0
    assert rising[-1] > 0.5
    np.testing.assert_array_equal(falling, -rising)


def test_scores_are_nan_where_the_spot_is_missing() -> None:
    bids: list[int | None] = [None, None, BASE_TICK, None, *[BASE_TICK + i % 3 for i in range(20)]]
    asks: list[int | None] = [
        None,
        BASE_TICK + 5,
        None,
        None,
        *[BASE_TICK + 2 + i % 3 for i in range(20)],
    ]
    frame = silver_frame(bids, asks, radius=4)
    rng = np.random.default_rng(3)
    grid = rng.uniform(-1, 1, (frame.n_bins, frame.n_ticks))
    inputs = SignalInputs(frame=frame, gold={"state": grid, "flow_score": grid})
    first_spot = 4  # bins 0-3: empty, one-sided, one-sided, empty (the book was never valid)
    params: dict[str, dict[str, ParamValue]] = {
        "derivative": {"z_min_periods": 1},
        "flow_threshold": {},
        "ema_ensemble": {},
    }
    warm_up = {"derivative": 3, "flow_threshold": 0, "ema_ensemble": 0}  # D3 needs 3 earlier bins
    for name, signal_params in params.items():
        scores = score(name, inputs, signal_params)
        assert np.all(np.isnan(scores[:first_spot])), name
        assert np.all(np.isfinite(scores[first_spot + warm_up[name] :])), name


# -- speed -------------------------------------------------------------------------------------


def test_each_signal_scores_a_session_well_under_a_second() -> None:
    n_bins = 36_000
    walk = np.round(3 * np.sin(np.arange(n_bins) / 500.0)).astype(int) + BASE_TICK
    frame = silver_frame(walk.tolist(), (walk + 1).tolist(), radius=64)
    rng = np.random.default_rng(11)
    flow = rng.uniform(-1, 1, (n_bins, frame.n_ticks))
    inputs = SignalInputs(frame=frame, gold={"state": np.sign(flow), "flow_score": flow})
    assert 128 <= frame.n_ticks <= 140
    for name in SIGNALS:
        score(name, inputs, {})  # compile (or load from the cache) before timing
        started = time.perf_counter()
        score(name, inputs, {})
        assert time.perf_counter() - started < 1.0, name


def test_silver_frame_of_the_tables_uses_the_silver_conventions() -> None:
    frame = silver_frame(
        [None, BASE_TICK, BASE_TICK, None],
        [None, BASE_TICK + 1, BASE_TICK + 2, BASE_TICK],
        radius=2,
    )
    np.testing.assert_array_equal(
        frame.spot_x2, [-1, 2 * BASE_TICK + 1, 2 * BASE_TICK + 2, 2 * BASE_TICK + 2]
    )
    np.testing.assert_array_equal(frame.book_valid, [False, True, True, False])
    assert frame.first_tick == BASE_TICK - 1
    assert frame.n_ticks == 5
    assert frame.table["best_bid"][1].as_py() == BASE_TICK * TICK_SIZE
