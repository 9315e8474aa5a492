"""Silver grid builder: drives the book + silver kernels and turns their buffers into Arrow.

The silver wire contract is one Arrow row per bin. Bin-level fields are scalar columns; the
per-tick window around spot is a set of list columns sharing one offsets buffer (row ``r`` of
the lists is absolute tick ``window_first_tick + r``). The same record batches go to Parquet
offline and to the WebSocket online.

Spot convention: ``spot_x2 = best_bid_tick + best_ask_tick`` (the mid in half ticks; the integer
``spot`` column is the mid price in raw 1e-9 units). The window holds every tick ``t`` with
``|2t - spot_x2| <= 2 * grid_radius_ticks``, so it is symmetric: with a one-tick spread the best
bid and best ask sit half a tick below and above spot and the window has ``2R`` ticks; with an
even spread it is centred on a tick and has ``2R + 1``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from engine import silver_kernel as sk
from engine.book import OrderBook
from engine.events import PRICE_SCALE

SILVER_SCHEMA_VERSION = "qmachina.silver/1"
CHECKPOINT_FORMAT = "qmachina.silver-checkpoint/1"
DEFAULT_BINS_PER_BATCH = 4096
#: Events per step of :meth:`SilverBuilder.feed_promptly`: about 2 ms of book and silver work.
PROMPT_SLICE_EVENTS = 8192


@dataclass(frozen=True)
class GridConfig:
    """Everything that shapes the silver output (all of it goes into the schema metadata)."""

    tick_size: int  # raw price units (1e-9) per tick
    n_absolute_ticks: int
    grid_radius_ticks: int
    bin_width_ns: int
    bin_clock: Literal["ts_event", "ts_recv"]
    tau_rest_decay_s: float
    tau_velocity_s: float
    tau_acceleration_s: float
    tau_jerk_s: float

    def __post_init__(self) -> None:
        if self.tick_size <= 0 or self.bin_width_ns <= 0 or self.grid_radius_ticks <= 0:
            raise ValueError(f"tick_size, bin_width_ns and grid_radius_ticks must be > 0: {self}")
        if self.n_absolute_ticks < 4 * self.grid_radius_ticks + 2:
            raise ValueError(
                f"n_absolute_ticks ({self.n_absolute_ticks}) must be at least "
                f"4 * grid_radius_ticks + 2 ({4 * self.grid_radius_ticks + 2}) to re-anchor"
            )
        if self.bin_clock not in ("ts_event", "ts_recv"):
            raise ValueError(f"bin_clock must be ts_event or ts_recv, got {self.bin_clock!r}")

    def kernel_params(self) -> np.ndarray:
        return sk.make_params(
            self.bin_width_ns,
            self.bin_clock == "ts_recv",
            self.grid_radius_ticks,
            self.tau_rest_decay_s,
            self.tau_velocity_s,
            self.tau_acceleration_s,
            self.tau_jerk_s,
        )


def _tick_columns() -> list[tuple[str, pa.DataType]]:
    masses = [(name, pa.float32()) for name in sk.CHANNEL_NAMES[: sk.N_FLOW]]
    depths = [(name, pa.int32()) for name in sk.CHANNEL_NAMES[sk.N_FLOW :]]
    chains = [
        (f"{channel}_{suffix}", pa.float32())
        for suffix in sk.STAGE_SUFFIXES
        for channel in sk.CHANNEL_NAMES
    ]
    return masses + depths + chains


TICK_COLUMNS = _tick_columns()
BIN_FIELDS = [
    pa.field("bin_seq", pa.int64(), nullable=False),
    pa.field("bin_start_ns", pa.int64(), nullable=False),
    pa.field("bin_end_ns", pa.int64(), nullable=False),
    pa.field("event_count", pa.int32(), nullable=False),
    pa.field("cum_event_id", pa.int64(), nullable=False),
    pa.field("best_bid", pa.int64()),
    pa.field("best_ask", pa.int64()),
    pa.field("spot", pa.int64()),
    pa.field("spot_x2_ticks", pa.int64()),
    pa.field("mid_price", pa.float64()),
    pa.field("book_valid", pa.bool_(), nullable=False),
    pa.field("bbo_labels_valid", pa.bool_(), nullable=False),
    pa.field("ask_move_ticks", pa.int32(), nullable=False),
    pa.field("bid_move_ticks", pa.int32(), nullable=False),
    pa.field("ask_sign", pa.int8(), nullable=False),
    pa.field("bid_sign", pa.int8(), nullable=False),
    pa.field("microstate_id", pa.int8(), nullable=False),
    pa.field("chase_up", pa.bool_(), nullable=False),
    pa.field("chase_down", pa.bool_(), nullable=False),
    pa.field("window_first_tick", pa.int64(), nullable=False),
    pa.field("window_ticks", pa.int32(), nullable=False),
]


def silver_schema(config: GridConfig) -> pa.Schema:
    """The versioned silver Arrow schema; the grid config travels in its metadata."""
    fields = BIN_FIELDS + [
        pa.field(name, pa.list_(pa.field("item", dtype, nullable=False)), nullable=False)
        for name, dtype in TICK_COLUMNS
    ]
    metadata = {
        "qmachina.schema_version": SILVER_SCHEMA_VERSION,
        "qmachina.grid_config": json.dumps(asdict(config), sort_keys=True),
        "qmachina.price_scale": str(PRICE_SCALE),
    }
    return pa.schema(fields, metadata=metadata)


class SilverBuilder:
    """Feeds event batches through the book and the grid; yields silver record batches."""

    def __init__(
        self,
        config: GridConfig,
        bins_per_batch: int = DEFAULT_BINS_PER_BATCH,
        *,
        session_start_ns: int | None = None,
    ) -> None:
        """``session_start_ns``: records before it build the book only; bin 0 opens there."""
        self.config = config
        self.schema = silver_schema(config)
        # The tick columns' exact list types (non-null items): built with them, a record batch
        # needs no cast per column and bin.
        self._tick_list_types = [self.schema.field(name).type for name, _ in TICK_COLUMNS]
        self.book = OrderBook(config.tick_size)
        self.params = config.kernel_params()
        n_grid = config.n_absolute_ticks
        self.grid_meta = np.zeros(sk.GRID_META_SIZE, dtype=np.int64)
        if session_start_ns is not None:
            if session_start_ns <= 0:
                raise ValueError(f"session_start_ns must be positive, got {session_start_ns}")
            self.grid_meta[sk.G_SESSION_START] = session_start_ns
        self.grid = np.zeros((sk.GRID_ROWS, n_grid), dtype=np.float64)
        rows = bins_per_batch * (2 * config.grid_radius_ticks + 1)
        self.bins_out = np.zeros((bins_per_batch, sk.BIN_COLUMNS), dtype=np.int64)
        self.rows_float = np.zeros((sk.ROW_FLOAT_COLUMNS, rows), dtype=np.float32)
        self.rows_depth = np.zeros((3, rows), dtype=np.int32)
        self.events_consumed = 0  # stream position: records taken from the input so far

    # -- running ---------------------------------------------------------------------------

    def feed(self, events: np.ndarray) -> list[pa.RecordBatch]:
        """Apply a batch; returns the output batches that filled up along the way."""
        batches: list[pa.RecordBatch] = []
        self._drive(events, 0, -1, batches)
        return batches

    def feed_until_bin(self, events: np.ndarray, bin_seq: int) -> tuple[int, list[pa.RecordBatch]]:
        """Apply events up to the end of bin ``bin_seq`` (a checkpoint point): bins before it are
        emitted, bin ``bin_seq`` holds all its events and is still open, and the returned index
        is the first record after it (``len(events)`` if the batch ran out first). All output
        so far is returned, so a checkpoint may follow."""
        batches: list[pa.RecordBatch] = []
        position = self._drive(events, 0, bin_seq, batches)
        batches.extend(self._take_output())
        return position, batches

    def feed_promptly(
        self, events: np.ndarray, slice_events: int = PROMPT_SLICE_EVENTS
    ) -> Iterator[list[pa.RecordBatch]]:
        """Apply events ``slice_events`` at a time and yield the bins each slice closed, so a
        bin leaves at most one slice's work after the record that closed it, however large the
        batch (a stream following live data); the bins are those of :meth:`feed`."""
        if slice_events < 1:
            raise ValueError(f"slice_events must be >= 1, got {slice_events}")
        for lo in range(0, len(events), slice_events):
            _, batches = self.feed_until_bin(events[lo : lo + slice_events], -1)
            if batches:
                yield batches

    def _drive(
        self,
        events: np.ndarray,
        start: int,
        stop_at_bin_seq: int,
        batches: list[pa.RecordBatch],
    ) -> int:
        book = self.book
        index = start
        while True:
            status, index = sk.build_silver(
                events,
                index,
                book.orders,
                book.order_ids,
                book.order_map,
                book.levels,
                book.free_slots,
                book.meta,
                book.anomaly_counts,
                self.grid_meta,
                self.params,
                self.grid,
                self.bins_out,
                self.rows_float,
                self.rows_depth,
                book.changes,
                stop_at_bin_seq,
            )
            index = int(index)
            if status == sk.STATUS_DONE:
                self.events_consumed += index - start
                return index
            if status == sk.STATUS_STOPPED:
                if self.grid_meta[sk.G_BIN_SEQ] == stop_at_bin_seq:
                    self.events_consumed += index - start
                    return index
                batches.extend(self._take_output())
            else:
                book.grow_for(int(status), events, index)

    def finish(self, until_ns: int | None = None) -> list[pa.RecordBatch]:
        """End of stream: close the open bin (and, given a session end ``until_ns``, every bin
        that starts before it) and return what is left."""
        batches = self._take_output()
        while (
            sk.finish_silver(
                self.book.levels,
                self.book.meta,
                self.grid_meta,
                self.params,
                self.grid,
                self.bins_out,
                self.rows_float,
                self.rows_depth,
                0 if until_ns is None else until_ns,
            )
            == sk.STATUS_STOPPED
        ):
            batches.extend(self._take_output())
        batches.extend(self._take_output())
        return batches

    # -- output ----------------------------------------------------------------------------

    @property
    def bins_emitted(self) -> int:
        return int(self.grid_meta[sk.G_BIN_SEQ])

    def grid_counts(self) -> dict[str, int]:
        """How often the grid re-anchored, and how many records arrived with a clock time before
        the open bin (clamped into it; ts_event is not monotonic in DBN files)."""
        return {
            "reanchors": int(self.grid_meta[sk.G_REANCHORS]),
            "late_events": int(self.grid_meta[sk.G_LATE_EVENTS]),
        }

    def _take_output(self) -> list[pa.RecordBatch]:
        n_bins = int(self.grid_meta[sk.G_OUT_BINS])
        if n_bins == 0:
            return []
        n_rows = int(self.grid_meta[sk.G_OUT_ROWS])
        batch = self._record_batch(
            self.bins_out[:n_bins], self.rows_float[:, :n_rows], self.rows_depth[:, :n_rows]
        )
        self.grid_meta[sk.G_OUT_BINS] = 0
        self.grid_meta[sk.G_OUT_ROWS] = 0
        return [batch]

    def _record_batch(
        self, bins: np.ndarray, rows_float: np.ndarray, rows_depth: np.ndarray
    ) -> pa.RecordBatch:
        tick = self.config.tick_size
        col = bins.T
        has_bid = col[sk.B_HAS_BID].astype(bool)
        has_ask = col[sk.B_HAS_ASK].astype(bool)
        has_spot = col[sk.B_HAS_SPOT].astype(bool)
        spot_x2 = col[sk.B_SPOT_X2]
        # Exact integer mid in raw units; tick * spot_x2 is even for any even raw tick size.
        spot = (spot_x2 * tick) // 2
        ask_move = col[sk.B_ASK_MOVE]
        bid_move = col[sk.B_BID_MOVE]
        ask_sign = np.sign(ask_move).astype(np.int8)
        bid_sign = np.sign(bid_move).astype(np.int8)
        n_ticks = col[sk.B_N_TICKS]
        offsets = np.zeros(len(bins) + 1, dtype=np.int32)
        np.cumsum(n_ticks, out=offsets[1:])
        offsets_array = pa.array(offsets, type=pa.int32())
        columns: list[pa.Array] = [
            pa.array(col[sk.B_SEQ]),
            pa.array(col[sk.B_START]),
            pa.array(col[sk.B_END]),
            pa.array(col[sk.B_EVENTS].astype(np.int32)),
            pa.array(col[sk.B_CUM_EVENTS]),
            pa.array(col[sk.B_BEST_BID] * tick, mask=~has_bid),
            pa.array(col[sk.B_BEST_ASK] * tick, mask=~has_ask),
            pa.array(spot, mask=~has_spot),
            pa.array(spot_x2, mask=~has_spot),
            pa.array(spot / PRICE_SCALE, mask=~has_spot),
            pa.array(col[sk.B_VALID].astype(bool)),
            pa.array(col[sk.B_LABELS_VALID].astype(bool)),
            pa.array(ask_move.astype(np.int32)),
            pa.array(bid_move.astype(np.int32)),
            pa.array(ask_sign),
            pa.array(bid_sign),
            pa.array((3 * (ask_sign + 1) + (bid_sign + 1)).astype(np.int8)),
            pa.array((ask_sign > 0) & (bid_sign > 0)),
            pa.array((ask_sign < 0) & (bid_sign < 0)),
            pa.array(col[sk.B_FIRST_TICK]),
            pa.array(n_ticks.astype(np.int32)),
        ]
        float_index = 0
        for (name, dtype), list_type in zip(TICK_COLUMNS, self._tick_list_types, strict=True):
            if dtype == pa.int32():
                depth_index = sk.CHANNEL_NAMES.index(name) - sk.N_FLOW
                values = rows_depth[depth_index].copy()
            else:
                values = rows_float[float_index].copy()
                float_index += 1
            columns.append(
                pa.ListArray.from_arrays(offsets_array, pa.array(values), type=list_type)
            )
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    # -- checkpoints -----------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every array that makes up book + grid state (output buffers excluded)."""
        book = self.book
        return {
            "orders": book.orders,
            "order_ids": book.order_ids,
            "order_map": book.order_map,
            "levels": book.levels,
            "free_slots": book.free_slots,
            "book_meta": book.meta,
            "anomalies": book.anomaly_counts,
            "grid_meta": self.grid_meta,
            "grid": self.grid,
        }

    def save_checkpoint(self, path: Path) -> None:
        """Save state at a bin boundary (no pending output) with the stream position."""
        if self.grid_meta[sk.G_OUT_BINS] != 0:
            raise RuntimeError("checkpoint with unflushed silver output; take the output first")
        header = {
            "format": CHECKPOINT_FORMAT,
            "schema_version": SILVER_SCHEMA_VERSION,
            "grid_config": asdict(self.config),
            "events_consumed": self.events_consumed,
        }
        with path.open("wb") as fh:
            arrays = {"header": np.array(json.dumps(header, sort_keys=True)), **self.state_arrays()}
            np.savez(fh, allow_pickle=False, **arrays)

    @classmethod
    def from_checkpoint(
        cls, path: Path, config: GridConfig, bins_per_batch: int = DEFAULT_BINS_PER_BATCH
    ) -> SilverBuilder:
        """Restore a builder saved by :meth:`save_checkpoint` for the same grid config."""
        with np.load(path, allow_pickle=False) as saved:
            header = json.loads(str(saved["header"]))
            if header.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path}: not a silver checkpoint (format {header.get('format')})")
            if header["grid_config"] != asdict(config):
                raise ValueError(
                    f"{path}: checkpoint was taken with grid config {header['grid_config']}, "
                    f"not {asdict(config)}"
                )
            builder = cls(config, bins_per_batch)
            book = builder.book
            book.orders = saved["orders"].copy()
            book.order_ids = saved["order_ids"].copy()
            book.order_map = saved["order_map"].copy()
            book.levels = saved["levels"].copy()
            book.free_slots = saved["free_slots"].copy()
            book.meta = saved["book_meta"].copy()
            book.anomaly_counts = saved["anomalies"].copy()
            builder.grid_meta = saved["grid_meta"].copy()
            builder.grid = saved["grid"].copy()
            builder.events_consumed = int(header["events_consumed"])
        return builder
