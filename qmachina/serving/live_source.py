"""A live session's bronze as the source of a serving stream: its events, contract by contract.

**Following.** :class:`LiveSessionSource` reads the session's bronze from its first record
(:class:`~qmachina.live.bronze_tail.BronzeTail`: complete records only, day file after day file)
and keeps polling for appended bytes, so a stream built on it neither knows nor cares that the
ingestion reconnected: the files just keep growing. There is no pacing: live data arrives in
real time already, and the backlog from the session's start is computed as fast as it can be.
Events are decoded as :mod:`engine.replay` decodes them and filtered to the one instrument the
stream serves.

**Which instrument.** The version's pipeline names it by ``instrument_id`` (served as is) or by
``raw_symbol``. Bronze holds no symbol mappings, so a raw symbol is placed with the session's
recorded rolls (a roll names the contracts on both sides, and the continuous symbol) or, for a
session subscribed to one symbol (raw or continuous), as the instrument of its first market
record. A raw-symbol session subscribed to another symbol is refused; so is a session of several
symbols that no roll explains.

**Rolls.** The served contract changes when the session records a roll away from it (a
``contract_roll_event`` row, read through :data:`RollReader` every ``roll_poll_seconds``) or, in
a session subscribed to one continuous symbol, when its records turn from the served contract to
one not served yet (the gateway's mapping comes with the first records of the new contract,
possibly before the row is written; records before the served contract's first are history).
Rolls go forward only. At a roll the current segment's events end where the stream reaches the
roll's ``ts_event`` (at once if it is already past it) and the next segment starts over from the
first record of the bronze, on the new contract: its book is built from that contract's first
records (its snapshot, or everything the session holds of it when it was subscribed too) and its
bins are computed from there, as a fresh stream's would be.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from engine.replay import EventArray
from qmachina.live.bronze import BronzeStream
from qmachina.live.bronze_tail import MBO_RTYPE, BronzeTail, FollowWait, mbo_events
from qmachina.live.record_block import RecordBlock
from qmachina.specs.pipeline import CaptureSpec

log = logging.getLogger(__name__)

__all__ = [
    "Contract",
    "LiveSegment",
    "LiveSessionSource",
    "LiveSourceError",
    "RollReader",
    "SessionRoll",
]

#: The longest and the shortest sleep of a follow that has caught up (see FollowWait).
DEFAULT_POLL_SECONDS: Final = 0.05
DEFAULT_MIN_POLL_SECONDS: Final = 0.001
DEFAULT_ROLL_POLL_SECONDS: Final = 1.0
_RESOLVABLE_STYPES: Final = ("raw_symbol", "continuous", "instrument_id")


class LiveSourceError(RuntimeError):
    """A live session that cannot feed this serving version; the message says why."""


@dataclass(frozen=True)
class Contract:
    """The contract a segment serves: its instrument id and raw symbol (None: not known)."""

    instrument_id: int
    symbol: str | None = None


@dataclass(frozen=True)
class SessionRoll:
    """A roll the session recorded: ``symbol`` moved between contracts at ``ts_event``."""

    symbol: str
    from_instrument_id: int | None
    from_symbol: str | None
    to_instrument_id: int
    to_symbol: str
    ts_event: int


RollReader = Callable[[], Sequence[SessionRoll]]
"""The session's recorded rolls, in market-time order (called from the stream's thread)."""


@dataclass
class LiveSegment:
    """The events of one contract: from the bronze's start until a roll away from it."""

    index: int
    contract: Contract
    rolled_from: Contract | None
    roll_ts_ns: int | None
    """When the roll that started this segment took effect (None for the first segment)."""
    session_start_ns: int
    events: Iterator[EventArray]


@dataclass
class _Roll:
    cut: int  # records of the block before the roll
    to: Contract
    ts_event: int


@dataclass
class _SegmentEnd:
    roll: _Roll | None = None


@dataclass
class LiveSessionSource:
    """The segments of a live session's bronze for a pipeline's ``capture`` (see the module's
    docstring). Iterate :meth:`segments`, each segment's events to the end before the next;
    setting ``stop`` ends the current segment's events and the segments."""

    session_dir: Path
    capture: CaptureSpec
    rolls: RollReader
    stop: threading.Event
    poll_seconds: float = DEFAULT_POLL_SECONDS
    min_poll_seconds: float = DEFAULT_MIN_POLL_SECONDS
    roll_poll_seconds: float = DEFAULT_ROLL_POLL_SECONDS
    clock: Callable[[], float] = time.monotonic
    _known_rolls: Sequence[SessionRoll] = field(default=(), init=False)
    _rolls_read_at: float | None = field(default=None, init=False)

    def segments(self) -> Iterator[LiveSegment]:
        """One segment per contract served, the next once the previous one's events end."""
        tail = BronzeTail(self.session_dir)
        pending = self._until_header(tail)
        contract = None if pending is None else self._first_contract(tail, pending)
        if pending is None or contract is None:  # stopped before the stream could start
            tail.close()
            return
        served: list[int] = []
        rolled_from: Contract | None = None
        roll_ts: int | None = None
        index = 0
        while True:
            served.append(contract.instrument_id)
            end = _SegmentEnd()
            assert tail.stream is not None
            yield LiveSegment(
                index,
                contract,
                rolled_from,
                roll_ts,
                tail.stream.start,
                self._events(tail, pending, contract.instrument_id, served, end),
            )
            tail.close()
            if end.roll is None or self.stop.is_set():
                return
            rolled_from, contract, roll_ts = contract, end.roll.to, end.roll.ts_event
            index += 1
            tail = BronzeTail(self.session_dir)  # the new contract's book: from the start
            pending = self._until_header(tail) or []

    # ----------------------------------------------------------------------- resolution

    def _until_header(self, tail: BronzeTail) -> list[RecordBlock] | None:
        """Wait for the first day file's header; the blocks read meanwhile (None: stopped)."""
        blocks: list[RecordBlock] = []
        while True:
            blocks += tail.read()
            if tail.stream is not None:
                self._check_stream(tail.stream)
                return blocks
            if self.stop.wait(self.poll_seconds):
                return None

    def _check_stream(self, stream: BronzeStream) -> None:
        if stream.schema != "mbo":
            raise LiveSourceError(
                f"live session {self.session_dir.name} records {stream.schema}, not mbo"
            )

    def _first_contract(self, tail: BronzeTail, blocks: list[RecordBlock]) -> Contract | None:
        """The contract the stream starts on (None: stopped first); ``blocks``, the records
        read so far, grows with those read to find it."""
        self._refresh_rolls(force=True)
        capture = self.capture
        if capture.instrument_id is not None:
            return Contract(capture.instrument_id, self._symbol_of(capture.instrument_id))
        symbol = capture.raw_symbol
        assert symbol is not None  # a capture names an instrument id or a raw symbol
        for roll in self._known_rolls:
            if roll.from_symbol == symbol and roll.from_instrument_id is not None:
                return Contract(roll.from_instrument_id, symbol)
            if roll.to_symbol == symbol:
                return Contract(roll.to_instrument_id, symbol)
        for roll in self._known_rolls:
            if roll.symbol == symbol and roll.from_instrument_id is not None:
                return Contract(roll.from_instrument_id, roll.from_symbol)
        stream = tail.stream
        assert stream is not None
        session = self.session_dir.name
        subscribed = list(stream.symbols)
        if len(subscribed) != 1 or stream.stype_in not in _RESOLVABLE_STYPES:
            raise LiveSourceError(
                f"live session {session} subscribes {subscribed} ({stream.stype_in}): which of "
                f"its instruments is {symbol} is not known (bronze holds no symbol mappings and "
                "no roll names it)"
            )
        if stream.stype_in == "raw_symbol" and subscribed != [symbol]:
            raise LiveSourceError(
                f"live session {session} subscribes {subscribed[0]}, not {symbol}, the raw "
                "symbol of the version's pipeline"
            )
        looked = 0
        while True:
            for block in blocks[looked:]:
                market = np.flatnonzero(block.rtype == MBO_RTYPE)
                if len(market):
                    iid = int(block.instrument_id[market[0]])
                    known = symbol if stream.stype_in == "raw_symbol" else self._symbol_of(iid)
                    return Contract(iid, known)
            looked = len(blocks)
            fresh = tail.read()
            if fresh:
                blocks += fresh
            elif self.stop.wait(self.poll_seconds):
                return None

    def _symbol_of(self, instrument_id: int) -> str | None:
        """The raw symbol a recorded roll gives the instrument, if any does."""
        for roll in self._known_rolls:
            if roll.to_instrument_id == instrument_id:
                return roll.to_symbol
            if roll.from_instrument_id == instrument_id and roll.from_symbol:
                return roll.from_symbol
        return None

    def _refresh_rolls(self, *, force: bool = False) -> None:
        now = self.clock()
        if (
            not force
            and self._rolls_read_at is not None
            and now - self._rolls_read_at < self.roll_poll_seconds
        ):
            return
        self._rolls_read_at = now
        try:
            self._known_rolls = tuple(self.rolls())
        except Exception:  # the store is away: keep the rolls known, ask again later
            log.warning("the rolls of live session %s cannot be read", self.session_dir.name)

    # --------------------------------------------------------------------------- events

    def _events(
        self,
        tail: BronzeTail,
        pending: list[RecordBlock],
        instrument_id: int,
        served: list[int],
        end: _SegmentEnd,
    ) -> Iterator[EventArray]:
        """The instrument's events until a roll away from it (noted in ``end``) or the stop."""
        stream = tail.stream
        metadata = tail.metadata
        assert stream is not None
        assert metadata is not None
        # A roll shows in the data when one continuous symbol's records turn from the served
        # contract to one not served yet (before the served contract's first record, earlier
        # contracts of the session are history, not a roll).
        follows_data = stream.stype_in == "continuous" and len(stream.symbols) == 1
        ts_out = bool(metadata.ts_out)
        seen = False  # whether the served contract has had a record yet
        high = 0  # the running maximum of ts_event: the stream's market time
        blocks = pending
        idle = FollowWait(self.min_poll_seconds, self.poll_seconds)
        while not self.stop.is_set():
            if not blocks:
                self._refresh_rolls()
                blocks = tail.read()
                if not blocks:
                    self.stop.wait(idle.seconds())
                    continue
                idle.arrived()
            for block in blocks:
                since: int | None = None  # where in the block the data may show a roll
                if follows_data and seen:
                    since = 0
                elif follows_data:
                    mine = np.flatnonzero(block.instrument_id == np.uint32(instrument_id))
                    if len(mine):
                        seen, since = True, int(mine[0])
                roll = self._roll_in(block, instrument_id, served, high, since)
                part = block if roll is None else block.slice(0, roll.cut)
                events = mbo_events(part, stream.version, instrument_id, ts_out=ts_out)
                if len(events):
                    yield events
                if roll is not None:
                    end.roll = roll
                    return
                if len(block):
                    high = max(high, int(block.ts_event.max()))
            blocks = []

    def _roll_in(
        self,
        block: RecordBlock,
        instrument_id: int,
        served: Sequence[int],
        high: int,
        since: int | None,
    ) -> _Roll | None:
        """The first roll away from the instrument within ``block``, if one is there: one the
        session recorded, or (from record ``since`` on) the data turning to a new contract."""
        found: _Roll | None = None
        recorded = [
            roll
            for roll in self._known_rolls
            if roll.from_instrument_id == instrument_id and roll.to_instrument_id not in served
        ]
        if recorded:
            roll = min(recorded, key=lambda r: r.ts_event)
            market_time = np.maximum.accumulate(np.maximum(block.ts_event, np.uint64(high)))
            cut = int(np.searchsorted(market_time, np.uint64(roll.ts_event)))
            if cut < len(block) or high >= roll.ts_event:
                to = Contract(roll.to_instrument_id, roll.to_symbol)
                found = _Roll(cut, to, roll.ts_event)
        if since is not None:
            new = (block.rtype == MBO_RTYPE) & ~np.isin(block.instrument_id, served)
            new[:since] = False
            if bool(new.any()):
                cut = int(np.argmax(new))
                if found is None or cut < found.cut:
                    iid = int(block.instrument_id[cut])
                    self._refresh_rolls(force=True)  # its row may be written by now
                    to = Contract(iid, self._symbol_of(iid))
                    found = _Roll(cut, to, int(block.ts_event[cut]))
        return found
