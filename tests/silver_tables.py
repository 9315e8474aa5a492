"""Small hand-built silver tables in the real silver schema, for tests of the stages after silver.

A table is described by its best bid and ask tick per bin (``None``: that side is empty); every
other bin-level field follows the silver builder's conventions (engine/silver.py): the book is
valid when both sides are present and not crossed, the spot (``spot_x2 = bid + ask`` in half
ticks) is that of the last valid bin and null before the first, the window holds the ticks ``t``
with ``|2t - spot_x2| <= 2 * radius``, and BBO moves are labelled between consecutive valid bins.
Per-tick columns are zero unless given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from engine.events import PRICE_SCALE
from engine.silver import BIN_FIELDS, TICK_COLUMNS, GridConfig, silver_schema
from engine.silver_frame import SilverFrame

TICK_SIZE = 250_000_000  # ES: a quarter point in 1e-9 units
BIN_WIDTH_NS = 100_000_000


def grid_config(radius: int, tick_size: int = TICK_SIZE) -> GridConfig:
    """A grid config for a table of window radius ``radius`` (it travels in the schema)."""
    return GridConfig(
        tick_size=tick_size,
        n_absolute_ticks=4 * radius + 2,
        grid_radius_ticks=radius,
        bin_width_ns=BIN_WIDTH_NS,
        bin_clock="ts_event",
        tau_rest_decay_s=1.0,
        tau_velocity_s=1.0,
        tau_acceleration_s=1.0,
        tau_jerk_s=1.0,
    )


def window_of(spot_x2: int, radius: int) -> tuple[int, int]:
    """``(first_tick, n_ticks)`` of the silver window around ``spot_x2``."""
    first = -((2 * radius - spot_x2) // 2)
    last = (spot_x2 + 2 * radius) // 2
    return first, last - first + 1


def silver_table(
    best_bid: Sequence[int | None],
    best_ask: Sequence[int | None],
    *,
    radius: int = 4,
    tick_size: int = TICK_SIZE,
    tick_values: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> pa.Table:
    """A silver table with one row per bin; ``tick_values[name][b]`` lists the window of bin b."""
    if len(best_bid) != len(best_ask):
        raise ValueError(f"{len(best_bid)} best bids but {len(best_ask)} best asks")
    n_bins = len(best_bid)
    bin_columns: dict[str, list[object]] = {field.name: [] for field in BIN_FIELDS}
    spot_x2: int | None = None
    previous: tuple[int, int] | None = None
    for b, (bid, ask) in enumerate(zip(best_bid, best_ask, strict=True)):
        valid = False
        labelled = previous is not None
        bid_move = ask_move = 0
        if bid is not None and ask is not None and bid < ask:
            valid = True
            if previous is not None:
                bid_move, ask_move = bid - previous[0], ask - previous[1]
            previous = (bid, ask)
            spot_x2 = bid + ask
        else:
            labelled = False
            previous = None
        bid_sign, ask_sign = int(np.sign(bid_move)), int(np.sign(ask_move))
        first, n_ticks = window_of(spot_x2, radius) if spot_x2 is not None else (0, 0)
        spot = None if spot_x2 is None else spot_x2 * tick_size // 2
        row: dict[str, object] = {
            "bin_seq": b,
            "bin_start_ns": b * BIN_WIDTH_NS,
            "bin_end_ns": (b + 1) * BIN_WIDTH_NS,
            "event_count": 0,
            "cum_event_id": 0,
            "best_bid": None if bid is None else bid * tick_size,
            "best_ask": None if ask is None else ask * tick_size,
            "spot": spot,
            "spot_x2_ticks": spot_x2,
            "mid_price": None if spot is None else spot / PRICE_SCALE,
            "book_valid": valid,
            "bbo_labels_valid": labelled,
            "ask_move_ticks": ask_move,
            "bid_move_ticks": bid_move,
            "ask_sign": ask_sign,
            "bid_sign": bid_sign,
            "microstate_id": 3 * (ask_sign + 1) + (bid_sign + 1),
            "chase_up": ask_sign > 0 and bid_sign > 0,
            "chase_down": ask_sign < 0 and bid_sign < 0,
            "window_first_tick": first,
            "window_ticks": n_ticks,
        }
        for name, value in row.items():
            bin_columns[name].append(value)
    counts = np.asarray(bin_columns["window_ticks"], dtype=np.int32)
    offsets = np.zeros(n_bins + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    offsets_array = pa.array(offsets)
    # Columns nobody filled share one zero buffer, so a long table stays cheap.
    zeros = {
        dtype: pa.array(np.zeros(int(offsets[-1]), dtype=dtype.to_pandas_dtype()), type=dtype)
        for dtype in {dtype for _, dtype in TICK_COLUMNS}
    }
    columns: list[pa.Array] = [pa.array(bin_columns[f.name], type=f.type) for f in BIN_FIELDS]
    for name, dtype in TICK_COLUMNS:
        given = (tick_values or {}).get(name)
        if given is None:
            values = zeros[dtype]
        else:
            if [len(window) for window in given] != counts.tolist():
                raise ValueError(f"tick_values[{name!r}] does not match the bins' window sizes")
            flat = np.concatenate([np.zeros(0), *(np.asarray(w, dtype=float) for w in given)])
            values = pa.array(flat, type=dtype)
        columns.append(pa.ListArray.from_arrays(offsets_array, values))
    schema = silver_schema(grid_config(radius, tick_size))
    return pa.Table.from_batches([pa.RecordBatch.from_arrays(columns, schema=schema)])


def silver_frame(
    best_bid: Sequence[int | None],
    best_ask: Sequence[int | None],
    *,
    radius: int = 4,
    tick_size: int = TICK_SIZE,
) -> SilverFrame:
    """The :class:`SilverFrame` of :func:`silver_table` (per-tick columns all zero)."""
    table = silver_table(best_bid, best_ask, radius=radius, tick_size=tick_size)
    return SilverFrame(table, tick_size)
