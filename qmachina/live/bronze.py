"""Bronze: the market records a live session received, as append-only DBN files.

Layout: ``<root>/<session_id>/<YYYYMMDD>.<schema>.dbn``, one uncompressed file per UTC day
(so it can be appended to), each a DBN metadata header written once when the file is created,
then the records' raw bytes exactly as the gateway sent them. A record goes to the day of the
largest ``ts_event`` seen so far, so the files read in name order are the stream in order.

Headers: dataset, schema, stype_in and the subscribed symbols of the session, ``stype_out``
instrument_id, no mappings (symbol mappings are events, not market data). The first file's
``start`` is the session start; a later file starts at its UTC midnight; every file ends at the
next midnight, so the day files tile time and :func:`engine.replay.replay_files` can order them.

The files are the single source of truth for the checkpoint: :meth:`Bronze.open` scans them
(a strided numpy pass when every record has one size), truncates a torn trailing record left
by a crash in the middle of a write (found with the record length byte) and derives the
checkpoint from what remains. While running, the checkpoint moves with each appended block.
An exclusive ``flock`` on ``<session_id>/.lock`` keeps two writers off one session.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Self, cast

import databento_dbn
import numpy as np
import numpy.typing as npt

from qmachina.live.checkpoint import Checkpoint, CheckpointTracker
from qmachina.live.record_block import RecordBlock, walk_records

__all__ = [
    "Bronze",
    "BronzeCorruptError",
    "BronzeError",
    "BronzeLockedError",
    "BronzeMismatchError",
    "BronzeStream",
    "TornRecord",
    "read_bronze_file",
]

NS_PER_DAY: Final = 86_400 * 1_000_000_000
DEFAULT_BUFFER_BYTES: Final = 1 << 20
_PRELUDE: Final = 8  # b"DBN", version byte, u32 metadata length
_FILE_NAME = re.compile(r"^(\d{8})\.([a-z0-9-]+)\.dbn$")
_LOCK_NAME: Final = ".lock"
# Records whose checkpoint columns are read at once during recovery (bounds the memory used).
_SCAN_CHUNK: Final = 1 << 22
_AS_IS: Final = cast("databento_dbn.VersionUpgradePolicy", databento_dbn.VersionUpgradePolicy.AS_IS)


class BronzeError(Exception):
    """A bronze file or session directory cannot be used; the message starts with its path."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class BronzeCorruptError(BronzeError):
    """Damage that is not a torn trailing record (which recovery truncates)."""


class BronzeMismatchError(BronzeError):
    """The stream does not match what the session's files already hold."""


class BronzeLockedError(BronzeError):
    """Another process has the session open."""


@dataclass(frozen=True)
class BronzeStream:
    """What a session's files hold: one dataset, schema and DBN version, and where it started."""

    dataset: str
    schema: str
    version: int
    start: int
    stype_in: str | None = None
    symbols: tuple[str, ...] = ()
    ts_out: bool = False
    """Whether every record ends with the gateway's send time (a ``ts_out`` subscription)."""

    def header(self, day: int, *, first: bool) -> bytes:
        """The DBN metadata of the file for UTC day number ``day`` (days since the epoch)."""
        metadata = databento_dbn.Metadata(
            dataset=self.dataset,
            start=self.start if first else day * NS_PER_DAY,
            stype_in=None if self.stype_in is None else databento_dbn.SType.from_str(self.stype_in),
            stype_out=databento_dbn.SType.from_str("instrument_id"),
            schema=databento_dbn.Schema.from_str(self.schema),
            symbols=list(self.symbols),
            partial=[],
            not_found=[],
            mappings=[],
            end=(day + 1) * NS_PER_DAY,
            ts_out=self.ts_out,
            version=self.version,
        )
        return bytes(metadata.encode())

    def describe(self) -> str:
        """What the stream's records are, for messages."""
        with_send_time = ", with the gateway's send time" if self.ts_out else ""
        return (
            f"{self.schema} records of {self.dataset} (DBN v{self.version}, {self.stype_in} "
            f"{list(self.symbols)}{with_send_time})"
        )

    def same_subscription(self, other: BronzeStream) -> bool:
        """Whether ``other`` may append to files written for this stream (start aside)."""
        mine = (self.dataset, self.schema, self.version, self.stype_in, self.symbols, self.ts_out)
        return mine == (
            other.dataset,
            other.schema,
            other.version,
            other.stype_in,
            other.symbols,
            other.ts_out,
        )


@dataclass(frozen=True)
class TornRecord:
    """Bytes recovery cut off the end of a file: a record a crash left half written."""

    path: Path
    offset: int  # file size after truncation
    length: int  # bytes removed


def _day_name(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y%m%d")


def _day_of_name(name: str) -> int:
    moment = datetime.strptime(name, "%Y%m%d").replace(tzinfo=UTC)
    return int(moment.timestamp()) // 86_400


@dataclass
class _Scan:
    """One file as recovery found it."""

    path: Path
    day: int
    stream: BronzeStream | None  # None: the header itself is torn
    header_bytes: int
    body: npt.NDArray[np.uint8]
    offsets: npt.NDArray[np.int64]
    end: int  # bytes of complete records in the body


def _read_header(path: Path, raw: bytes, first: bool) -> tuple[BronzeStream | None, int]:
    """The stream a file's header describes and the header size; (None, 0) if it is torn."""
    if len(raw) < _PRELUDE:
        return None, 0
    if raw[:3] != b"DBN":
        raise BronzeCorruptError(path, f"not a DBN file (starts with {raw[:4]!r})")
    meta_end = _PRELUDE + int.from_bytes(raw[4:8], "little")
    if len(raw) < meta_end:
        return None, 0
    try:
        metadata = databento_dbn.Metadata.decode(raw[:meta_end], upgrade_policy=_AS_IS)
    except databento_dbn.DBNError as exc:
        raise BronzeCorruptError(path, f"corrupt DBN metadata ({exc})") from None
    if metadata.schema is None:
        raise BronzeCorruptError(path, "the header has no schema; bronze files hold one schema")
    stype_in = None if metadata.stype_in is None else str(metadata.stype_in)
    stream = BronzeStream(
        dataset=str(metadata.dataset),
        schema=str(metadata.schema),
        version=int(metadata.version),
        start=int(metadata.start) if first else 0,
        stype_in=stype_in,
        symbols=tuple(str(s) for s in metadata.symbols),
        ts_out=bool(metadata.ts_out),
    )
    return stream, meta_end


def _scan_file(path: Path, day: int, first: bool) -> _Scan:
    size = path.stat().st_size
    with path.open("rb") as fh:
        prelude = fh.read(_PRELUDE)
        meta_len = int.from_bytes(prelude[4:8], "little") if len(prelude) == _PRELUDE else 0
        head = prelude + fh.read(meta_len)
    stream, header_bytes = _read_header(path, head, first)
    if stream is None or size == header_bytes:
        body = np.zeros(0, dtype=np.uint8)
    else:
        body = np.memmap(path, dtype=np.uint8, mode="r", offset=header_bytes)
    offsets, end = walk_records(body)
    return _Scan(path, day, stream, header_bytes, body, offsets, end)


def _torn_tail_ok(tail: npt.NDArray[np.uint8]) -> bool:
    """Whether bytes after the last complete record look like a write a crash cut short."""
    if len(tail) == 0:
        return True
    length = int(tail[0]) * 4
    if length >= 16 and len(tail) < length:
        return True  # a record's beginning
    return not bool(tail.any())  # zeros: a tail the file system extended but never wrote


def _advance_from_scan(tracker: CheckpointTracker, scan: _Scan) -> None:
    """Move the checkpoint over a scanned file's complete records, chunk by chunk."""
    offsets = scan.offsets
    n = len(offsets) - 1
    if n == 0:
        return
    body = scan.body[: scan.end]
    sizes = np.diff(offsets)
    uniform = bool((sizes == sizes[0]).all())
    for lo in range(0, n, _SCAN_CHUNK):
        hi = min(lo + _SCAN_CHUNK, n)
        if uniform:
            size = int(sizes[0])
            table = body[int(offsets[lo]) : int(offsets[hi])].reshape(hi - lo, size)
            iid = np.ascontiguousarray(table[:, 4:8]).view("<u4").reshape(hi - lo)
            ts = np.ascontiguousarray(table[:, 8:16]).view("<u8").reshape(hi - lo)
        else:
            starts = offsets[lo:hi]
            iid = _gather(body, starts, 4, 4).view("<u4").reshape(hi - lo)
            ts = _gather(body, starts, 8, 8).view("<u8").reshape(hi - lo)
        tracker.advance_columns(iid.astype(np.uint32), ts.astype(np.uint64))


def _gather(
    body: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], offset: int, width: int
) -> npt.NDArray[np.uint8]:
    return np.ascontiguousarray(body[(starts + offset)[:, None] + np.arange(width)])


class Bronze:
    """One session's bronze files, open for appending. Use :meth:`open`."""

    def __init__(self, session_dir: Path, lock: BinaryIO, buffer_bytes: int) -> None:
        self.session_dir = session_dir
        self._lock = lock
        self._buffer_bytes = buffer_bytes
        self._stream: BronzeStream | None = None
        self._tracker = CheckpointTracker()
        self._day: int | None = None  # the day file records currently go to
        self._fh: io.BufferedWriter | None = None
        self._dir_dirty = False
        self._syncing: threading.Thread | None = None  # a background fsync
        self._sync_error: OSError | None = None
        self._closed = False
        self.truncated: tuple[TornRecord, ...] = ()

    # ----------------------------------------------------------------------------- open

    @classmethod
    def open(
        cls, root: Path | str, session_id: str, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES
    ) -> Bronze:
        """Open (creating it if new) the session's directory, recover its files and derive the
        checkpoint from them."""
        if not session_id or "/" in session_id or session_id in (".", ".."):
            raise ValueError(f"session id {session_id!r} is not a directory name")
        session_dir = Path(root) / session_id
        session_dir.mkdir(parents=True, exist_ok=True)
        lock = (session_dir / _LOCK_NAME).open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise BronzeLockedError(session_dir, "another writer has this session open") from None
        bronze = cls(session_dir, lock, buffer_bytes)
        try:
            bronze._recover()
        except BaseException:
            bronze._release()
            raise
        return bronze

    def _recover(self) -> None:
        paths = self.files()
        torn: list[TornRecord] = []
        for index, path in enumerate(paths):
            match = _FILE_NAME.match(path.name)
            assert match is not None  # files() only lists matching names
            last = index == len(paths) - 1
            scan = _scan_file(path, _day_of_name(match.group(1)), first=index == 0)
            if scan.stream is None:
                if not last:
                    raise BronzeCorruptError(path, "the DBN header is incomplete")
                # Created, but the crash came before its header was whole: it holds nothing.
                torn.append(TornRecord(path, 0, path.stat().st_size))
                path.unlink()
                self._dir_dirty = True
                continue
            self._check_stream(path, scan.stream, match.group(2), first=index == 0)
            tail = scan.body[scan.end :]
            if len(tail) and (not last or not _torn_tail_ok(tail)):
                raise BronzeCorruptError(
                    path,
                    f"bad record at byte {scan.header_bytes + scan.end} "
                    f"(length byte {int(tail[0])}, {len(tail)} bytes left)",
                )
            _advance_from_scan(self._tracker, scan)
            self._day = scan.day
            cut = len(tail)
            del scan, tail  # drop the memory map before the file is cut and appended to
            if cut:
                keep = path.stat().st_size - cut
                os.truncate(path, keep)
                torn.append(TornRecord(path, keep, cut))
        self.truncated = tuple(torn)
        if torn:
            self.sync()

    def _check_stream(self, path: Path, stream: BronzeStream, schema: str, *, first: bool) -> None:
        if stream.schema != schema:
            raise BronzeCorruptError(path, f"the header says schema {stream.schema}")
        if first:
            self._stream = stream
            self._tracker.session_start = stream.start
        elif self._stream is not None and not self._stream.same_subscription(stream):
            raise BronzeCorruptError(path, f"the header {stream} differs from {self._stream}")

    # ---------------------------------------------------------------------------- state

    @property
    def stream(self) -> BronzeStream | None:
        """What the files hold (None for a new session until :meth:`begin`)."""
        return self._stream

    @property
    def checkpoint(self) -> Checkpoint:
        """Where the stream stands: everything appended, written to the files or buffered."""
        return self._tracker.checkpoint()

    @property
    def records(self) -> int:
        """Market records in the files (cheap: for polling)."""
        return self._tracker.records

    def files(self) -> list[Path]:
        """The session's day files, in order."""
        return sorted(
            p for p in self.session_dir.iterdir() if p.is_file() and _FILE_NAME.match(p.name)
        )

    # --------------------------------------------------------------------------- writing

    def begin(self, stream: BronzeStream) -> None:
        """Say what is about to be appended; must match the files a resumed session has."""
        if self._stream is None:
            self._stream = stream
            self._tracker.session_start = stream.start
        elif not self._stream.same_subscription(stream):
            raise BronzeMismatchError(
                self.session_dir,
                f"the session holds {self._stream.describe()}; cannot append {stream.describe()}",
            )

    def append(self, records: RecordBlock | Sequence[bytes]) -> None:
        """Append market records (raw DBN bytes, in stream order) and move the checkpoint."""
        block = records if isinstance(records, RecordBlock) else RecordBlock.from_records(records)
        if len(block) == 0:
            return
        if self._closed:
            raise BronzeError(self.session_dir, "the session is closed")
        if self._stream is None:
            raise BronzeError(self.session_dir, "begin() the stream before appending records")
        days = block.ts_event // np.uint64(NS_PER_DAY)
        current = -1 if self._day is None else self._day
        if int(days.max()) <= current:
            self._write(current, block.data)
        else:
            # Never back to an earlier day: a record goes to the latest day seen so far.
            running = np.maximum(np.maximum.accumulate(days.astype(np.int64)), current)
            cuts = np.flatnonzero(running[1:] != running[:-1]) + 1
            bounds = [0, *cuts.tolist(), len(block)]
            for lo, hi in itertools.pairwise(bounds):
                self._write(int(running[lo]), block.slice(lo, hi).data)
        self._tracker.advance(block)

    def _write(self, day: int, data: bytes) -> None:
        if self._fh is None or day != self._day:
            self._open_day(day)
        assert self._fh is not None
        self._fh.write(data)

    def _open_day(self, day: int) -> None:
        assert self._stream is not None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        path = self.session_dir / f"{_day_name(day)}.{self._stream.schema}.dbn"
        first = not self.files()
        fh = cast("io.BufferedWriter", path.open("ab", buffering=self._buffer_bytes))
        if fh.tell() == 0:
            fh.write(self._stream.header(day, first=first))
            self._dir_dirty = True
        self._fh = fh
        self._day = day

    def flush(self) -> None:
        """Hand buffered records to the operating system (survives the process, not the host)."""
        if self._fh is not None:
            self._fh.flush()

    def sync(self, *, background: bool = False) -> None:
        """Flush, then fsync the current file (and the directory when files were added).

        ``background``: the fsync runs on a thread of its own, so appends go on meanwhile (an
        fsync of a second of records can take tens of milliseconds); skipped while the last
        one still runs, and its failure is raised by the next call.
        """
        previous = self._syncing
        if previous is not None and (background and previous.is_alive()):
            return
        if previous is not None:
            previous.join()
            self._syncing = None
            self._raise_sync_error()
        if self._fh is not None:
            self._fh.flush()
        # The thread syncs its own descriptors: the writer may close or move to the next day
        # file meanwhile.
        fds = [] if self._fh is None else [os.dup(self._fh.fileno())]
        if self._dir_dirty:
            fds.append(os.open(self.session_dir, os.O_RDONLY))
            self._dir_dirty = False
        if not background:
            self._fsync(fds)
            self._raise_sync_error()
        elif fds:
            self._syncing = threading.Thread(
                target=self._fsync, args=(fds,), name="bronze-sync", daemon=True
            )
            self._syncing.start()

    def _fsync(self, fds: list[int]) -> None:
        try:
            for fd in fds:
                os.fsync(fd)
        except OSError as exc:
            self._sync_error = exc
        finally:
            for fd in fds:
                os.close(fd)

    def _raise_sync_error(self) -> None:
        error, self._sync_error = self._sync_error, None
        if error is not None:
            raise BronzeError(self.session_dir, f"fsync failed: {error}")

    def close(self) -> None:
        """Sync and close the files, and release the session."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._closed = True
            self._release()

    def _release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
        self._lock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_bronze_file(path: Path | str) -> tuple[databento_dbn.Metadata, RecordBlock]:
    """The header and the records of one bronze file (complete records only)."""
    path = Path(path)
    raw = path.read_bytes()
    stream, header_bytes = _read_header(path, raw, first=True)
    if stream is None:
        raise BronzeCorruptError(path, "the DBN header is incomplete")
    metadata = databento_dbn.Metadata.decode(raw[:header_bytes], upgrade_policy=_AS_IS)
    return metadata, RecordBlock.parse(raw[header_bytes:])[0]
