"""Silver as dense arrays for the stages after it (gold, signals, evaluation).

Silver arrives as one Arrow row per bin with list columns over a window that follows spot. Gold
keeps its time series per *absolute* tick, so a frame scatters each requested field into a dense
``[n_bins, n_ticks]`` float64 matrix whose column ``c`` is absolute tick ``first_tick + c`` over
the whole span the windows cover; cells outside a bin's window are NaN. Fields are materialised on
first use only (a full session of every field would not fit comfortably in memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine.silver import TICK_COLUMNS

TICK_FIELDS = tuple(name for name, _ in TICK_COLUMNS)


@dataclass
class SilverFrame:
    """Per-bin arrays plus lazily densified per-tick fields of one silver table."""

    table: pa.Table
    tick_size: int
    bin_start_ns: np.ndarray = field(init=False)
    book_valid: np.ndarray = field(init=False)
    best_bid_tick: np.ndarray = field(init=False)  # int64; only meaningful where has_bbo
    best_ask_tick: np.ndarray = field(init=False)
    has_bbo: np.ndarray = field(init=False)  # both sides present (the book may still be crossed)
    spot_x2: np.ndarray = field(init=False)  # int64 last valid spot in half ticks; -1 before one
    first_tick: int = field(init=False)
    n_ticks: int = field(init=False)
    _rows: np.ndarray = field(init=False, repr=False)
    _cols: np.ndarray = field(init=False, repr=False)
    _dense: dict[str, np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        table = self.table
        self.bin_start_ns = table["bin_start_ns"].to_numpy()
        self.book_valid = table["book_valid"].to_numpy(zero_copy_only=False)
        bid = table["best_bid"]
        ask = table["best_ask"]
        self.has_bbo = (bid.is_valid().to_numpy(zero_copy_only=False)) & (
            ask.is_valid().to_numpy(zero_copy_only=False)
        )
        self.best_bid_tick = bid.fill_null(0).to_numpy() // self.tick_size
        self.best_ask_tick = ask.fill_null(0).to_numpy() // self.tick_size
        self.spot_x2 = table["spot_x2_ticks"].fill_null(-1).to_numpy()
        first = table["window_first_tick"].to_numpy()
        counts = table["window_ticks"].to_numpy().astype(np.int64)
        has_window = counts > 0
        if has_window.any():
            self.first_tick = int(first[has_window].min())
            self.n_ticks = int((first + counts)[has_window].max()) - self.first_tick
        else:
            self.first_tick, self.n_ticks = 0, 0
        self._rows = np.repeat(np.arange(len(table), dtype=np.int64), counts)
        starts = np.repeat(first - self.first_tick, counts)
        within = np.arange(len(self._rows), dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts
        )
        self._cols = starts + within

    @property
    def n_bins(self) -> int:
        return len(self.table)

    def field(self, name: str) -> np.ndarray:
        """The dense ``[n_bins, n_ticks]`` float64 matrix of a per-tick silver field."""
        if name not in TICK_FIELDS:
            raise KeyError(f"{name!r} is not a per-tick silver field (known: {TICK_FIELDS})")
        dense = self._dense.get(name)
        if dense is None:
            values = self.table[name].combine_chunks().flatten().to_numpy()
            dense = np.full((self.n_bins, self.n_ticks), np.nan)
            dense[self._rows, self._cols] = values
            self._dense[name] = dense
        return dense
