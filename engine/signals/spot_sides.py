"""A gold tick grid seen from spot: per bin, a distance-weighted sum or mean of the grid over the
``k`` ticks beyond spot on each side.

Geometry (``s = spot_x2``, the mid in half ticks): tick ``t`` is above spot when ``2t > s`` and
below when ``2t < s``; a tick on the spot itself (even ``s``) is on neither side. Its distance
rank is ``d = ceil(|2t - s| / 2) - 1``: 0 for the nearest tick beyond spot on its side (the best
bid or ask under a one-tick spread), 1 for the next, and so on; a side holds ranks ``0 .. k-1``.
Weights: ``uniform`` 1, ``inverse`` 1 / (1 + d), ``exp`` exp(-d / decay_ticks). Cells that are NaN
(outside the bin's silver window, or not yet defined by gold) are skipped; a side whose finite
cells carry no weight (in particular, none at all) is NaN, and so is every side of a bin without a
spot. Sums run nearest tick first on both sides, so mirroring the book mirrors the result exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numba as nb
import numpy as np

from engine.signals.registry import ParamSpec, ParamValue, SignalError, SignalInputs

WEIGHTINGS = ("uniform", "inverse", "exp")


def side_params(grid: str, grid_doc: str, k_ticks: int, weighting: str) -> tuple[ParamSpec, ...]:
    """The parameters of a spot-sides read: which gold grid, how many ticks, how weighted."""
    return (
        ParamSpec("grid", str, grid, doc=f"gold output read, a [n_bins, n_ticks] grid: {grid_doc}"),
        ParamSpec(
            "k_ticks", int, k_ticks, minimum=1, maximum=1000, doc="ticks read on each side of spot"
        ),
        ParamSpec(
            "weighting",
            str,
            weighting,
            choices=WEIGHTINGS,
            doc="weight of a tick at distance rank d: 1, 1/(1+d) or exp(-d/decay_ticks)",
        ),
        ParamSpec(
            "decay_ticks",
            float,
            5.0,
            minimum=0.01,
            maximum=1000.0,
            doc="decay length of the exp weighting in ticks (read only by weighting=exp)",
        ),
    )


def distance_weights(weighting: str, k_ticks: int, decay_ticks: float) -> np.ndarray:
    """Weights of distance ranks ``0 .. k_ticks - 1``."""
    if weighting == "uniform":
        return np.ones(k_ticks)
    if weighting == "inverse":
        return np.array([1.0 / (1.0 + d) for d in range(k_ticks)])
    if weighting == "exp":
        # math.exp (libm) rather than np.exp: the kernels' reference computes weights the same way
        # and matches bit for bit.
        return np.array([math.exp(-d / decay_ticks) for d in range(k_ticks)])
    raise ValueError(f"unknown weighting {weighting!r} (known: {', '.join(WEIGHTINGS)})")


def gold_tick_grid(inputs: SignalInputs, signal: str, param: str, name: str) -> np.ndarray:
    """The gold output ``name`` as a float64 ``[n_bins, n_ticks]`` grid on the frame's columns."""
    where = f"signal {signal!r} parameter {param!r}"
    if name not in inputs.gold:
        available = ", ".join(sorted(inputs.gold)) or "none"
        raise SignalError(f"{where}: no gold output {name!r} (available: {available})")
    grid = np.asarray(inputs.gold[name])
    expected = (inputs.frame.n_bins, inputs.frame.n_ticks)
    if grid.shape != expected:
        raise SignalError(
            f"{where}: gold output {name!r} has shape {grid.shape}, expected {expected} "
            "(one row per bin, one column per tick of the silver frame)"
        )
    return np.ascontiguousarray(grid, dtype=np.float64)


@nb.njit(nogil=True, cache=True)
def _side_kernel(
    grid: np.ndarray,
    spot_x2: np.ndarray,
    first_tick: int,
    weights: np.ndarray,
    as_mean: bool,
    below: np.ndarray,
    above: np.ndarray,
) -> None:
    n_ticks = grid.shape[1]
    for b in range(grid.shape[0]):
        s = spot_x2[b]
        below[b] = np.nan
        above[b] = np.nan
        if s < 0:
            continue
        nearest_above = s // 2 + 1 - first_tick
        nearest_below = (s - 1) // 2 - first_tick
        sum_above = 0.0
        weight_above = 0.0
        sum_below = 0.0
        weight_below = 0.0
        for d in range(weights.shape[0]):
            column = nearest_above + d
            if 0 <= column < n_ticks:
                value = grid[b, column]
                if math.isfinite(value):
                    sum_above += weights[d] * value
                    weight_above += weights[d]
            column = nearest_below - d
            if 0 <= column < n_ticks:
                value = grid[b, column]
                if math.isfinite(value):
                    sum_below += weights[d] * value
                    weight_below += weights[d]
        if weight_above > 0.0:
            above[b] = sum_above / weight_above if as_mean else sum_above
        if weight_below > 0.0:
            below[b] = sum_below / weight_below if as_mean else sum_below


def spot_sides(
    inputs: SignalInputs, signal: str, params: Mapping[str, ParamValue], *, as_mean: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(below, above)`` per bin for the validated :func:`side_params` in ``params``: the
    weighted sum (``as_mean=False``) or weighted mean of the grid over each side's ticks."""
    grid = gold_tick_grid(inputs, signal, "grid", str(params["grid"]))
    weights = distance_weights(
        str(params["weighting"]), int(params["k_ticks"]), float(params["decay_ticks"])
    )
    frame = inputs.frame
    below = np.empty(frame.n_bins)
    above = np.empty(frame.n_bins)
    _side_kernel(
        grid,
        np.ascontiguousarray(frame.spot_x2, dtype=np.int64),
        frame.first_tick,
        weights,
        as_mean,
        below,
        above,
    )
    return below, above
