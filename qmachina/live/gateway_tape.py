"""The gateway's tape: DBN files merged into one time-ordered sequence of raw records.

Every record is kept byte for byte as it is in its file, so whatever the gateway sends can be
compared with the files. The tape is ordered by each record's *index time* (``ts_recv`` where
the record has one, ``ts_event`` otherwise, as ``DBNRecord.ts_index``); records with the same
index time keep their file order, files in the order given. Control records found in files
(``SymbolMappingMsg``, ``SystemMsg``, ``ErrorMsg``: live recordings hold them) are not market
data: they are left off the tape, and symbol mappings only teach it raw symbols.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import databento_dbn
import numpy as np
import numpy.typing as npt
import zstandard

from engine.replay import DBN_STRUCT_MAPS

__all__ = ["SCHEMAS", "Tape", "TapeError", "load_tape", "schema_code"]

U8 = npt.NDArray[np.uint64]
I8 = npt.NDArray[np.int64]

#: Schema names in ``databento_dbn.Schema`` order; a record's schema is stored as its index here.
SCHEMAS: Final[tuple[str, ...]] = tuple(str(s) for s in databento_dbn.Schema.variants())

_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_PRELUDE: Final = 8  # b"DBN", version byte, u32 metadata length
# Gateway control records: never market data, never on the tape.
_RTYPE_ERROR: Final = 0x15
_RTYPE_SYMBOL_MAPPING: Final = 0x16
_RTYPE_SYSTEM: Final = 0x17
_RTYPE_DEFINITION: Final = 0x13
_CONTROL_RTYPES: Final = frozenset({_RTYPE_ERROR, _RTYPE_SYMBOL_MAPPING, _RTYPE_SYSTEM})
# Intraday replay filters BBO and CBBO on ts_recv, every other schema on ts_event (Databento docs).
_START_ON_TS_RECV: Final = frozenset({"bbo-1s", "bbo-1m", "cbbo-1s", "cbbo-1m"})
_AS_IS: Final = cast("databento_dbn.VersionUpgradePolicy", databento_dbn.VersionUpgradePolicy.AS_IS)


def schema_code(schema: str) -> int:
    """The tape's code for a schema name (``"mbo"``, ``"mbp-1"``, ...)."""
    try:
        return SCHEMAS.index(schema)
    except ValueError:
        raise ValueError(f"unknown schema {schema!r}") from None


def _rtype_tables() -> tuple[dict[int, str], dict[int, int], dict[int, dict[int, int]]]:
    """rtype -> default schema, rtype -> ts_recv offset, version -> rtype -> record size.

    Taken from the dtypes ``databento`` itself decodes records with, so nothing is hard-coded
    here. The first schema of an rtype wins: rtype 0x01 is ``mbp-1`` unless a file's header
    says ``tbbo``.
    """
    default_schema: dict[int, str] = {}
    ts_recv_offset: dict[int, int] = {}
    sizes: dict[int, dict[int, int]] = {}
    for version, struct_map in DBN_STRUCT_MAPS.items():
        sizes[version] = {}
        for schema, struct in struct_map.items():
            rtype = int(databento_dbn.RType.from_schema(schema))
            dtype = np.dtype(struct._dtypes)
            sizes[version][rtype] = dtype.itemsize
            default_schema.setdefault(rtype, str(schema))
            fields = dtype.fields or {}
            if "ts_recv" in fields:
                ts_recv_offset[rtype] = int(fields["ts_recv"][1])
    return default_schema, ts_recv_offset, sizes


_DEFAULT_SCHEMA, _TS_RECV_OFFSET, _RECORD_SIZES = _rtype_tables()


def _as_u8(ts_ns: int) -> np.uint64:
    """A timestamp clamped to the u64 range that DBN timestamps live in."""
    return np.uint64(min(max(ts_ns, 0), 2**64 - 1))


class TapeError(Exception):
    """A file cannot be served; the message starts with the file path."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True, eq=False)
class Tape:
    """Records of one dataset and DBN version in tape order, with per-record index columns.

    ``offsets`` has one more entry than there are records: record ``i`` is
    ``data[offsets[i]:offsets[i + 1]]``. ``record_size`` is set when all records have one size.
    """

    dataset: str
    version: int
    data: bytes
    offsets: I8
    ts_index: U8
    ts_event: U8
    ts_start: U8  # what ``start=`` filters on: ts_event, or ts_recv for BBO and CBBO
    instrument_id: npt.NDArray[np.uint32]
    publisher_id: npt.NDArray[np.uint16]
    schema: npt.NDArray[np.uint8]
    raw_symbols: Mapping[str, int]
    record_size: int | None
    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.ts_index)

    @property
    def start_ns(self) -> int:
        """Index time of the first record."""
        return int(self.ts_index[0])

    @property
    def end_ns(self) -> int:
        """Index time of the last record."""
        return int(self.ts_index[-1])

    @property
    def instrument_ids(self) -> frozenset[int]:
        """Every instrument with a record on the tape."""
        return frozenset(int(i) for i in np.unique(self.instrument_id))

    def symbol_of(self, instrument_id: int) -> str | None:
        """The raw symbol of an instrument, when the files tell it."""
        for symbol, iid in self.raw_symbols.items():
            if iid == instrument_id:
                return symbol
        return None

    def position_before(self, ts_ns: int) -> int:
        """How many records have an index time before ``ts_ns``."""
        return int(np.searchsorted(self.ts_index, _as_u8(ts_ns), side="left"))

    def position_through(self, ts_ns: int) -> int:
        """How many records have an index time at or before ``ts_ns``."""
        return int(np.searchsorted(self.ts_index, _as_u8(ts_ns), side="right"))

    def record(self, position: int) -> bytes:
        """The raw bytes of one record."""
        return self.data[int(self.offsets[position]) : int(self.offsets[position + 1])]

    def records(self, positions: Iterable[int] | I8) -> list[bytes]:
        """The raw bytes of each record at ``positions``."""
        return [self.record(int(p)) for p in positions]

    def gather(self, positions: I8) -> bytes:
        """The records at ``positions`` concatenated, as they go on the wire."""
        if len(positions) == 0:
            return b""
        if self.record_size is not None:
            table = np.frombuffer(self.data, dtype=np.uint8).reshape(-1, self.record_size)
            return table[positions].tobytes()
        view = memoryview(self.data)
        offsets = self.offsets
        return b"".join(view[offsets[p] : offsets[p + 1]] for p in positions)


@dataclass
class _FileRecords:
    """One file's records before merging."""

    path: Path
    dataset: str
    version: int
    body: npt.NDArray[np.uint8]
    offsets: I8  # n + 1 entries into body
    ts_index: U8
    ts_event: U8
    ts_start: U8
    instrument_id: npt.NDArray[np.uint32]
    publisher_id: npt.NDArray[np.uint16]
    schema: npt.NDArray[np.uint8]
    raw_symbols: dict[str, int]
    record_size: int | None


def _decompressed(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TapeError(path, "no such file") from None
    except OSError as exc:
        raise TapeError(path, f"cannot read file ({exc.strerror})") from None
    # Skippable zstd frames (0x184D2A5?) are legal at the start of a zstd file.
    if raw[:4] == _ZSTD_MAGIC or (
        raw[1:4] == b"\x2a\x4d\x18" and raw[:1] and raw[0] & 0xF0 == 0x50
    ):
        try:
            with zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(raw), read_across_frames=True
            ) as reader:
                return reader.read()
        except zstandard.ZstdError as exc:
            raise TapeError(path, f"corrupt zstd stream ({exc})") from None
    return raw


def _walk(path: Path, body: npt.NDArray[np.uint8]) -> I8:
    """Record boundaries: each record header starts with its length in 4-byte words."""
    n = len(body)
    size = int(body[0]) * 4 if n else 0
    if size and n % size == 0:
        lengths = body[0::size]
        rtypes = body[1::size]
        if (lengths == body[0]).all() and (rtypes == body[1]).all():
            return np.arange(0, n + 1, size, dtype=np.int64)
    offsets = [0]
    pos = 0
    raw = body.tobytes()
    while pos < n:
        length = raw[pos] * 4
        if length == 0:
            raise TapeError(path, f"corrupt record at byte {pos} of the body (length 0)")
        pos += length
        offsets.append(pos)
    if pos != n:
        raise TapeError(path, f"truncated: the file ends inside record {len(offsets) - 2}")
    return np.asarray(offsets, dtype=np.int64)


def _field(body: npt.NDArray[np.uint8], starts: I8, offset: int, dtype: str) -> npt.NDArray[Any]:
    """One little-endian field of every record, read at ``starts + offset``."""
    width = np.dtype(dtype).itemsize
    if len(starts) == 0:
        return np.zeros(0, dtype=dtype)
    cols = body[(starts + offset)[:, None] + np.arange(width)]
    return np.ascontiguousarray(cols).view(dtype).reshape(len(starts))


def _symbols_from_records(version: int, records: list[bytes]) -> dict[str, int]:
    """Raw symbols from live symbol mappings and instrument definitions in a file."""
    found: dict[str, int] = {}
    if not records:
        return found
    decoder = databento_dbn.DBNDecoder(
        has_metadata=False, input_version=version, upgrade_policy=_AS_IS
    )
    for record in decoder.write_and_decode(b"".join(records)):
        if isinstance(record, databento_dbn.Metadata):
            continue
        symbol = getattr(record, "stype_out_symbol", None) or getattr(record, "raw_symbol", None)
        if symbol and not str(symbol).isdigit():
            found[str(symbol)] = int(record.instrument_id)
    return found


def _read_file(path: Path) -> _FileRecords:
    data = _decompressed(path)
    if data[:3] != b"DBN":
        raise TapeError(path, f"not a DBN file (starts with {data[:4]!r})")
    if len(data) < _PRELUDE:
        raise TapeError(path, "truncated: the file ends inside the DBN header")
    version = data[3]
    if version not in DBN_STRUCT_MAPS:
        raise TapeError(path, f"DBN version {version} is not supported (supported: 1, 2, 3)")
    meta_end = _PRELUDE + int.from_bytes(data[4:8], "little")
    try:
        metadata = databento_dbn.Metadata.decode(data[:meta_end], upgrade_policy=_AS_IS)
    except databento_dbn.DBNError as exc:
        raise TapeError(path, f"corrupt DBN metadata ({exc})") from None
    if metadata.ts_out:
        raise TapeError(path, "records carry ts_out (a live recording made with ts_out=1)")
    body = np.frombuffer(data, dtype=np.uint8, offset=meta_end)
    offsets = _walk(path, body)
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    rtypes = body[starts + 1] if len(starts) else np.zeros(0, dtype=np.uint8)

    control = np.isin(rtypes, list(_CONTROL_RTYPES))
    symbol_records = (rtypes == _RTYPE_SYMBOL_MAPPING) | (rtypes == _RTYPE_DEFINITION)
    raw_symbols: dict[str, int] = {}
    if metadata.stype_in is not None and str(metadata.stype_in) == "raw_symbol":
        for raw_symbol, intervals in metadata.mappings.items():
            for interval in intervals:
                if str(interval["symbol"]).isdigit():
                    raw_symbols[str(raw_symbol)] = int(interval["symbol"])
    picked = [body[offsets[i] : offsets[i + 1]].tobytes() for i in np.flatnonzero(symbol_records)]
    raw_symbols.update(_symbols_from_records(version, picked))

    keep = np.flatnonzero(~control)
    sizes = _RECORD_SIZES[version]
    schema_names: list[str] = []
    for rtype, length in zip(rtypes[keep].tolist(), lengths[keep].tolist(), strict=True):
        if rtype not in _DEFAULT_SCHEMA:
            raise TapeError(path, f"record type {rtype:#04x} is not a market-data record")
        if sizes.get(rtype, length) != length:
            raise TapeError(
                path,
                f"a record of type {rtype:#04x} is {length} bytes; DBN v{version} has "
                f"{sizes[rtype]}",
            )
        schema_names.append(_DEFAULT_SCHEMA[rtype])
    if metadata.schema is not None:
        # A single-schema file says which schema its records are (tbbo and mbp-1 share a type).
        schema_names = [str(metadata.schema)] * len(keep)
    kept_starts = starts[keep]
    ts_event = _field(body, kept_starts, 8, "<u8")
    ts_index = ts_event.copy()
    for rtype, offset in _TS_RECV_OFFSET.items():
        rows = np.flatnonzero(rtypes[keep] == rtype)
        if len(rows):
            ts_index[rows] = _field(body, kept_starts[rows], offset, "<u8")
    codes = np.asarray([SCHEMAS.index(s) for s in schema_names], dtype=np.uint8)
    ts_start = ts_event.copy()
    for name in _START_ON_TS_RECV:
        rows = np.flatnonzero(codes == SCHEMAS.index(name))
        ts_start[rows] = ts_index[rows]
    kept_lengths = lengths[keep]
    uniform = len(kept_lengths) > 0 and bool((kept_lengths == kept_lengths[0]).all())
    kept_offsets = offsets
    if len(keep) != len(starts):
        # Drop the control records from the body so records stay contiguous.
        pieces = [body[s : s + n] for s, n in zip(kept_starts, kept_lengths, strict=True)]
        body = np.concatenate(pieces) if pieces else body[:0]
        kept_offsets = np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64)
    return _FileRecords(
        path=path,
        dataset=str(metadata.dataset),
        version=version,
        body=body,
        offsets=kept_offsets,
        ts_index=ts_index,
        ts_event=ts_event,
        ts_start=ts_start,
        instrument_id=_field(body, kept_offsets[:-1], 4, "<u4"),
        publisher_id=_field(body, kept_offsets[:-1], 2, "<u2"),
        schema=codes,
        raw_symbols=raw_symbols,
        record_size=int(kept_lengths[0]) if uniform else None,
    )


def load_tape(paths: Sequence[Path | str], symbols: Mapping[str, int] | None = None) -> Tape:
    """Read DBN files (``.dbn`` or ``.dbn.zst``, v1-v3, one schema or a live recording) into
    one tape. ``symbols`` adds or overrides raw symbol -> instrument id mappings.

    All files must be of one dataset and one DBN version: records are served as they are.
    """
    if not paths:
        raise ValueError("the gateway needs at least one DBN file")
    files = [_read_file(Path(p)) for p in paths]
    first = files[0]
    for other in files[1:]:
        if other.dataset != first.dataset:
            raise TapeError(
                other.path,
                f"dataset {other.dataset} differs from {first.dataset} in {first.path}",
            )
        if other.version != first.version:
            raise TapeError(
                other.path,
                f"DBN version {other.version} differs from version {first.version} in "
                f"{first.path}; the gateway serves records as they are, in one version",
            )
    total = sum(len(f.ts_index) for f in files)
    if total == 0:
        raise TapeError(first.path, "no market-data records in the given files")
    ts_index = np.concatenate([f.ts_index for f in files])
    order = np.argsort(ts_index, kind="stable")
    sizes = {f.record_size for f in files if len(f.ts_index)}
    record_size = sizes.pop() if len(sizes) == 1 else None
    if record_size is not None:
        table = np.concatenate([f.body.reshape(-1, record_size) for f in files if len(f.ts_index)])
        data = table[order].tobytes()
        offsets = np.arange(0, (total + 1) * record_size, record_size, dtype=np.int64)
    else:
        chunks: list[bytes] = []
        for f in files:
            view = f.body.tobytes()
            chunks.extend(view[f.offsets[i] : f.offsets[i + 1]] for i in range(len(f.ts_index)))
        ordered = [chunks[i] for i in order]
        data = b"".join(ordered)
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in ordered])]).astype(np.int64)
    raw_symbols: dict[str, int] = {}
    for f in files:
        raw_symbols.update(f.raw_symbols)
    raw_symbols.update(symbols or {})
    return Tape(
        dataset=first.dataset,
        version=first.version,
        data=data,
        offsets=offsets,
        ts_index=ts_index[order],
        ts_event=np.concatenate([f.ts_event for f in files])[order],
        ts_start=np.concatenate([f.ts_start for f in files])[order],
        instrument_id=np.concatenate([f.instrument_id for f in files])[order],
        publisher_id=np.concatenate([f.publisher_id for f in files])[order],
        schema=np.concatenate([f.schema for f in files])[order],
        raw_symbols=raw_symbols,
        record_size=record_size,
        files=tuple(f.path for f in files),
    )
