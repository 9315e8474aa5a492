"""Replay Databento MBO files (``.dbn`` / ``.dbn.zst``, DBN versions 1-3) as event batches.

Every batch is a numpy array of :data:`engine.events.EVENT_DTYPE`, so the book and everything
downstream never see where events came from.

Why this module decodes the byte stream itself instead of calling ``DBNStore.to_ndarray()``:
``databento`` 0.87 returns silently-partial data for several damaged files (a ``.dbn.zst`` cut
inside its last zstd frame, or cut on a record boundary, decodes "fine"; a cut inside a record only
emits a ``BentoWarning``) and it leaves file handles open. Here the header is parsed by
``databento_dbn.Metadata.decode`` and the records are viewed with the very dtypes ``databento``
uses for ``to_ndarray()`` (one per DBN version), but the zstd frames are decoded with
``zstandard`` so that an incomplete frame, a bad checksum or a partial record is always an error.

Guarantees and rules (see :func:`replay_files`):

* **File order**: files are ordered by their *metadata start* (the query start in the DBN header),
  ties broken by path. Two files whose metadata ranges ``[start, end)`` intersect are an
  :class:`OverlappingFilesError`; a file without a metadata end (a live recording) may only be last.
* **Record order**: ``ts_recv`` never decreases, within a file (:class:`UnsortedFileError`) and
  across files (:class:`OverlappingFilesError`, a backstop for files whose headers do not tell).
* **Window end** ``end_ns`` on ``ts_recv``: reading stops at the first record at or after it.
  There is deliberately no start filter here: every record before a session's start is needed to
  build an exact book at the start. Consumers treat records before the start as warm-up (the silver
  builder applies them to the book without opening bins).
* **Damage is never silent**: a damaged file raises a :class:`ReplayError` subclass naming the
  file. Because replay streams, batches decoded before the damage was reached have already been
  yielded when the error is raised. Undetectable: a plain ``.dbn`` cut exactly on a record
  boundary, and flipped bits inside record payloads of a plain ``.dbn`` (DBN has no checksum;
  ``.dbn.zst`` files carry a zstd content checksum).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import databento_dbn
import numpy as np
import numpy.typing as npt

# zstandard is databento's own zstd dependency (pinned in requirements.lock); it is used directly
# because databento's stream reader does not report an incomplete last frame.
import zstandard
from databento.common.constants import (
    SCHEMA_STRUCT_MAP,
    SCHEMA_STRUCT_MAP_V1,
    SCHEMA_STRUCT_MAP_V2,
)

from engine.events import EVENT_DTYPE
from engine.replay_kernel import (
    BAD_ACTION,
    BAD_RECORD,
    BAD_SIDE,
    CONVERT_DONE,
    CONVERT_END,
    CONVERT_FULL,
    GOES_BACK,
    MBO_RTYPE,
    NO_END,
    convert_mbo_records,
)

__all__ = [
    "CorruptFileError",
    "EventArray",
    "FileSummary",
    "MissingFileError",
    "NotMboError",
    "OverlappingFilesError",
    "ReplayError",
    "TruncatedFileError",
    "UnknownInstrumentError",
    "UnsortedFileError",
    "UnsupportedFileError",
    "file_summary",
    "in_zone",
    "paced",
    "replay_files",
    "session_window_ns",
    "utc_ns",
]

EventArray = npt.NDArray[np.void]
"""A batch of events: a 1-d array of :data:`EVENT_DTYPE`."""

PathLike = str | os.PathLike[str]

# Compressed bytes fed to zstd per step: the first read is small so that reading a header stays
# cheap, later ones double up to the largest so that the per-step overhead vanishes.
_ZSTD_FIRST_READ: Final = 1 << 16
_ZSTD_LARGEST_READ: Final = 1 << 20
# Bytes read per step from a plain file.
_PLAIN_READ: Final = 1 << 22
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_DBN_MAGIC: Final = b"DBN"
_DBN_PRELUDE: Final = 8  # b"DBN" + version byte + u32 metadata length
DBN_STRUCT_MAPS: Final[dict[int, dict[Any, Any]]] = {
    1: SCHEMA_STRUCT_MAP_V1,
    2: SCHEMA_STRUCT_MAP_V2,
    3: SCHEMA_STRUCT_MAP,
}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Keep each file's own DBN version (its record layout); the stub types enum members as int.
_AS_IS: Final = cast("databento_dbn.VersionUpgradePolicy", databento_dbn.VersionUpgradePolicy.AS_IS)


# --------------------------------------------------------------------------------------- errors


class ReplayError(Exception):
    """A file cannot be replayed. The message always starts with the file path."""

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions cross process boundaries (workers, pools); keep them picklable.
        return (type(self), (self.path, self.problem))


class MissingFileError(ReplayError, FileNotFoundError):
    """The path does not exist (also a ``FileNotFoundError``)."""


class CorruptFileError(ReplayError):
    """Not a DBN file, a corrupt zstd stream, a corrupt header or an impossible record."""


class TruncatedFileError(ReplayError):
    """The file is empty or ends inside its header, a zstd frame or a record."""


class UnsupportedFileError(ReplayError):
    """A valid DBN file this module cannot replay (e.g. a DBN version newer than 3)."""


class NotMboError(UnsupportedFileError):
    """The file's schema is not MBO (e.g. mbp-1, mbp-10, or a mixed-schema live recording)."""


class UnsortedFileError(ReplayError):
    """Records inside one file are not in ``ts_recv`` order."""


class UnknownInstrumentError(ReplayError):
    """The requested raw symbol or instrument id is not in the file's symbology."""


class OverlappingFilesError(ReplayError):
    """Two files cover overlapping time; ``path`` and ``other_path`` name both."""

    def __init__(self, path: PathLike, problem: str, other_path: PathLike) -> None:
        self.other_path = Path(other_path)
        super().__init__(path, problem)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem, self.other_path))


# --------------------------------------------------------------------------------- byte sources


class _PlainSource:
    """Bytes of an uncompressed ``.dbn`` file."""

    incomplete = False  # a plain file has no framing that could be cut short

    def __init__(self, fh: BinaryIO, head: bytes) -> None:
        self._fh = fh
        self._head = head  # bytes already consumed while sniffing the magic

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the file."""
        parts = [self._head[:n]]
        self._head = self._head[n:]
        want = n - len(parts[0])
        while want > 0:
            chunk = self._fh.read(want)
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def read_some(self) -> bytes:
        """The next bytes of the file, as many as one read gives; empty at the end."""
        if self._head:
            head, self._head = self._head, b""
            return head + self._fh.read(_PLAIN_READ)
        return self._fh.read(_PLAIN_READ)

    def verify_frame(self) -> None:
        """Nothing to verify: DBN has no checksum of its own."""


class _ZstdSource:
    """Decompressed bytes of a ``.dbn.zst`` file, frame by frame.

    ``incomplete`` becomes true when the file ends inside a frame: zstd then has no end-of-frame
    marker and no checksum to confirm, and Databento's own reader would return what it got.
    """

    def __init__(self, fh: BinaryIO, head: bytes, path: Path) -> None:
        self._fh = fh
        self._pending = head  # compressed bytes read but not yet fed
        self._path = path
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._frame_started = False
        self._out: list[bytes] = []  # decompressed, not yet read
        self._out_bytes = 0
        self._read_size = _ZSTD_FIRST_READ
        self._frames_done = 0
        self._at_eof = False
        self.incomplete = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes; fewer only at the end of the stream."""
        while self._out_bytes < n and not self._at_eof:
            self._pump()
        data = self._take()
        if len(data) > n:
            self._out, self._out_bytes = [data[n:]], len(data) - n
            data = data[:n]
        return data

    def read_some(self) -> bytes:
        """The next decompressed bytes, as many as one step gives; empty at the end."""
        while not self._out_bytes and not self._at_eof:
            self._pump()
        return self._take()

    def verify_frame(self) -> None:
        """Decompress the rest of the current frame, dropping it, so that damage zstd detects
        there (its content checksum) raises :class:`CorruptFileError`."""
        frames = self._frames_done
        while self._frames_done == frames and not self._at_eof:
            self._out, self._out_bytes = [], 0
            self._pump()

    def _take(self) -> bytes:
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out, self._out_bytes = [], 0
        return data

    def _pump(self) -> None:
        chunk = self._pending or self._fh.read(self._read_size)
        self._read_size = min(2 * self._read_size, _ZSTD_LARGEST_READ)
        self._pending = b""
        if not chunk:
            self._at_eof = True
            self.incomplete = self._frame_started
            return
        while chunk:
            try:
                out = self._frame.decompress(chunk)
            except zstandard.ZstdError as exc:
                raise CorruptFileError(self._path, f"corrupt zstd stream ({exc})") from exc
            if out:
                self._out.append(out)
                self._out_bytes += len(out)
            self._frame_started = True
            if not self._frame.eof:
                break
            # A file may hold several frames (Databento writes the metadata in its own frame).
            self._frames_done += 1
            chunk = self._frame.unused_data
            self._frame = self._dctx.decompressobj()
            self._frame_started = False


# ------------------------------------------------------------------------------------ DBN file


class _DbnFile:
    """An open DBN file: its decoded header, then its records as raw numpy arrays.

    Use as a context manager so the file handle is closed even when a consumer stops early.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        except FileNotFoundError as exc:
            raise MissingFileError(path, "no such file") from exc
        except OSError as exc:
            raise ReplayError(path, f"cannot open file ({exc.strerror})") from exc
        try:
            self._source = self._sniff()
            self.metadata, self.version = self._read_header()
            self.compressed = isinstance(self._source, _ZstdSource)
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> _DbnFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handle."""
        self._fh.close()

    @property
    def schema(self) -> str | None:
        """The schema name from the header (``"mbo"``, ``"mbp-1"``, ...), None for mixed files."""
        schema = self.metadata.schema
        return None if schema is None else str(schema)

    def record_dtype(self) -> np.dtype[np.void]:
        """The numpy dtype of one record, as ``databento`` uses it for this DBN version.

        ``S1`` char fields (action, side) become ``u1`` so they are ASCII codes right away.
        """
        schema = self.metadata.schema
        if schema is None:
            raise UnsupportedFileError(
                self.path,
                "schema is not set (a mixed-schema file, e.g. a live recording); "
                "only single-schema files are supported",
            )
        try:
            struct = DBN_STRUCT_MAPS[self.version][schema]
        except KeyError as exc:
            raise UnsupportedFileError(self.path, f"schema {schema} is not supported") from exc
        fields = [(name, "u1" if code == "S1" else code) for name, code in struct._dtypes]
        if self.metadata.ts_out:
            fields.append(("ts_out", "u8"))  # live gateways append a send timestamp
        return np.dtype(fields)

    def raw_chunks(self) -> Iterator[npt.NDArray[np.void]]:
        """Yield the records as they are decompressed, in arrays over the decoded bytes (no
        copy); raise at the end when the file stops inside a record or a zstd frame.

        A record split between two reads comes out alone, so no read is ever copied whole.
        """
        dtype = self.record_dtype()
        size = dtype.itemsize
        tail = b""
        done = 0
        while data := self._source.read_some():
            skip = 0
            if tail:
                skip = size - len(tail)
                head = tail + data[:skip]
                if len(head) < size:
                    tail = head
                    continue
                done += 1
                yield np.frombuffer(head, dtype=dtype)
            whole = (len(data) - skip) // size
            if whole:
                done += whole
                yield np.frombuffer(data, dtype=dtype, count=whole, offset=skip)
            tail = data[skip + whole * size :]
        if tail:
            raise TruncatedFileError(
                self.path, f"truncated: file ends inside a record after {done} records"
            )
        if self._source.incomplete:
            raise TruncatedFileError(
                self.path, f"truncated: file ends inside a zstd frame after {done} records"
            )

    def _sniff(self) -> _PlainSource | _ZstdSource:
        head = self._fh.read(4)
        if not head:
            raise TruncatedFileError(self.path, "truncated: file is empty (0 bytes)")
        # Skippable zstd frames (0x184D2A5?) are legal at the start of a zstd file.
        if head == _ZSTD_MAGIC or (head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50):
            return _ZstdSource(self._fh, head, self.path)
        if head[:3] == _DBN_MAGIC:
            return _PlainSource(self._fh, head)
        if len(head) < 4 and (_DBN_MAGIC.startswith(head) or _ZSTD_MAGIC.startswith(head)):
            raise TruncatedFileError(self.path, "truncated: file ends inside the DBN header")
        raise CorruptFileError(self.path, f"not a DBN file (bad magic bytes {head!r})")

    def _read_header(self) -> tuple[Any, int]:
        prelude = self._source.read(_DBN_PRELUDE)
        if prelude[:3] != _DBN_MAGIC[: len(prelude)]:
            # Only reachable for zstd files: plain files were sniffed by their first bytes.
            raise CorruptFileError(
                self.path, "not a DBN file (the zstd data does not start with the DBN magic bytes)"
            )
        if len(prelude) < _DBN_PRELUDE:
            raise TruncatedFileError(self.path, "truncated: file ends inside the DBN header")
        version = prelude[3]
        if version not in DBN_STRUCT_MAPS:
            raise UnsupportedFileError(
                self.path, f"DBN version {version} is not supported (supported: 1, 2, 3)"
            )
        length = int.from_bytes(prelude[4:8], "little")
        body = self._source.read(length)
        if len(body) < length:
            raise TruncatedFileError(
                self.path,
                f"truncated: file ends inside the DBN metadata ({len(body)} of {length} bytes)",
            )
        try:
            metadata = databento_dbn.Metadata.decode(prelude + body, upgrade_policy=_AS_IS)
        except databento_dbn.DBNError as exc:
            raise CorruptFileError(self.path, f"corrupt DBN metadata ({exc})") from exc
        return metadata, version

    def check(self, arr: npt.NDArray[np.void], done: int) -> None:
        """Raise for the first record of ``arr`` (``done`` records into the file) that is not
        one of the file's schema."""
        if self.schema == "mbo":
            outcome, i = _copy_mbo(arr, np.empty(len(arr), dtype=EVENT_DTYPE))
            if outcome != CONVERT_DONE:
                raise self.bad_record(outcome, arr[i], done + i)
            return
        # The record header repeats the record length (in 4-byte words): a cheap guard against
        # a misaligned or corrupted stream, which would otherwise decode as plausible garbage.
        bad = arr["length"].astype(np.int64) * 4 != arr.dtype.itemsize
        if bad.any():
            i = int(np.argmax(bad))
            raise self.bad_record(BAD_RECORD, arr[i], done + i)

    def bad_record(self, outcome: int, record: np.void, index: int) -> CorruptFileError:
        """The error for record number ``index`` of the file, which the kernel stopped at with
        ``outcome`` (a ``BAD_*`` code). A garbled record of a compressed file is most likely
        damage to its zstd data, which zstd names once it has read the frame's checksum."""
        self._source.verify_frame()
        if outcome in (BAD_ACTION, BAD_SIDE):
            field = "action" if outcome == BAD_ACTION else "side"
            return CorruptFileError(
                self.path, f"record {index} has invalid {field} byte {int(record[field]):#04x}"
            )
        want = f"rtype {MBO_RTYPE:#04x}, " if self.schema == "mbo" else ""
        return CorruptFileError(
            self.path,
            f"record {index} has rtype {int(record['rtype']):#04x} and length "
            f"{int(record['length']) * 4} bytes; expected {self.schema} records "
            f"({want}{record.dtype.itemsize} bytes)",
        )


def _symbol_map(metadata: Any) -> dict[str, tuple[int, ...]]:
    """raw symbol -> instrument ids it maps to anywhere in the file's date range."""
    result: dict[str, tuple[int, ...]] = {}
    for raw_symbol, intervals in metadata.mappings.items():
        ids = {int(iv["symbol"]) for iv in intervals if str(iv["symbol"]).isdigit()}
        result[str(raw_symbol)] = tuple(sorted(ids))
    return result


def mbo_to_events(raw: npt.NDArray[np.void]) -> EventArray:
    """Every record of ``raw`` (DBN MBO records) in the envelope, checked and copied by the
    replay kernel as replay does it (in any ``ts_recv`` order). Raises ``ValueError`` naming
    the first record that is not an MBO record."""
    out = np.empty(len(raw), dtype=EVENT_DTYPE)
    outcome, index = _copy_mbo(raw, out)
    if outcome != CONVERT_DONE:
        record = raw[index]
        raise ValueError(
            f"record {index} is not an MBO record (rtype {int(record['rtype']):#04x}, length "
            f"{int(record['length']) * 4} bytes, action {int(record['action']):#04x}, side "
            f"{int(record['side']):#04x})"
        )
    return out


def _copy_mbo(raw: npt.NDArray[np.void], out: EventArray) -> tuple[int, int]:
    """Check and copy all of ``raw`` into ``out`` (as long): ``(CONVERT_DONE, len(raw))``, or
    the ``BAD_*`` outcome and index of the first record that is not an MBO record."""
    outcome, index, _ = convert_mbo_records(
        raw, 0, raw.dtype.itemsize, out, 0, _NO_IDS, False, NO_END, False, _no_ts()
    )
    # FULL: the last record filled ``out``, which is as long as ``raw``.
    return (CONVERT_DONE, index) if outcome == CONVERT_FULL else (outcome, index)


def _fmt_ns(ns: int | None) -> str:
    """A UTC ISO timestamp with nanoseconds, for error messages."""
    if ns is None:
        return "open end"
    seconds, frac = divmod(ns, 1_000_000_000)
    try:
        stamp = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    except OverflowError:  # e.g. UNDEF_TIMESTAMP in a header: still report the raw value
        return f"{ns} ns"
    return f"{stamp}.{frac:09d}Z"


# ------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class FileSummary:
    """What one DBN file holds (for ``qmachina`` CLI listings)."""

    path: Path
    dbn_version: int
    schema: str
    dataset: str
    compressed: bool
    record_count: int
    instrument_ids: tuple[int, ...]
    symbols: dict[str, tuple[int, ...]]  # raw symbol -> instrument ids
    start_ns: int  # metadata (query) start
    end_ns: int | None  # metadata (query) end; None when open-ended
    first_ts_recv: int | None  # None when the file has no records (or no ts_recv field)
    last_ts_recv: int | None


def file_summary(path: PathLike) -> FileSummary:
    """Decode a whole single-schema DBN file (any schema) and summarise it.

    Raises the same :class:`ReplayError` subclasses as replay for damaged files.
    """
    p = Path(path)
    with _DbnFile(p) as f:
        ids: set[int] = set()
        count = 0
        first: int | None = None
        last: int | None = None
        for arr in f.raw_chunks():
            f.check(arr, count)
            count += len(arr)
            ids.update(np.unique(arr["instrument_id"]).tolist())
            if arr.dtype.names is not None and "ts_recv" in arr.dtype.names:
                first = int(arr["ts_recv"][0]) if first is None else first
                last = int(arr["ts_recv"][-1])
        return FileSummary(
            path=p,
            dbn_version=f.version,
            schema=str(f.schema),
            dataset=str(f.metadata.dataset),
            compressed=f.compressed,
            record_count=count,
            instrument_ids=tuple(sorted(ids)),
            symbols=_symbol_map(f.metadata),
            start_ns=int(f.metadata.start),
            end_ns=None if f.metadata.end is None else int(f.metadata.end),
            first_ts_recv=first,
            last_ts_recv=last,
        )


# -------------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class _PlannedFile:
    path: Path
    start_ns: int
    end_ns: int | None
    ids: npt.NDArray[np.uint32] | None  # instrument filter resolved for this file


def _plan_file(path: Path, instrument_id: int | None, raw_symbol: str | None) -> _PlannedFile:
    """Read one header: check the schema and resolve the instrument filter."""
    with _DbnFile(path) as f:
        if f.schema != "mbo":
            what = (
                "not set (a mixed-schema file, e.g. a live recording)"
                if f.schema is None
                else f.schema
            )
            raise NotMboError(path, f"schema is {what}, expected mbo")
        f.record_dtype()  # raises early for layouts we cannot decode
        symbols = _symbol_map(f.metadata)
        have = ", ".join(f"{s} -> {list(i)}" for s, i in sorted(symbols.items())) or "none"
        ids: npt.NDArray[np.uint32] | None = None
        if raw_symbol is not None:
            if raw_symbol not in symbols or not symbols[raw_symbol]:
                raise UnknownInstrumentError(
                    path,
                    f"raw symbol {raw_symbol!r} is not in this file's symbology (it has: {have})",
                )
            ids = np.array(symbols[raw_symbol], dtype=np.uint32)
        elif instrument_id is not None:
            mapped = {i for found in symbols.values() for i in found}
            # Files without symbology (e.g. stype_in=instrument_id) cannot be checked up front.
            if mapped and instrument_id not in mapped:
                raise UnknownInstrumentError(
                    path,
                    f"instrument id {instrument_id} is not in this file's symbology "
                    f"(it has: {have})",
                )
            ids = np.array([instrument_id], dtype=np.uint32)
        end = f.metadata.end
        return _PlannedFile(path, int(f.metadata.start), None if end is None else int(end), ids)


def _order_files(plans: list[_PlannedFile]) -> list[_PlannedFile]:
    """Sort by metadata start; reject files whose metadata ranges intersect."""
    ordered = sorted(plans, key=lambda p: (p.start_ns, str(p.path)))
    for a, b in itertools.pairwise(ordered):
        if a.end_ns is None:
            raise OverlappingFilesError(
                b.path,
                f"cannot follow {a.path}, which has no end time in its metadata "
                "(open-ended, e.g. a live recording) and so must be the last file",
                a.path,
            )
        if a.end_ns > b.start_ns:
            raise OverlappingFilesError(
                b.path,
                f"overlaps {a.path} in time: {a.path} covers [{_fmt_ns(a.start_ns)}, "
                f"{_fmt_ns(a.end_ns)}) and {b.path} covers [{_fmt_ns(b.start_ns)}, "
                f"{_fmt_ns(b.end_ns)}) (one instrument stream per replay; pass disjoint files)",
                a.path,
            )
    return ordered


def replay_files(
    paths: Iterable[PathLike],
    *,
    instrument_id: int | None = None,
    raw_symbol: str | None = None,
    end_ns: int | None = None,
    batch_size: int = 65_536,
) -> Iterator[EventArray]:
    """Stream MBO events from several DBN files in time order, as EVENT_DTYPE batches.

    * Files are ordered by their **metadata start** (ties: path); files whose metadata ranges
      ``[start, end)`` intersect raise :class:`OverlappingFilesError` naming both. Records must
      also never go back in ``ts_recv`` across files or within one (checked while streaming).
    * ``instrument_id`` or ``raw_symbol`` (resolved per file through its symbology) keeps one
      instrument; a symbol or id missing from a file's symbology is an
      :class:`UnknownInstrumentError` that lists what the file has.
    * Reading stops at the first record with ``ts_recv`` at or after ``end_ns``. Records before a
      session start are not filtered: the book needs them (see the module docstring).
    * Every batch holds ``batch_size`` events except the last; no empty batches.

    Headers are checked when this is called (schema, symbology, overlaps), so those errors raise
    before any data flows; damage inside the record stream raises while iterating.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if instrument_id is not None and raw_symbol is not None:
        raise ValueError("pass instrument_id or raw_symbol, not both")
    if instrument_id is not None and not 0 <= instrument_id <= 0xFFFFFFFF:
        raise ValueError(f"instrument_id must fit in uint32, got {instrument_id}")
    file_list = [Path(p) for p in paths]
    if not file_list:
        raise ValueError("no files to replay")
    plans = _order_files([_plan_file(p, instrument_id, raw_symbol) for p in file_list])
    return _stream(plans, end_ns, batch_size)


def _stream(plans: list[_PlannedFile], end_ns: int | None, batch_size: int) -> Iterator[EventArray]:
    end = NO_END if end_ns is None else np.uint64(max(end_ns, 0))
    last_ts = _no_ts()  # the last ts_recv seen, across files
    prev_path = Path()
    out = np.empty(batch_size, dtype=EVENT_DTYPE)
    filled = 0
    for plan in plans:
        ids = _NO_IDS if plan.ids is None else plan.ids
        with _DbnFile(plan.path) as f:
            done = 0  # records of this file before the current chunk
            for raw in f.raw_chunks():
                index = 0
                while True:
                    before = int(last_ts[0])
                    outcome, index, filled = convert_mbo_records(
                        raw, index, raw.dtype.itemsize, out, filled, ids, plan.ids is not None,
                        end, True, last_ts,
                    )  # fmt: skip
                    if outcome == CONVERT_FULL:
                        yield out
                        out = np.empty(batch_size, dtype=EVENT_DTYPE)
                        filled = 0
                    elif outcome == CONVERT_DONE:
                        break
                    elif outcome == CONVERT_END:
                        # ts_recv is sorted (checked), so nothing later can fall in the window.
                        if filled:
                            yield out[:filled]
                        return
                    elif outcome == GOES_BACK:
                        raise _goes_back(plan.path, prev_path, done + index, raw[index], before)
                    else:
                        raise f.bad_record(outcome, raw[index], done + index)
                done += len(raw)
                prev_path = plan.path
    if filled:
        yield out[:filled]


def _goes_back(
    path: Path, prev_path: Path, index: int, record: np.void, before: int
) -> ReplayError:
    ts = int(record["ts_recv"])
    if index == 0:
        return OverlappingFilesError(
            path,
            f"its first record ({_fmt_ns(ts)}) is before the last record of {prev_path} "
            f"({_fmt_ns(before)}): the files overlap in time",
            prev_path,
        )
    return UnsortedFileError(
        path, f"record {index} goes back in ts_recv ({_fmt_ns(ts)} after {_fmt_ns(before)})"
    )


def _no_ts() -> npt.NDArray[np.uint64]:
    """The kernel's carried "last ts_recv" before any record (nothing is earlier than 0)."""
    return np.zeros(1, dtype=np.uint64)


_NO_IDS: Final = np.zeros(0, dtype=np.uint32)


# ------------------------------------------------------------------------------------- pacing


def paced(
    batches: Iterable[EventArray],
    speed: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    *,
    resolution_s: float = 0.001,
) -> Iterator[EventArray]:
    """Yield events paced on the wall clock by ``ts_recv``, ``speed`` times faster than real time.

    The first event sets the origin. An event with ``ts_recv = t`` is released no earlier than
    ``wall0 + (t - t0) / speed`` seconds. Batches are split into slices of events due within the
    same ``resolution_s`` of wall time; a slice is released when its last event is due, so every
    event arrives on time or at most ``resolution_s`` late (plus the consumer's own lag: a slow
    consumer is caught up without sleeping, never drifted). ``clock`` and ``sleep`` are
    injectable for deterministic tests; ``sleep`` must let ``clock`` advance.
    """
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a finite number > 0, got {speed} (fast-forward: iterate)")
    if not (math.isfinite(resolution_s) and resolution_s >= 0):
        raise ValueError(f"resolution_s must be a finite number >= 0, got {resolution_s}")
    return _paced(batches, speed, clock, sleep, resolution_s)


def _paced(
    batches: Iterable[EventArray],
    speed: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    resolution_s: float,
) -> Iterator[EventArray]:
    ns_per_wall_s = speed * 1e9  # event-time nanoseconds per wall-clock second
    bucket_ns = resolution_s * ns_per_wall_s
    t0: int | None = None
    wall0 = 0.0
    high = 0  # running max of ts_recv, so a step back in time is simply "already due"
    for batch in batches:
        if len(batch) == 0:
            continue
        ts = batch["ts_recv"]
        if t0 is None:
            t0, high, wall0 = int(ts[0]), int(ts[0]), clock()
        running = np.maximum.accumulate(np.maximum(ts, np.uint64(high)))
        high = int(running[-1])
        rel = (running - np.uint64(t0)).astype(np.float64)  # event ns since the first event
        key = np.floor(rel / bucket_ns) if bucket_ns > 0 else rel
        cuts = (np.flatnonzero(key[1:] != key[:-1]) + 1).tolist()
        for lo, hi in zip([0, *cuts], [*cuts, len(batch)], strict=True):
            due = wall0 + rel[hi - 1] / ns_per_wall_s
            while (wait := due - clock()) > 0:
                sleep(wait)
            yield batch[lo:hi]


# ---------------------------------------------------------------------------- session windows


def session_window_ns(start: datetime | str, end: datetime | str, tz: str) -> tuple[int, int]:
    """A session ``[start, end)`` in UTC nanoseconds, from venue-local times.

    Naive datetimes and ISO strings without an offset (``"2023-12-25T17:00"``) are local times in
    ``tz`` (e.g. ``"America/Chicago"`` for CME), with the offset in force on that date (DST aware).
    A local time that does not exist (spring-forward gap) or exists twice (fall-back) is a
    ``ValueError``: pass an aware datetime or an ISO string with an offset to choose.
    """
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {tz!r}") from exc
    start_ns = utc_ns(_localize(start, zone, "start"))
    end_ns = utc_ns(_localize(end, zone, "end"))
    if end_ns <= start_ns:
        raise ValueError(f"session end ({end}) must be after its start ({start}) in {tz}")
    return start_ns, end_ns


def _localize(value: datetime | str, zone: ZoneInfo, what: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"session {what} {value!r} is not an ISO datetime") from exc
    if value.tzinfo is not None:
        return value
    try:
        return in_zone(value, zone)
    except ValueError as exc:
        raise ValueError(f"session {what} {exc}") from None


def in_zone(local: datetime, zone: ZoneInfo) -> datetime:
    """Attach ``zone`` to a wall-clock time, refusing times a DST change makes unclear."""
    early, late = local.replace(tzinfo=zone, fold=0), local.replace(tzinfo=zone, fold=1)
    if early.utcoffset() == late.utcoffset():
        return early
    # A wall time that does not survive a round trip through UTC is inside a DST gap.
    if early.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != local:
        raise ValueError(f"{local.isoformat()} does not exist in {zone.key} (skipped by DST)")
    raise ValueError(f"{local.isoformat()} is ambiguous in {zone.key} (repeated by DST)")


def utc_ns(moment: datetime) -> int:
    """Exact integer nanoseconds since the epoch of an aware datetime (no float rounding)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
