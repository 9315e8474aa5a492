"""Numba kernels of gold: one streaming step per bin, the same for batch and incremental runs.

A compiled graph is a table of nodes in evaluation order (``nodes[k, N_*]``, int64), the input
lists (``node_inputs``, node indices) and the float parameters (``fparams``). Each bin the step
evaluates every node over the cells of the bin's silver window ``[first, first + n)`` — columns of
an absolute-tick range, so a cell's history never mixes prices when spot moves:

* grid values of the current bin live in ``rows[slot, column]``, series values in
  ``series[slot, 0]``: a series is a one-column grid that broadcasts (read with stride 0), so
  one loop serves both; a grid value outside the window is stale and never read;
* temporal state is per cell: ``cell_state[column, offset:]`` for grid nodes and
  ``series_state[0, offset:]`` for series nodes; a fresh cell is all zeros.

NaN semantics: an elementwise operator returns NaN when an input is NaN; a spatial reduction
skips undefined cells. A temporal operator treats NaN as *missing*: it returns NaN and leaves
its state alone, so its history is the sequence of bins in which its input was defined (a
rolling window holds the last ``window`` defined values, ``diff`` subtracts the previous defined
value). Hence cells outside the silver window cost nothing and their state is exactly that of a
cell the engine has never seen.

Sums run in a fixed order (oldest to newest in time; from spot outwards in a band, ascending in a
neighbourhood) and window statistics are recomputed from the stored values rather than kept as
running totals, so results carry no drift, do not depend on how long a cell has been observed,
and a reference that adds in the same order gets the same bits.
"""

from __future__ import annotations

import math

import numpy as np

from engine.jit import hot_kernel

# Opcodes, grouped so a range test picks the family.
OP_SOURCE = 0
OP_ADD = 1
OP_SUB = 2
OP_MUL = 3
OP_DIV = 4
OP_ABS = 5
OP_LINEAR = 6
OP_CLIP = 7
OP_TANH = 8
OP_STATE = 9  # last elementwise op
OP_ROLLING_SUM = 10
OP_ROLLING_MEAN = 11
OP_EMA = 12
OP_DIFF = 13
OP_ZSCORE = 14
OP_ROBUST_ZSCORE = 15  # last temporal op
OP_BAND = 16
OP_NEIGHBOURHOOD = 17

# Node table columns.
N_OP = 0
N_GRID = 1  # 1: grid value in rows[slot]; 0: series value in series[slot]
N_SLOT = 2
N_IN_START = 3  # first input in node_inputs
N_IN_COUNT = 4
N_FPARAM = 5  # first float parameter in fparams
N_STATE = 6  # offset of the node's temporal state in its cell's state row
N_I0 = 7  # integer parameters, meaning per op (see the compiler)
N_I1 = 8
N_I2 = 9
N_I3 = 10
N_I4 = 11
NODE_COLUMNS = 12

# Integer parameter codes.
SIDE_BELOW = -1
SIDE_BOTH = 0
SIDE_ABOVE = 1
REDUCE_SUM = 0
REDUCE_MEAN = 1
WEIGHT_NONE = 0
WEIGHT_INVERSE = 1
WEIGHT_EXPONENTIAL = 2


def state_size(op: int, window: int) -> int:
    """Float64 slots one cell's state needs for a temporal op (``window``: window or lag)."""
    if op == OP_EMA:
        return 2  # [seen, value]
    if op == OP_ROBUST_ZSCORE:
        return 3 + 2 * window  # [count, ring buffer, sorted window, median, MAD]
    return 1 + window  # [count, ring buffer]


@hot_kernel
def _elementwise(
    op: int,
    k: int,
    nodes: np.ndarray,
    node_inputs: np.ndarray,
    fparams: np.ndarray,
    rows: np.ndarray,
    series: np.ndarray,
    out: np.ndarray,
    first: int,
    end: int,
) -> None:
    """One elementwise node over columns ``[first, end)``; a series input (stride 0) broadcasts."""
    start = nodes[k, N_IN_START]
    count = nodes[k, N_IN_COUNT]
    f = nodes[k, N_FPARAM]
    node = node_inputs[start]
    grid = nodes[node, N_GRID]
    x = rows[nodes[node, N_SLOT]] if grid == 1 else series[nodes[node, N_SLOT]]
    if op == OP_LINEAR:
        for column in range(first, end):
            out[column] = fparams[f] * x[column * grid]
    else:
        for column in range(first, end):
            out[column] = x[column * grid]
    for i in range(1, count):
        node = node_inputs[start + i]
        grid = nodes[node, N_GRID]
        y = rows[nodes[node, N_SLOT]] if grid == 1 else series[nodes[node, N_SLOT]]
        if op == OP_ADD:
            for column in range(first, end):
                out[column] += y[column * grid]
        elif op == OP_SUB:
            for column in range(first, end):
                out[column] -= y[column * grid]
        elif op == OP_MUL:
            for column in range(first, end):
                out[column] *= y[column * grid]
        elif op == OP_DIV:
            epsilon = fparams[f]
            for column in range(first, end):
                denominator = y[column * grid] + epsilon
                out[column] = np.nan if denominator == 0.0 else out[column] / denominator
        else:  # OP_LINEAR
            weight = fparams[f + i]
            for column in range(first, end):
                out[column] += weight * y[column * grid]
    if op == OP_LINEAR:
        bias = fparams[f + count]
        for column in range(first, end):
            out[column] += bias
    elif op == OP_ABS:
        for column in range(first, end):
            out[column] = abs(out[column])
    elif op == OP_CLIP:
        lower = fparams[f]
        upper = fparams[f + 1]
        for column in range(first, end):
            value = out[column]
            if value < lower:
                out[column] = lower
            elif value > upper:
                out[column] = upper
    elif op == OP_TANH:
        scale = fparams[f]
        for column in range(first, end):
            out[column] = math.tanh(out[column] / scale)
    elif op == OP_STATE:  # +1 pressure, -1 vacuum, 0 neutral
        threshold = fparams[f]
        for column in range(first, end):
            value = out[column]
            if value > threshold:
                out[column] = 1.0
            elif value < -threshold:
                out[column] = -1.0
            elif not math.isnan(value):
                out[column] = 0.0


@hot_kernel
def _push(cell: np.ndarray, off: int, window: int, x: float) -> float:
    """Append ``x`` to a cell's ring buffer of ``window`` values (count at ``cell[off]``);
    returns the value it overwrote."""
    count = int(cell[off])
    position = off + 1 + count % window
    old = float(cell[position])
    cell[position] = x
    cell[off] = count + 1
    return old


@hot_kernel
def _window_sum(cell: np.ndarray, off: int, window: int, n: int) -> float:
    """Sum of the last ``n`` values of a ring buffer, oldest first."""
    count = int(cell[off])
    ring = off + 1
    total = 0.0
    start = (count - n) % window
    stop = min(start + n, window)
    for j in range(start, stop):
        total += cell[ring + j]
    for j in range(n - (stop - start)):
        total += cell[ring + j]
    return total


@hot_kernel
def _window_squares(cell: np.ndarray, off: int, window: int, n: int, mean: float) -> float:
    """Sum of squared deviations from ``mean`` of the last ``n`` values, oldest first."""
    count = int(cell[off])
    ring = off + 1
    total = 0.0
    start = (count - n) % window
    stop = min(start + n, window)
    for j in range(start, stop):
        deviation = cell[ring + j] - mean
        total += deviation * deviation
    for j in range(n - (stop - start)):
        deviation = cell[ring + j] - mean
        total += deviation * deviation
    return total


@hot_kernel
def _lower_bound(values: np.ndarray, n: int, value: float) -> int:
    """Index of the first of the ``n`` sorted ``values`` that is >= ``value``; the loop has no
    data-dependent branch (a select instead), since the comparisons are unpredictable."""
    if n == 0:
        return 0
    low = 0
    length = n
    while length > 1:
        half = length // 2
        low = low + half if values[low + half - 1] < value else low
        length -= half
    return low + 1 if values[low] < value else low


@hot_kernel
def _sorted_insert(window: np.ndarray, n: int, old: float, full: bool, x: float) -> None:
    """Put ``x`` into the sorted ``window`` of ``n`` values, replacing ``old`` when ``full``.

    Both positions come from bisection and the values between them move as one block; the
    block is a view indexed from 0 so the compiler can vectorise the move.
    """
    target = _lower_bound(window, n, x)
    if full:
        position = _lower_bound(window, n, old)
        if x > old:
            target -= 1  # old, below x, leaves
            block = window[position : target + 1]
            for j in range(block.shape[0] - 1):
                block[j] = block[j + 1]
        else:
            block = window[target : position + 1]
            for j in range(block.shape[0] - 1, 0, -1):
                block[j] = block[j - 1]
    else:
        block = window[target : n + 1]
        for j in range(block.shape[0] - 1, 0, -1):
            block[j] = block[j - 1]
    window[target] = x


@hot_kernel
def _median_deviation(window: np.ndarray, n: int, median: float) -> float:
    """The median of ``|s_i - median|`` over the sorted ``window`` ``s`` of ``n`` values.

    Below ``split`` (the first value >= median) the deviations ``median - s_i`` grow leftwards,
    from ``split`` on ``s_i - median`` grow rightwards: the middle of two sorted sequences,
    found by bisection in O(log n) instead of sorting the deviations.
    """
    split = _lower_bound(window, n, median)
    n_left = split
    n_right = n - split
    take = n // 2  # the smallest ``take`` deviations: i from the left, take - i from the right
    low = max(0, take - n_right)
    high = min(take, n_left)
    while True:
        i = (low + high) // 2
        j = take - i
        left_next = median - window[split - 1 - i] if i < n_left else np.inf
        left_last = median - window[split - i] if i > 0 else -np.inf
        right_next = window[split + j] - median if j < n_right else np.inf
        right_last = window[split + j - 1] - median if j > 0 else -np.inf
        if left_last > right_next:
            high = i - 1
        elif right_last > left_next:
            low = i + 1
        else:
            break
    upper = min(left_next, right_next)  # deviation number n // 2 (0-based) in sorted order
    if n % 2 == 1:
        return upper
    return (max(left_last, right_last) + upper) / 2.0


@hot_kernel
def _rolling(
    cell: np.ndarray, off: int, window: int, min_periods: int, mean: bool, x: float
) -> float:
    _push(cell, off, window, x)
    n = min(int(cell[off]), window)
    if n < min_periods:
        return np.nan
    total = _window_sum(cell, off, window, n)
    return total / n if mean else total


@hot_kernel
def _ema(cell: np.ndarray, off: int, alpha: float, x: float) -> float:
    if cell[off] == 0.0:
        cell[off] = 1.0
        cell[off + 1] = x
    else:
        cell[off + 1] += alpha * (x - cell[off + 1])
    return float(cell[off + 1])


@hot_kernel
def _diff(cell: np.ndarray, off: int, lag: int, x: float) -> float:
    seen = int(cell[off])
    old = _push(cell, off, lag, x)
    return x - old if seen >= lag else np.nan


@hot_kernel
def _zscore(
    cell: np.ndarray, off: int, window: int, min_periods: int, epsilon: float, x: float
) -> float:
    _push(cell, off, window, x)
    n = min(int(cell[off]), window)
    if n < min_periods:
        return np.nan
    mean = _window_sum(cell, off, window, n) / n
    denominator = math.sqrt(_window_squares(cell, off, window, n, mean) / n) + epsilon
    if denominator == 0.0:
        return np.nan
    return (x - mean) / denominator


@hot_kernel
def _robust_zscore(
    cell: np.ndarray,
    off: int,
    window: int,
    min_periods: int,
    scale: float,
    epsilon: float,
    x: float,
) -> float:
    """``(x - median) / (scale * MAD + epsilon)``; a sorted copy of the window follows the ring,
    and the median and MAD are kept so a value that replaces an equal one (a quiet cell) costs
    nothing more: state is ``[count, ring..., sorted..., median, MAD]``."""
    seen = int(cell[off])
    old = _push(cell, off, window, x)
    ordered = cell[off + 1 + window : off + 1 + 2 * window]
    summary = off + 1 + 2 * window
    n = min(seen + 1, window)
    if seen < window or x != old:
        _sorted_insert(ordered, min(seen, window), old, seen >= window, x)
        half = n // 2
        median = ordered[half] if n % 2 == 1 else (ordered[half - 1] + ordered[half]) / 2.0
        cell[summary] = median
        cell[summary + 1] = _median_deviation(ordered, n, median)
    if n < min_periods:
        return np.nan
    denominator = scale * cell[summary + 1] + epsilon
    if denominator == 0.0:
        return np.nan
    return float((x - cell[summary]) / denominator)


@hot_kernel
def _temporal(
    op: int,
    k: int,
    nodes: np.ndarray,
    fparams: np.ndarray,
    state: np.ndarray,
    values: np.ndarray,
    out: np.ndarray,
    first: int,
    end: int,
) -> None:
    """One temporal node over columns ``[first, end)``; a NaN input is a missing observation."""
    off = nodes[k, N_STATE]
    f = nodes[k, N_FPARAM]
    window = nodes[k, N_I0]  # the lag for diff
    min_periods = nodes[k, N_I1]
    for column in range(first, end):
        x = values[column]
        if math.isnan(x):
            out[column] = np.nan
        elif op in (OP_ROLLING_SUM, OP_ROLLING_MEAN):
            out[column] = _rolling(
                state[column], off, window, min_periods, op == OP_ROLLING_MEAN, x
            )
        elif op == OP_EMA:
            out[column] = _ema(state[column], off, fparams[f], x)
        elif op == OP_DIFF:
            out[column] = _diff(state[column], off, window, x)
        elif op == OP_ZSCORE:
            out[column] = _zscore(state[column], off, window, min_periods, fparams[f], x)
        else:
            out[column] = _robust_zscore(
                state[column], off, window, min_periods, fparams[f], fparams[f + 1], x
            )


@hot_kernel
def _band(
    k: int,
    nodes: np.ndarray,
    fparams: np.ndarray,
    values: np.ndarray,
    first: int,
    end: int,
    column_tick: int,
    spot_x2: int,
) -> float:
    """Reduce a grid over the ticks ranked ``near..far`` from spot on one side or both.

    Rank r above spot is tick ``floor(spot_x2 / 2) + r``, below it ``ceil(spot_x2 / 2) - r``, so
    with a one-tick spread the best ask and best bid are both rank 1 (a tick at spot, with an even
    spread, is on neither side). A tick is weighted by its distance ``|2 tick - spot_x2| / 2``
    from the mid. Ticks are summed from spot outwards, rank by rank (below before above), so
    mirrored values on the two sides give bit-identical results. Undefined cells are skipped.
    """
    if spot_x2 < 0:
        return np.nan
    side = nodes[k, N_I0]
    weighting = nodes[k, N_I4]
    decay = fparams[nodes[k, N_FPARAM]]
    total = 0.0
    weights = 0.0
    for rank in range(nodes[k, N_I1], nodes[k, N_I2] + 1):
        for direction in (-1, 1):
            if direction == -1:
                if side == SIDE_ABOVE:
                    continue
                tick = (spot_x2 + 1) // 2 - rank
            else:
                if side == SIDE_BELOW:
                    continue
                tick = spot_x2 // 2 + rank
            column = tick - column_tick
            if column < first or column >= end or math.isnan(values[column]):
                continue
            distance = abs(2 * tick - spot_x2) * 0.5
            if weighting == WEIGHT_INVERSE:
                weight = 1.0 / (1.0 + distance)
            elif weighting == WEIGHT_EXPONENTIAL:
                weight = math.exp(-distance / decay)
            else:
                weight = 1.0
            total += weight * values[column]
            weights += weight
    if weights == 0.0:
        return np.nan
    if nodes[k, N_I3] == REDUCE_MEAN:
        return total / weights
    return total


@hot_kernel
def _neighbourhood(
    k: int, nodes: np.ndarray, values: np.ndarray, out: np.ndarray, first: int, end: int
) -> None:
    """Sum or mean of the defined cells within ``radius`` ticks (NaN where the cell is NaN)."""
    radius = nodes[k, N_I0]
    mean = nodes[k, N_I3] == REDUCE_MEAN
    for column in range(first, end):
        if math.isnan(values[column]):
            out[column] = np.nan
            continue
        total = 0.0
        count = 0
        for other in range(max(first, column - radius), min(end, column + radius + 1)):
            x = values[other]
            if not math.isnan(x):
                total += x
                count += 1
        out[column] = total / count if mean else total


@hot_kernel
def _step_bin(
    nodes: np.ndarray,
    node_inputs: np.ndarray,
    fparams: np.ndarray,
    src: np.ndarray,
    row0: int,
    first: int,
    n: int,
    column_tick: int,
    spot_x2: int,
    cell_state: np.ndarray,
    series_state: np.ndarray,
    rows: np.ndarray,
    series: np.ndarray,
) -> None:
    """Evaluate every node for one bin whose window is columns ``[first, first + n)``, its
    values in ``src[source, row0:row0 + n]``; column ``c`` is absolute tick ``column_tick + c``."""
    for k in range(nodes.shape[0]):
        op = nodes[k, N_OP]
        grid = nodes[k, N_GRID] == 1
        out = rows[nodes[k, N_SLOT]] if grid else series[nodes[k, N_SLOT]]
        lo = first if grid else 0
        hi = first + n if grid else 1
        if op == OP_SOURCE:
            source = nodes[k, N_I0]
            for column in range(lo, hi):
                out[column] = src[source, row0 + column - first]
        elif op <= OP_STATE:
            _elementwise(op, k, nodes, node_inputs, fparams, rows, series, out, lo, hi)
        else:
            source = node_inputs[nodes[k, N_IN_START]]
            slot = nodes[source, N_SLOT]
            values = rows[slot] if nodes[source, N_GRID] == 1 else series[slot]
            if op <= OP_ROBUST_ZSCORE:
                state = cell_state if grid else series_state
                _temporal(op, k, nodes, fparams, state, values, out, lo, hi)
            elif op == OP_BAND:
                out[0] = _band(k, nodes, fparams, values, first, first + n, column_tick, spot_x2)
            else:
                _neighbourhood(k, nodes, values, out, lo, hi)


@hot_kernel
def advance(
    nodes: np.ndarray,
    node_inputs: np.ndarray,
    fparams: np.ndarray,
    output_nodes: np.ndarray,
    src: np.ndarray,
    row_start: np.ndarray,
    first: np.ndarray,
    count: np.ndarray,
    column_tick: int,
    spot_x2: np.ndarray,
    cell_state: np.ndarray,
    series_state: np.ndarray,
    rows: np.ndarray,
    series: np.ndarray,
    out_grid: np.ndarray,
    out_series: np.ndarray,
    out_bin: int,
) -> None:
    """Step through bins in order and copy the outputs of bin ``b`` to row ``out_bin + b`` of
    ``out_grid[output]`` (window columns only) and ``out_series[output]``."""
    for b in range(first.shape[0]):
        lo = first[b]
        hi = lo + count[b]
        _step_bin(
            nodes,
            node_inputs,
            fparams,
            src,
            row_start[b],
            lo,
            count[b],
            column_tick,
            spot_x2[b],
            cell_state,
            series_state,
            rows,
            series,
        )
        g = 0
        s = 0
        for j in range(output_nodes.shape[0]):
            k = output_nodes[j]
            slot = nodes[k, N_SLOT]
            if nodes[k, N_GRID] == 1:
                for column in range(lo, hi):
                    out_grid[g, out_bin + b, column] = rows[slot, column]
                g += 1
            else:
                out_series[s, out_bin + b] = series[slot, 0]
                s += 1
