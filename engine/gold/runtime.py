"""Running gold: over a whole silver frame (batch) or one silver bin at a time (incremental).

Both drive the same numba step (``ops.advance``) with the same per-cell state, so pushing the bins
of a frame one by one gives exactly the batch result. They differ only in how columns map to
ticks: the batch knows the frame's whole tick span up front; the incremental engine keeps its
state over an absolute-tick range that it grows (re-bases) when a window reaches past it. A cell
keeps its state through a re-base because state belongs to an absolute tick, never to a position
relative to spot.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.gold import ops
from engine.gold.compiler import GoldProgram, compile_graph
from engine.gold.graph import GoldGraph, Kind
from engine.silver_frame import SilverFrame

DEFAULT_CHUNK_BINS = 4096
DEFAULT_MARGIN_TICKS = 64


@dataclass(frozen=True)
class GoldFrame:
    """Gold outputs over a silver frame, in the spec's output order.

    A grid output is float64 ``[n_bins, n_ticks]`` whose column ``c`` is absolute tick
    ``first_tick + c`` (the frame's columns), NaN outside each bin's silver window; a series
    output is float64 ``[n_bins]``.
    """

    first_tick: int
    n_ticks: int
    outputs: Mapping[str, np.ndarray]
    kinds: Mapping[str, Kind]


class _Buffers:
    """Temporal state and current-bin values over ``width`` columns."""

    def __init__(self, program: GoldProgram, width: int) -> None:
        self.cell_state = np.zeros((width, program.cell_state_size))
        self.series_state = np.zeros((1, program.series_state_size))
        self.rows = np.full((program.n_grid_rows, width), np.nan)
        self.series = np.full((program.n_series, 1), np.nan)


def _advance(
    program: GoldProgram,
    buffers: _Buffers,
    src: np.ndarray,
    row_start: np.ndarray,
    first: np.ndarray,
    count: np.ndarray,
    column_tick: int,
    spot_x2: np.ndarray,
    out_grid: np.ndarray,
    out_series: np.ndarray,
    out_bin: int,
) -> None:
    ops.advance(
        program.nodes,
        program.node_inputs,
        program.fparams,
        program.output_nodes,
        src,
        row_start,
        first,
        count,
        column_tick,
        spot_x2,
        buffers.cell_state,
        buffers.series_state,
        buffers.rows,
        buffers.series,
        out_grid,
        out_series,
        out_bin,
    )


def _output_counts(program: GoldProgram) -> tuple[int, int]:
    kinds = program.output_kinds.values()
    grids = sum(kind is Kind.GRID for kind in kinds)
    return grids, len(program.outputs) - grids


def _field_values(data: pa.Table | pa.RecordBatch, fields: Sequence[str]) -> np.ndarray:
    """``[n_fields, total window ticks]`` float64: the list values of each field, bin after bin."""
    columns = []
    for name in fields:
        column = data[name]
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        columns.append(column.flatten().to_numpy(zero_copy_only=False).astype(np.float64))
    return np.stack(columns)


def _spot_x2(data: pa.Table | pa.RecordBatch) -> np.ndarray:
    spot: np.ndarray = data["spot_x2_ticks"].fill_null(-1).to_numpy().astype(np.int64)
    return spot


def run_gold(
    graph: GoldGraph, frame: SilverFrame, *, chunk_bins: int = DEFAULT_CHUNK_BINS
) -> GoldFrame:
    """Every output of ``graph`` over every bin of ``frame``."""
    program = compile_graph(graph)
    n_bins, width = frame.n_bins, frame.n_ticks
    n_grids, n_series = _output_counts(program)
    out_grid = np.full((n_grids, n_bins, width), np.nan)
    out_series = np.full((n_series, n_bins), np.nan)
    buffers = _Buffers(program, width)
    table = frame.table
    counts = table["window_ticks"].to_numpy().astype(np.int64)
    # A bin without a window has no columns; keep its (unused) first column in range.
    firsts = np.where(counts > 0, table["window_first_tick"].to_numpy() - frame.first_tick, 0)
    spots = frame.spot_x2.astype(np.int64)
    for start in range(0, n_bins, chunk_bins):
        stop = min(start + chunk_bins, n_bins)
        count = counts[start:stop]
        row_start = np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.int64)
        _advance(
            program,
            buffers,
            _field_values(table.slice(start, stop - start), program.source_fields),
            row_start,
            firsts[start:stop].astype(np.int64),
            count,
            frame.first_tick,
            spots[start:stop],
            out_grid,
            out_series,
            start,
        )
    outputs: dict[str, np.ndarray] = {}
    grid_index = series_index = 0
    for name, kind in program.output_kinds.items():
        if kind is Kind.GRID:
            outputs[name] = out_grid[grid_index]
            grid_index += 1
        else:
            outputs[name] = out_series[series_index]
            series_index += 1
    return GoldFrame(
        first_tick=frame.first_tick,
        n_ticks=width,
        outputs=outputs,
        kinds=program.output_kinds,
    )


@dataclass(frozen=True)
class SilverBin:
    """One bin of silver as the incremental engine takes it: the per-tick fields over the bin's
    window (element ``i`` is absolute tick ``first_tick + i``) and spot in half ticks."""

    first_tick: int
    spot_x2: int  # best bid tick + best ask tick; -1 without a spot
    values: Mapping[str, np.ndarray]


def silver_bins(data: pa.Table | pa.RecordBatch, fields: Sequence[str]) -> Iterator[SilverBin]:
    """The bins of silver Arrow data (as written to Parquet or sent on the wire), in order."""
    batches = data.to_batches() if isinstance(data, pa.Table) else [data]
    for batch in batches:
        values = _field_values(batch, fields)
        counts = batch["window_ticks"].to_numpy().astype(np.int64)
        firsts = batch["window_first_tick"].to_numpy()
        spots = _spot_x2(batch)
        ends = np.cumsum(counts)
        for b in range(batch.num_rows):
            start, stop = int(ends[b] - counts[b]), int(ends[b])
            yield SilverBin(
                first_tick=int(firsts[b]),
                spot_x2=int(spots[b]),
                values={name: values[i, start:stop] for i, name in enumerate(fields)},
            )


@dataclass(frozen=True)
class GoldBin:
    """One bin of gold: grid outputs over the bin's silver window (element ``i`` is absolute
    tick ``first_tick + i``) and series outputs, each in the spec's output order."""

    first_tick: int
    grids: Mapping[str, np.ndarray]
    series: Mapping[str, float]


class IncrementalGold:
    """Gold for a live stream: ``push`` one silver bin, get that bin's outputs."""

    def __init__(self, graph: GoldGraph, *, margin_ticks: int = DEFAULT_MARGIN_TICKS) -> None:
        """``margin_ticks``: room kept on each side of a window when the tick range grows, so
        spot can drift that far before the next re-base."""
        if margin_ticks < 0:
            raise ValueError(f"margin_ticks must be >= 0, got {margin_ticks}")
        self.program = compile_graph(graph)
        self.margin_ticks = margin_ticks
        self.base_tick = 0  # absolute tick of column 0
        self.width = 0
        self._buffers = _Buffers(self.program, 0)
        self._n_grids, self._n_series = _output_counts(self.program)

    @property
    def source_fields(self) -> tuple[str, ...]:
        """The silver fields ``push`` reads."""
        return self.program.source_fields

    def push(self, silver: SilverBin) -> GoldBin:
        """Advance by one bin; returns the outputs of that bin."""
        missing = [name for name in self.source_fields if name not in silver.values]
        if missing:
            raise KeyError(f"silver bin lacks field(s) {', '.join(missing)} that the graph reads")
        src = np.stack(
            [np.asarray(silver.values[name], dtype=np.float64) for name in self.source_fields]
        )
        n = src.shape[1]
        if n:
            self._cover(silver.first_tick, silver.first_tick + n)
        first = silver.first_tick - self.base_tick if n else 0
        out_grid = np.full((self._n_grids, 1, self.width), np.nan)
        out_series = np.full((self._n_series, 1), np.nan)
        _advance(
            self.program,
            self._buffers,
            src,
            np.zeros(1, dtype=np.int64),
            np.array([first], dtype=np.int64),
            np.array([n], dtype=np.int64),
            self.base_tick,
            np.array([silver.spot_x2], dtype=np.int64),
            out_grid,
            out_series,
            0,
        )
        grids: dict[str, np.ndarray] = {}
        series: dict[str, float] = {}
        for name, kind in self.program.output_kinds.items():
            if kind is Kind.GRID:
                grids[name] = out_grid[len(grids), 0, first : first + n].copy()
            else:
                series[name] = float(out_series[len(series), 0])
        return GoldBin(first_tick=silver.first_tick, grids=grids, series=series)

    def _cover(self, low: int, high: int) -> None:
        """Grow the tick range to hold ``[low, high)``, keeping every cell's state."""
        if self.width and self.base_tick <= low and high <= self.base_tick + self.width:
            return
        new_low = low - self.margin_ticks
        new_high = high + self.margin_ticks
        if self.width:
            new_low = min(new_low, self.base_tick)
            new_high = max(new_high, self.base_tick + self.width)
        buffers = _Buffers(self.program, new_high - new_low)
        shift = self.base_tick - new_low
        if self.width:
            buffers.cell_state[shift : shift + self.width] = self._buffers.cell_state
        buffers.series_state[:] = self._buffers.series_state
        self._buffers = buffers
        self.base_tick = new_low
        self.width = new_high - new_low
