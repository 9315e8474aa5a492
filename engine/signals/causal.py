"""Causal kernels over per-bin series: the output at bin t reads inputs at bins <= t only.

NaN marks a missing input (a bin without a spot, a warm-up); each kernel says how it treats one.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

MAD_TO_SIGMA = 1.4826  # scales a median absolute deviation to the sigma of a normal distribution


def backward_difference(values: np.ndarray) -> np.ndarray:
    """``out[t] = values[t] - values[t - 1]``; NaN at bin 0 and wherever an operand is NaN."""
    out = np.full(len(values), np.nan)
    np.subtract(values[1:], values[:-1], out=out[1:])
    return out


@nb.njit(nogil=True, cache=True)
def _ema_kernel(values: np.ndarray, decay: float, out: np.ndarray) -> None:
    # Deviations from the first value still carrying weight are averaged, so a constant series
    # stays exactly constant (crossovers of a flat spot are exactly 0) and prices keep precision.
    anchor = np.nan
    numerator = 0.0
    denominator = 0.0
    for t in range(values.shape[0]):
        numerator *= decay
        denominator *= decay
        x = values[t]
        if math.isfinite(x):
            if denominator == 0.0:
                anchor = x
            numerator += x - anchor
            denominator += 1.0
        out[t] = anchor + numerator / denominator if denominator > 0.0 else np.nan


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Bias-corrected exponential moving average with ``alpha = 2 / (span + 1)``:
    ``out[t] = sum_i (1 - alpha)**(t - i) * x_i / sum_i (1 - alpha)**(t - i)`` over the finite
    ``x_i``, ``i <= t`` (NaN before the first one). Being a weighted mean of what was observed, it
    starts at the first value instead of creeping up from zero; NaN inputs are skipped while the
    weights of older values keep decaying, so the clock stays in bins."""
    if span < 1:
        raise ValueError(f"EMA span must be >= 1, got {span}")
    out = np.empty(len(values))
    _ema_kernel(np.ascontiguousarray(values, dtype=np.float64), 1.0 - 2.0 / (span + 1.0), out)
    return out


@nb.njit(nogil=True, cache=True)
def _sorted_median(window_sorted: np.ndarray, count: int) -> float:
    half = count // 2
    if count % 2 == 1:
        return float(window_sorted[half])
    return float((window_sorted[half - 1] + window_sorted[half]) / 2.0)


@nb.njit(nogil=True, cache=True)
def _deviation_rank(
    window_sorted: np.ndarray, count: int, median: float, split: int, k: int
) -> float:
    # The k-th smallest (from 0) |x - median|. Deviations of the values below the median, read
    # downwards (a(i) = median - sorted[split - 1 - i]), and of those above it, read upwards
    # (b(j) = sorted[split + j] - median), are two ascending runs: binary search how many of the
    # k + 1 smallest come from the first run, O(log n) instead of a merge.
    n_below = split
    n_above = count - split
    lo = max(0, k + 1 - n_above)
    hi = min(k + 1, n_below)
    while lo < hi:
        i = (lo + hi) // 2
        if median - window_sorted[split - 1 - i] < window_sorted[split + k - i] - median:
            lo = i + 1
        else:
            hi = i
    j = k + 1 - lo
    from_below = median - window_sorted[split - lo] if lo > 0 else -np.inf
    from_above = window_sorted[split + j - 1] - median if j > 0 else -np.inf
    return float(max(from_below, from_above))


@nb.njit(nogil=True, cache=True)
def _sorted_mad(window_sorted: np.ndarray, count: int, median: float) -> float:
    split = int(np.searchsorted(window_sorted[:count], median))
    half = count // 2
    upper = _deviation_rank(window_sorted, count, median, split, half)
    if count % 2 == 1:
        return upper
    return (_deviation_rank(window_sorted, count, median, split, half - 1) + upper) / 2.0


@nb.njit(nogil=True, cache=True)
def _robust_z_kernel(
    values: np.ndarray, window: int, min_periods: int, window_sorted: np.ndarray, out: np.ndarray
) -> None:
    count = 0
    for t in range(values.shape[0]):
        x = values[t]
        entering = math.isfinite(x)
        if t >= window and math.isfinite(values[t - window]):
            i = np.searchsorted(window_sorted[:count], values[t - window])
            if entering:
                # Slide the leaving value's slot to where x belongs: this moves only the values
                # between the two, about a third of the window for a stationary series.
                while i + 1 < count and window_sorted[i + 1] < x:
                    window_sorted[i] = window_sorted[i + 1]
                    i += 1
                while i > 0 and window_sorted[i - 1] > x:
                    window_sorted[i] = window_sorted[i - 1]
                    i -= 1
                window_sorted[i] = x
            else:
                for j in range(i, count - 1):
                    window_sorted[j] = window_sorted[j + 1]
                count -= 1
        elif entering:
            i = np.searchsorted(window_sorted[:count], x)
            for j in range(count, i, -1):
                window_sorted[j] = window_sorted[j - 1]
            window_sorted[i] = x
            count += 1
        if not entering or count < min_periods:
            out[t] = np.nan
            continue
        median = _sorted_median(window_sorted, count)
        mad = _sorted_mad(window_sorted, count, median)
        out[t] = 0.0 if mad == 0.0 else (x - median) / (MAD_TO_SIGMA * mad)


def robust_z(values: np.ndarray, window: int, min_periods: int) -> np.ndarray:
    """Trailing robust z-score: ``(x_t - median) / (1.4826 * MAD)`` over the finite values among
    bins ``t - window + 1 .. t`` (bin t included, nothing later).

    NaN where ``x_t`` is NaN or fewer than ``min_periods`` finite values are in the window. A
    window without spread (MAD 0, e.g. a book whose state did not change) gives 0, not NaN: it
    carries no evidence of a move, and a quiet stretch should read neutral rather than undefined.
    """
    if window < 1 or not 1 <= min_periods <= window:
        raise ValueError(f"need 1 <= min_periods <= window, got {min_periods} and {window}")
    out = np.empty(len(values))
    window_sorted = np.empty(max(1, min(window, len(values))))
    _robust_z_kernel(
        np.ascontiguousarray(values, dtype=np.float64), window, min_periods, window_sorted, out
    )
    return out
