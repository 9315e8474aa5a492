"""The vacuum/pressure (VP) force block written by hand: the reference for the DSL version.

``configs/gold/vp_default.yaml`` writes the same block in the gold DSL, and that spec is what
runs; this module shares no code with the DSL engine and is proved equal to it in the tests. It
works on the dense silver fields with numpy, one absolute-tick column at a time for the temporal
steps: a column's defined values, in time order, are that cell's history (the DSL's NaN
semantics), so a cell never mixes prices when spot moves.

Per cell, with the silver fields ``v_*`` (velocities) and ``a_*`` (accelerations):

    pressure  = c1 v_add + c2 max(v_rest, 0) + c3 max(a_add, 0)
    vacuum    = c4 v_pull + c5 v_fill + c6 max(-v_rest, 0) + c7 max(a_pull, 0)
    composite = (pressure - vacuum) / (|pressure| + |vacuum| + epsilon)
    rollup    = normalised blend of rolling means of composite over several windows
    d1, d2, d3 = successive differences of rollup; z1..z3 their robust z-scores
    flow_score = normalised blend of tanh(z_i / tanh_scale); flow_state = +1 / 0 / -1

and per bin the distance-weighted mean flow score over the ``band_ticks`` ticks above and below
spot, and ``vp_bias = flow_below - flow_above``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.silver_frame import SilverFrame

# numpy's SIMD tanh may differ from the C library's in the last bit; the DSL kernel uses the
# C library's (through numba), and the two are compared exactly.
_libm_tanh = np.frompyfunc(math.tanh, 1, 1)


@dataclass(frozen=True)
class VPParams:
    """The VP block's coefficients; the defaults are those of ``vp_default.yaml``."""

    pressure_weights: tuple[float, float, float] = (1.0, 0.5, 0.3)  # c1, c2, c3
    vacuum_weights: tuple[float, float, float, float] = (1.0, 1.5, 0.5, 0.3)  # c4 .. c7
    composite_epsilon: float = 1e-9
    rollup_windows: tuple[int, ...] = (5, 20, 50)
    rollup_weights: tuple[float, ...] = (5.0, 3.0, 2.0)  # normalised to sum to 1
    z_window: int = 300
    z_min_periods: int = 30
    z_scale: float = 1.4826
    z_epsilon: float = 1e-3
    tanh_scale: float = 3.0
    flow_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # d1, d2, d3; normalised
    state_threshold: float = 0.5
    band_ticks: int = 8


def vp_block(frame: SilverFrame, params: VPParams | None = None) -> dict[str, np.ndarray]:
    """The VP outputs over ``frame``, named and shaped as the default gold spec's."""
    p = params or VPParams()
    c1, c2, c3 = p.pressure_weights
    c4, c5, c6, c7 = p.vacuum_weights
    v_rest = frame.field("rest_depth_v")
    pressure = (
        c1 * frame.field("add_mass_v")
        + c2 * np.maximum(v_rest, 0.0)
        + c3 * np.maximum(frame.field("add_mass_a"), 0.0)
    )
    vacuum = (
        c4 * frame.field("pull_mass_v")
        + c5 * frame.field("fill_mass_v")
        + c6 * np.maximum(-v_rest, 0.0)
        + c7 * np.maximum(frame.field("pull_mass_a"), 0.0)
    )
    composite = (pressure - vacuum) / (np.abs(pressure) + np.abs(vacuum) + p.composite_epsilon)

    rollup_weights = _normalised(p.rollup_weights)
    rollup = rollup_weights[0] * _per_cell(composite, _rolling_mean(p.rollup_windows[0]))
    for weight, window in zip(rollup_weights[1:], p.rollup_windows[1:], strict=True):
        rollup = rollup + weight * _per_cell(composite, _rolling_mean(window))

    d1 = _per_cell(rollup, _difference)
    d2 = _per_cell(d1, _difference)
    d3 = _per_cell(d2, _difference)
    robust_z = _robust_zscore(p.z_window, p.z_min_periods, p.z_scale, p.z_epsilon)
    z1, z2, z3 = (_per_cell(d, robust_z) for d in (d1, d2, d3))

    w1, w2, w3 = _normalised(p.flow_weights)
    flow = w1 * _tanh(z1 / p.tanh_scale) + w2 * _tanh(z2 / p.tanh_scale)
    flow = flow + w3 * _tanh(z3 / p.tanh_scale)
    state = np.where(flow > p.state_threshold, 1.0, np.where(flow < -p.state_threshold, -1.0, 0.0))
    state[np.isnan(flow)] = np.nan

    flow_above = _band_mean(frame, flow, above=True, ticks=p.band_ticks)
    flow_below = _band_mean(frame, flow, above=False, ticks=p.band_ticks)
    return {
        "pressure": pressure,
        "vacuum": vacuum,
        "composite": composite,
        "composite_rollup": rollup,
        "rollup_d1": d1,
        "rollup_d2": d2,
        "rollup_d3": d3,
        "rollup_d1_z": z1,
        "rollup_d2_z": z2,
        "rollup_d3_z": z3,
        "flow_score": flow,
        "flow_state": state,
        "flow_above": flow_above,
        "flow_below": flow_below,
        "vp_bias": flow_below - flow_above,
    }


def _normalised(weights: tuple[float, ...]) -> list[float]:
    total = sum(weights)
    return [weight / total for weight in weights]


def _tanh(values: np.ndarray) -> np.ndarray:
    result: np.ndarray = _libm_tanh(values).astype(np.float64)
    return result


def _per_cell(values: np.ndarray, step: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``step`` to each column's history (its defined values in time order)."""
    out = np.full_like(values, np.nan)
    for column in range(values.shape[1]):
        defined = ~np.isnan(values[:, column])
        if defined.any():
            out[defined, column] = step(values[defined, column])
    return out


def _rolling_mean(window: int) -> Callable[[np.ndarray], np.ndarray]:
    def step(history: np.ndarray) -> np.ndarray:
        # Sum oldest to newest, as the window fills up (leading zeros add nothing).
        padded = np.concatenate([np.zeros(window - 1), history])
        total = np.zeros(len(history))
        for k in range(window):
            total = total + padded[k : k + len(history)]
        return total / np.minimum(np.arange(1, len(history) + 1), window)

    return step


def _difference(history: np.ndarray) -> np.ndarray:
    return np.concatenate([[np.nan], history[1:] - history[:-1]])


def _robust_zscore(
    window: int, min_periods: int, scale: float, epsilon: float
) -> Callable[[np.ndarray], np.ndarray]:
    def step(history: np.ndarray) -> np.ndarray:
        n_obs = len(history)
        windows = sliding_window_view(
            np.concatenate([np.full(window - 1, np.nan), history]), window
        )
        counts = np.minimum(np.arange(1, n_obs + 1), window)
        rows = np.arange(n_obs)
        lower, upper = (counts - 1) // 2, counts // 2  # the middle one or two (NaNs sort last)
        ordered = np.sort(windows, axis=1)
        median = (ordered[rows, lower] + ordered[rows, upper]) / 2.0
        deviations = np.sort(np.abs(windows - median[:, None]), axis=1)
        mad = (deviations[rows, lower] + deviations[rows, upper]) / 2.0
        denominator = scale * mad + epsilon
        with np.errstate(divide="ignore", invalid="ignore"):
            z: np.ndarray = (history - median) / denominator
        z[(counts < min_periods) | (denominator == 0.0)] = np.nan
        return z

    return step


def _band_mean(frame: SilverFrame, values: np.ndarray, *, above: bool, ticks: int) -> np.ndarray:
    """Mean of ``values`` over the ``ticks`` ticks on one side of spot, weighted 1/(1+d) by the
    distance d from the mid, summed from spot outwards."""
    spot = frame.spot_x2
    bins = np.arange(frame.n_bins)
    total = np.zeros(frame.n_bins)
    weights = np.zeros(frame.n_bins)
    for rank in range(1, ticks + 1):
        tick = spot // 2 + rank if above else (spot + 1) // 2 - rank
        column = tick - frame.first_tick
        inside = (spot >= 0) & (column >= 0) & (column < frame.n_ticks)
        x = np.full(frame.n_bins, np.nan)
        x[inside] = values[bins[inside], column[inside]]
        chosen = ~np.isnan(x)
        weight = 1.0 / (1.0 + np.abs(2 * tick - spot) * 0.5)
        total[chosen] += weight[chosen] * x[chosen]
        weights[chosen] += weight[chosen]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean: np.ndarray = np.where(weights > 0.0, total / weights, np.nan)
    return mean
