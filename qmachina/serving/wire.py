"""The serving stream's wire format: what ``WS /v1/stream`` sends, and how a client reads it.

Text messages are JSON control messages, each with a ``type``:

- ``runtime_config`` (always the first message): the schema versions, the serving version, the
  instrument, the grid geometry and bin width, the streamed silver fields and gold outputs with
  their roles, the signal and its scoring, the source (replay speed and start), the framing and
  the client's queue (:func:`runtime_config`);
- ``stream_status``: the client's dropped-frame counter, sent before the next frame whenever it
  grew (a client that falls behind loses the oldest frames queued for it, never the pipeline's
  pace);
- ``stream_end``: the replay is over (or failed: ``error``), with the bins the pipeline produced
  and the frames this client lost; the server then closes the socket.

Binary messages are data frames: a fixed :data:`HEADER` (24 bytes, little-endian) followed by
one Arrow IPC *stream* (schema, one record batch of one row, end-of-stream), so every frame is
decodable on its own (``pyarrow.ipc.open_stream(frame[24:])``):

====== ====== =========================================================================
offset bytes  field
====== ====== =========================================================================
0      4      magic ``b"QMST"``
4      1      wire version (1)
5      1      frame type: 1 ``grid_update`` (silver), 2 ``gold_update`` (gold and signal)
6      2      reserved, zero
8      8      ``bin_seq`` (int64): the bin the frame belongs to
16     8      ``first_tick`` (int64): the absolute tick of element 0 of every list column
====== ====== =========================================================================

Silver and gold never share a schema. A ``grid_update`` is the silver row of the bin
(schema ``qmachina.silver/1``, its grid config in the schema metadata) projected to the bin's
context fields (:data:`GRID_CONTEXT_FIELDS`) and the version's ``stream.silver`` fields. A
``gold_update`` (schema ``qmachina.gold-stream/1``) holds the version's ``stream.gold`` fields
only: a grid output as ``list<float64>`` over the bin's silver window, a series output and the
signal ``score`` as ``float64``; NaN is sent as NaN (undefined, e.g. a warm-up), never as null.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import pyarrow as pa

from engine.gold.graph import Kind
from engine.gold.runtime import GoldBin
from engine.silver import SILVER_SCHEMA_VERSION
from qmachina.serving.snapshot import ServingSnapshot
from qmachina.specs.serving import SIGNAL_SCORE_FIELD

WIRE_VERSION = 1
GOLD_STREAM_SCHEMA_VERSION = "qmachina.gold-stream/1"
STREAM_SCHEMA_VERSION = "qmachina.stream/1"
"""The version of the JSON control messages and of the framing."""
MAGIC = b"QMST"
HEADER = struct.Struct("<4sBBHqq")
HEADER_BYTES = HEADER.size
GRID_CONTEXT_FIELDS = (
    "bin_seq",
    "bin_start_ns",
    "bin_end_ns",
    "best_bid",
    "best_ask",
    "spot_x2_ticks",
    "book_valid",
    "window_first_tick",
    "window_ticks",
)
"""The silver bin fields every ``grid_update`` carries besides the streamed ones: when the bin
is, where spot and the book are, and which absolute ticks its lists cover."""


class FrameType(IntEnum):
    """The kind of a binary frame (byte 5 of its header)."""

    GRID_UPDATE = 1
    GOLD_UPDATE = 2


class WireError(ValueError):
    """A binary message that is not a frame of this wire version."""


@dataclass(frozen=True)
class Frame:
    """A decoded data frame."""

    type: FrameType
    bin_seq: int
    first_tick: int
    batch: pa.RecordBatch


def encode_frame(kind: FrameType, bin_seq: int, first_tick: int, batch: pa.RecordBatch) -> bytes:
    """The header and an Arrow IPC stream of ``batch``."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    body: bytes = sink.getvalue().to_pybytes()
    return HEADER.pack(MAGIC, WIRE_VERSION, int(kind), 0, bin_seq, first_tick) + body


def decode_frame(data: bytes) -> Frame:
    """A binary message read back: its header checked, its Arrow stream decoded."""
    if len(data) < HEADER_BYTES:
        raise WireError(f"a frame holds at least {HEADER_BYTES} bytes, got {len(data)}")
    magic, version, kind, _, bin_seq, first_tick = HEADER.unpack_from(data)
    if magic != MAGIC or version != WIRE_VERSION:
        raise WireError(f"not a qMachina stream frame of wire version {WIRE_VERSION}")
    try:
        frame_type = FrameType(kind)
    except ValueError:
        raise WireError(f"unknown frame type {kind}") from None
    table = pa.ipc.open_stream(pa.py_buffer(data[HEADER_BYTES:])).read_all()
    batches = table.to_batches()
    if len(batches) != 1:
        raise WireError(f"a frame holds one record batch, got {len(batches)}")
    return Frame(frame_type, bin_seq, first_tick, batches[0])


# ------------------------------------------------------------------------------- grid_update


def grid_fields(snapshot: ServingSnapshot) -> tuple[str, ...]:
    """The silver fields of a ``grid_update``: the context fields, then the streamed ones."""
    streamed = [entry.field for entry in snapshot.content.stream.silver]
    return (*GRID_CONTEXT_FIELDS, *(f for f in streamed if f not in GRID_CONTEXT_FIELDS))


class GridEncoder:
    """``grid_update`` frames of one serving version from its silver rows."""

    def __init__(self, snapshot: ServingSnapshot, silver_schema: pa.Schema) -> None:
        self.fields = grid_fields(snapshot)
        self.schema = pa.schema(
            [silver_schema.field(name) for name in self.fields], metadata=silver_schema.metadata
        )

    def encode(self, silver_row: pa.RecordBatch) -> bytes:
        """The frame of a one-row silver batch."""
        batch = pa.RecordBatch.from_arrays(
            [silver_row.column(name) for name in self.fields], schema=self.schema
        )
        bin_seq = int(silver_row.column("bin_seq")[0].as_py())
        first_tick = int(silver_row.column("window_first_tick")[0].as_py())
        return encode_frame(FrameType.GRID_UPDATE, bin_seq, first_tick, batch)


# ------------------------------------------------------------------------------- gold_update


@dataclass(frozen=True)
class GoldField:
    """A streamed gold field: a gold output (grid or series) or the signal's score."""

    name: str
    role: str
    kind: str
    """``grid``, ``series`` or ``signal``."""


def gold_fields(snapshot: ServingSnapshot, kinds: Mapping[str, Kind]) -> tuple[GoldField, ...]:
    """The version's ``stream.gold`` fields with their kinds (``kinds``: the gold outputs')."""
    fields = []
    for entry in snapshot.content.stream.gold:
        if entry.field == SIGNAL_SCORE_FIELD and entry.field not in kinds:
            kind = "signal"
        else:
            kind = Kind(kinds[entry.field]).value
        fields.append(GoldField(entry.field, entry.role.value, kind))
    return tuple(fields)


class GoldEncoder:
    """``gold_update`` frames of one serving version from its gold bins and signal scores."""

    def __init__(self, snapshot: ServingSnapshot, kinds: Mapping[str, Kind]) -> None:
        self.fields = gold_fields(snapshot, kinds)
        self.schema = pa.schema(
            [
                pa.field(
                    f.name,
                    pa.list_(pa.field("item", pa.float64(), nullable=False))
                    if f.kind == "grid"
                    else pa.float64(),
                    nullable=False,
                )
                for f in self.fields
            ],
            metadata={
                "qmachina.schema_version": GOLD_STREAM_SCHEMA_VERSION,
                "qmachina.version_id": snapshot.version_id,
                "qmachina.gold_spec_hash": snapshot.content.gold.spec_hash,
            },
        )

    def encode(self, bin_seq: int, gold: GoldBin, score: float) -> bytes:
        """The frame of one bin's gold outputs and signal score."""
        columns: list[pa.Array] = []
        for f in self.fields:
            if f.kind == "signal":
                columns.append(pa.array([score], type=pa.float64()))
            elif f.kind == "grid":
                values = pa.array(np.asarray(gold.grids[f.name], dtype=np.float64))
                offsets = pa.array([0, len(values)], type=pa.int32())
                columns.append(pa.ListArray.from_arrays(offsets, values))
            else:
                columns.append(pa.array([gold.series[f.name]], type=pa.float64()))
        batch = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        return encode_frame(FrameType.GOLD_UPDATE, bin_seq, gold.first_tick, batch)


# ------------------------------------------------------------------------- control messages


def _json(message: Mapping[str, Any]) -> str:
    return json.dumps(message, allow_nan=False, separators=(",", ":"))


@dataclass(frozen=True)
class SourceInfo:
    """What the runtime_config says about the source of a stream."""

    kind: str
    speed: float
    start_ns: int | None
    session_start_ns: int | None
    session_end_ns: int | None
    dataset_files: Sequence[str]


def runtime_config(
    snapshot: ServingSnapshot,
    *,
    alias: str | None,
    kinds: Mapping[str, Kind],
    source: SourceInfo,
    queue_frames: int,
) -> str:
    """The first message of every stream."""
    content = snapshot.content
    instrument = content.pipeline.instrument
    radius = instrument.grid_radius_ticks
    gold_outputs = [
        {"field": f.name, "role": f.role, "kind": f.kind} for f in gold_fields(snapshot, kinds)
    ]
    return _json(
        {
            "type": "runtime_config",
            "schema_versions": {
                "stream": STREAM_SCHEMA_VERSION,
                "wire": WIRE_VERSION,
                "silver": SILVER_SCHEMA_VERSION,
                "gold": GOLD_STREAM_SCHEMA_VERSION,
            },
            "serving": {
                "version_id": snapshot.version_id,
                "alias": alias,
                "model_id": content.model_id,
                "pipeline_hash": content.pipeline.pipeline_hash,
                "gold_spec_hash": content.gold.spec_hash,
            },
            "instrument": {
                "symbol": instrument.symbol,
                "venue": instrument.venue,
                "timezone": instrument.timezone,
                "tick_size": str(instrument.tick_size),
                "tick_size_raw": instrument.tick_size_raw,
                "price_scale": instrument.price_scale,
                "contract_multiplier": str(instrument.contract_multiplier),
            },
            "grid": {
                "n_absolute_ticks": instrument.n_absolute_ticks,
                "grid_radius_ticks": radius,
                "max_window_ticks": 2 * radius + 1,
                "bin_width_ms": instrument.bin_width_ms,
                "bin_clock": instrument.bin_clock,
            },
            "bin_width_ms": instrument.bin_width_ms,
            "silver_fields": [
                {"field": e.field, "role": e.role.value} for e in content.stream.silver
            ],
            "grid_update_fields": list(grid_fields(snapshot)),
            "gold_outputs": gold_outputs,
            "signal": {
                "name": content.signal.name,
                "params": content.signal.params,
                "threshold": content.scoring.threshold,
                "side": content.scoring.side,
            },
            "projection_horizons_bins": list(content.projection_horizons_bins),
            "visualization": content.visualization.model_dump(mode="json"),
            "source": {
                "kind": source.kind,
                "speed": source.speed,
                "start_ns": source.start_ns,
                "session_start_ns": source.session_start_ns,
                "session_end_ns": source.session_end_ns,
                "dataset_files": list(source.dataset_files),
            },
            "frames": {
                "header_bytes": HEADER_BYTES,
                "magic": MAGIC.decode(),
                "types": {t.name.lower(): int(t) for t in FrameType},
            },
            "queue": {"max_frames": queue_frames, "policy": "drop_oldest"},
        }
    )


def stream_status(dropped_frames: int) -> str:
    """The client's dropped-frame counter (frames lost since the stream started)."""
    return _json({"type": "stream_status", "dropped_frames": dropped_frames})


def stream_end(*, bins: int, dropped_frames: int, error: str | None) -> str:
    """The end of a stream: the bins the pipeline produced, what this client lost, and the
    error that ended it, if one did."""
    return _json(
        {
            "type": "stream_end",
            "reason": "failed" if error else "replay finished",
            "bins": bins,
            "dropped_frames": dropped_frames,
            "error": error,
        }
    )
