"""A block of raw DBN records with the header fields the ingestor needs, as numpy columns.

Every DBN record starts with the same 16-byte header: its length in 4-byte words (u8), rtype
(u8), publisher_id (u16), instrument_id (u32) and ts_event (u64). A block keeps the records'
bytes untouched and reads those fields for all of them at once, so deduplication, checkpoints
and the split into daily files cost a few numpy operations per block, not Python per record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["CONTROL_RTYPES", "RecordBlock", "walk_records"]

I8 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint64]
U4 = npt.NDArray[np.uint32]
U1 = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]

#: Gateway control records (ErrorMsg, SymbolMappingMsg, SystemMsg): never market data.
CONTROL_RTYPES: Final = (0x15, 0x16, 0x17)
_HEADER: Final = 16


def walk_records(body: npt.NDArray[np.uint8]) -> tuple[I8, int]:
    """Record boundaries in ``body`` from each record's length byte.

    Returns ``(offsets, end)``: ``offsets`` has one entry per complete record plus ``end``, the
    byte where the complete records stop. Bytes after ``end`` are a torn record (cut short, or
    a zero length byte as a zero-filled tail leaves). All-equal lengths, the case of a
    single-schema stream, are checked with one strided comparison.
    """
    n = len(body)
    if n == 0:
        return np.zeros(1, dtype=np.int64), 0
    first = int(body[0]) * 4
    pos = 0
    if first >= _HEADER:
        full = n // first
        if full and bool((body[0 : full * first : first] == body[0]).all()):
            pos = full * first
    offsets = np.arange(0, pos + 1, first, dtype=np.int64) if pos else np.zeros(1, np.int64)
    # Past the uniform prefix (mixed record sizes, or the torn tail): walk one record at a time.
    extra: list[int] = []
    while pos < n:
        length = int(body[pos]) * 4
        if length < _HEADER or pos + length > n:
            break
        pos += length
        extra.append(pos)
    if extra:
        offsets = np.concatenate([offsets, np.asarray(extra, dtype=np.int64)])
    return offsets, pos


def _column(
    data: npt.NDArray[np.uint8], starts: I8, offset: int, dtype: str
) -> npt.NDArray[np.generic]:
    """One little-endian header field of every record, read at ``starts + offset``."""
    width = np.dtype(dtype).itemsize
    if len(starts) == 0:
        return np.zeros(0, dtype=dtype)
    cols = data[(starts + offset)[:, None] + np.arange(width)]
    return np.ascontiguousarray(cols).view(dtype).reshape(len(starts))


@dataclass(frozen=True, eq=False)
class RecordBlock:
    """Consecutive raw records: ``data[offsets[i]:offsets[i + 1]]`` is record ``i``."""

    data: bytes
    offsets: I8
    rtype: U1
    instrument_id: U4
    ts_event: U8
    record_size: int | None  # set when every record has this size

    @classmethod
    def empty(cls) -> RecordBlock:
        """A block without records."""
        return cls(
            b"",
            np.zeros(1, dtype=np.int64),
            np.zeros(0, dtype=np.uint8),
            np.zeros(0, dtype=np.uint32),
            np.zeros(0, dtype=np.uint64),
            None,
        )

    @classmethod
    def from_records(cls, records: Sequence[bytes]) -> RecordBlock:
        """A block of records given one ``bytes`` each (as ``bytes(record)`` gives them)."""
        if not records:
            return cls.empty()
        lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
        offsets = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        size = int(lengths[0])
        uniform = bool((lengths == size).all())
        return cls.from_bytes(b"".join(records), offsets, size if uniform else None)

    @classmethod
    def parse(cls, data: bytes) -> tuple[RecordBlock, int]:
        """The complete records at the start of ``data`` and the byte where they end (bytes
        after it are a torn record, see :func:`walk_records`)."""
        offsets, end = walk_records(np.frombuffer(data, dtype=np.uint8))
        if end == 0:
            return cls.empty(), 0
        sizes = np.diff(offsets)
        uniform = int(sizes[0]) if bool((sizes == sizes[0]).all()) else None
        return cls.from_bytes(data if end == len(data) else data[:end], offsets, uniform), end

    @classmethod
    def from_bytes(cls, data: bytes, offsets: I8, record_size: int | None = None) -> RecordBlock:
        """A block over ``data`` whose records start at ``offsets[:-1]``."""
        raw = np.frombuffer(data, dtype=np.uint8)
        n = len(offsets) - 1
        if record_size is not None and n:
            table = raw[: n * record_size].reshape(n, record_size)
            rtype = table[:, 1].copy()
            iid = np.ascontiguousarray(table[:, 4:8]).view("<u4").reshape(n)
            ts = np.ascontiguousarray(table[:, 8:16]).view("<u8").reshape(n)
        else:
            starts = offsets[:-1]
            rtype = raw[starts + 1] if n else np.zeros(0, dtype=np.uint8)
            iid = _column(raw, starts, 4, "<u4")
            ts = _column(raw, starts, 8, "<u8")
        return cls(
            data,
            offsets,
            rtype.astype(np.uint8, copy=False),
            iid.astype(np.uint32, copy=False),
            ts.astype(np.uint64, copy=False),
            record_size,
        )

    def __len__(self) -> int:
        return len(self.rtype)

    @property
    def nbytes(self) -> int:
        """Bytes of all records."""
        return len(self.data)

    def record(self, index: int) -> bytes:
        """The raw bytes of one record."""
        return self.data[int(self.offsets[index]) : int(self.offsets[index + 1])]

    def records(self) -> list[bytes]:
        """The raw bytes of every record."""
        return [self.record(i) for i in range(len(self))]

    def control_mask(self) -> Mask:
        """Which records are gateway control records (errors, mappings, system messages)."""
        return np.isin(self.rtype, CONTROL_RTYPES)

    def select(self, keep: Mask) -> RecordBlock:
        """The records where ``keep`` is true, in order (the block itself if all are kept)."""
        kept = int(np.count_nonzero(keep))
        if kept == len(self):
            return self
        if kept == 0:
            return RecordBlock.empty()
        raw = np.frombuffer(self.data, dtype=np.uint8)
        lengths = np.diff(self.offsets)
        if self.record_size is not None:
            table = raw.reshape(len(self), self.record_size)
            data = table[keep].tobytes()
            size: int | None = self.record_size
        else:
            data = raw[np.repeat(keep, lengths)].tobytes()
            kept_lengths = lengths[keep]
            size = int(kept_lengths[0]) if bool((kept_lengths == kept_lengths[0]).all()) else None
        offsets = np.zeros(kept + 1, dtype=np.int64)
        np.cumsum(lengths[keep], out=offsets[1:])
        return RecordBlock(
            data,
            offsets,
            self.rtype[keep],
            self.instrument_id[keep],
            self.ts_event[keep],
            size,
        )

    def slice(self, lo: int, hi: int) -> RecordBlock:
        """Records ``lo`` to ``hi`` (exclusive)."""
        if lo == 0 and hi == len(self):
            return self
        a, b = int(self.offsets[lo]), int(self.offsets[hi])
        return RecordBlock(
            self.data[a:b],
            self.offsets[lo : hi + 1] - a,
            self.rtype[lo:hi],
            self.instrument_id[lo:hi],
            self.ts_event[lo:hi],
            self.record_size,
        )
