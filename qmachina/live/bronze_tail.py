"""Follow a live session's bronze as it grows: the complete records appended since the last
look, day file after day file, never a record still being written.

A reader of bronze runs beside its writer (:class:`qmachina.live.bronze.Bronze`), which appends
whole records but may be caught in the middle of a write, or crash there (recovery later cuts
the torn tail off and appends after it). So :class:`BronzeTail` only ever moves past complete
records (their length byte says where each ends): bytes after the last complete one are read
again at the next look, whatever they have become by then. The writer closes a day file before
it creates the next one, so once the next file exists the current one is read to its end one
last time and left; a torn tail that remains in a file that is no longer the last one is
damage, not a write in progress.

:func:`mbo_events` decodes records into the engine's event envelope with the record layouts and
the envelope copy of :mod:`engine.replay`, so live events are exactly the ones replay would
yield from the same bytes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, cast

import databento_dbn
import numpy as np

# engine.replay's own record layouts (per DBN version) and envelope copy: live decodes as replay.
from engine.events import EVENT_DTYPE
from engine.replay import DBN_STRUCT_MAPS, EventArray, mbo_to_events
from qmachina.live.bronze import BronzeCorruptError, BronzeStream
from qmachina.live.record_block import RecordBlock

__all__ = ["BronzeTail", "FollowWait", "mbo_events"]

MBO_RTYPE: Final = 0xA0
DEFAULT_READ_BYTES: Final = 16 << 20
_PRELUDE: Final = 8  # b"DBN", version byte, u32 metadata length
_DAY_FILE = re.compile(r"^\d{8}\.([a-z0-9-]+)\.dbn$")
_AS_IS: Final = cast("databento_dbn.VersionUpgradePolicy", databento_dbn.VersionUpgradePolicy.AS_IS)


@dataclass
class _OpenFile:
    path: Path
    fh: BinaryIO
    position: int  # the byte after the last complete record taken


class FollowWait:
    """How long a follower of growing bronze sleeps once it has caught up.

    Right after records arrived it looks again after ``shortest`` seconds, so a busy market
    (records every millisecond or so) is followed within about that; each look that finds
    nothing doubles the wait up to ``longest``, so a quiet one costs next to nothing.
    """

    def __init__(self, shortest: float, longest: float) -> None:
        if not 0 < shortest <= longest:
            raise ValueError(f"need 0 < shortest <= longest, got {shortest} and {longest}")
        self.shortest = shortest
        self.longest = longest
        self._next = shortest

    def arrived(self) -> None:
        """Records arrived: look again soon."""
        self._next = self.shortest

    def seconds(self) -> float:
        """How long to sleep after a look that found nothing."""
        wait = self._next
        self._next = min(2 * wait, self.longest)
        return wait


class BronzeTail:
    """The records of ``<session_dir>/*.dbn``, in file and byte order, as they are appended.

    :meth:`read` returns what has been completed since the last call (possibly nothing). The
    session directory and its first file may not exist yet: the tail waits for them.
    """

    def __init__(self, session_dir: Path, *, read_bytes: int = DEFAULT_READ_BYTES) -> None:
        self.session_dir = session_dir
        self.read_bytes = read_bytes
        self.stream: BronzeStream | None = None
        """What the first file's header says (None until it is complete)."""
        self.metadata: databento_dbn.Metadata | None = None
        self._current: _OpenFile | None = None
        self._done: set[str] = set()

    def close(self) -> None:
        if self._current is not None:
            self._current.fh.close()
            self._current = None

    def __enter__(self) -> BronzeTail:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self) -> list[RecordBlock]:
        """Complete records appended since the last call, one block per file read: all of
        them, or ``read_bytes`` of them when more are waiting (call again at once)."""
        blocks: list[RecordBlock] = []
        while True:
            current = self._current or self._open_next()
            if current is None:
                return blocks
            later = self._next_file_exists(current.path)  # before reading: see the docstring
            block, more = self._take(current)
            if len(block):
                blocks.append(block)
            if more or not later:
                return blocks  # more: read_bytes was reached, the next call goes on
            tail = current.path.stat().st_size - current.position
            if tail:
                raise BronzeCorruptError(
                    current.path,
                    f"bad record at byte {current.position} ({tail} bytes left) in a file that "
                    "a later day file follows",
                )
            current.fh.close()
            self._done.add(current.path.name)
            self._current = None

    def _day_files(self) -> list[Path]:
        if not self.session_dir.is_dir():
            return []
        return sorted(
            p for p in self.session_dir.iterdir() if p.is_file() and _DAY_FILE.match(p.name)
        )

    def _next_file_exists(self, path: Path) -> bool:
        return any(p.name > path.name for p in self._day_files())

    def _open_next(self) -> _OpenFile | None:
        for path in self._day_files():
            if path.name in self._done:
                continue
            fh = path.open("rb")
            header = self._header(path, fh)
            if header is None:  # created, its header not written yet
                fh.close()
                return None
            self._current = _OpenFile(path, fh, header)
            return self._current
        return None

    def _header(self, path: Path, fh: BinaryIO) -> int | None:
        """The header size of a day file (its stream noted for the first), None if torn."""
        prelude = fh.read(_PRELUDE)
        if len(prelude) < _PRELUDE:
            return None
        if prelude[:3] != b"DBN":
            raise BronzeCorruptError(path, f"not a DBN file (starts with {prelude[:4]!r})")
        size = _PRELUDE + int.from_bytes(prelude[4:8], "little")
        rest = fh.read(size - _PRELUDE)
        if len(rest) < size - _PRELUDE:
            return None
        try:
            metadata = databento_dbn.Metadata.decode(prelude + rest, upgrade_policy=_AS_IS)
        except databento_dbn.DBNError as error:
            raise BronzeCorruptError(path, f"corrupt DBN metadata ({error})") from None
        if self.stream is None:
            self.metadata = metadata
            self.stream = BronzeStream(
                dataset=str(metadata.dataset),
                schema=str(metadata.schema),
                version=int(metadata.version),
                start=int(metadata.start),
                stype_in=None if metadata.stype_in is None else str(metadata.stype_in),
                symbols=tuple(str(s) for s in metadata.symbols),
                ts_out=bool(metadata.ts_out),
            )
        elif int(metadata.version) != self.stream.version:
            raise BronzeCorruptError(
                path, f"DBN v{metadata.version} after files of v{self.stream.version}"
            )
        return size

    def _take(self, current: _OpenFile) -> tuple[RecordBlock, bool]:
        """The complete records after ``current.position`` (at most ``read_bytes`` of them) and
        whether the read was cut short by that bound."""
        size = current.path.stat().st_size
        if size < current.position:
            raise BronzeCorruptError(
                current.path, f"shrank to {size} bytes under a reader at byte {current.position}"
            )
        current.fh.seek(current.position)
        data = current.fh.read(self.read_bytes)
        block, end = RecordBlock.parse(data)
        current.position += end
        return block, end > 0 and len(data) == self.read_bytes


@functools.cache
def _mbo_dtype(version: int, ts_out: bool) -> np.dtype[np.void]:
    """The numpy layout of an MBO record of DBN ``version``, as engine.replay reads it."""
    struct = DBN_STRUCT_MAPS[version][databento_dbn.Schema.MBO]
    fields = [(name, "u1" if code == "S1" else code) for name, code in struct._dtypes]
    if ts_out:
        fields.append(("ts_out", "u8"))  # live gateways append a send timestamp
    return np.dtype(fields)


def mbo_events(
    block: RecordBlock, version: int, instrument_id: int, *, ts_out: bool = False
) -> EventArray:
    """The MBO records of one instrument in ``block`` as events (other records are skipped:
    bronze of an MBO subscription holds nothing else but the odd status record)."""
    dtype = _mbo_dtype(version, ts_out)
    keep = (block.rtype == MBO_RTYPE) & (block.instrument_id == np.uint32(instrument_id))
    selected = block.select(keep)
    if len(selected) == 0:
        return np.empty(0, dtype=EVENT_DTYPE)
    if selected.record_size != dtype.itemsize:
        raise ValueError(
            f"MBO records of {selected.record_size} bytes, expected {dtype.itemsize} (DBN v"
            f"{version})"
        )
    return mbo_to_events(np.frombuffer(selected.data, dtype=dtype))
