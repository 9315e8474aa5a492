"""A local gateway that speaks the Databento Live protocol and serves a tape of DBN files.

The official ``databento.Live`` client connects to it unmodified
(``databento.Live(key=..., gateway="127.0.0.1", port=gateway.port)``): CRAM authentication
against configured keys, subscriptions by raw symbol, instrument id, continuous or parent
symbol, ``start=`` intraday replay, ``snapshot=1`` MBO snapshots, symbol mappings, heartbeats,
subscription acknowledgements and replay-completed system messages, ``ts_out`` and zstd.

The market has its own clock: tape time advances with wall time x ``speed`` from when the
gateway starts (``speed=math.inf``: as fast as the gateway can release records), whether or
not anyone is connected, so a client that reconnects has missed what happened meanwhile unless
it asks for a replay. A subscription without ``start`` receives records from the tape position
its session started at; with ``start`` it receives every record of its instruments with
``ts_event >= start`` (``ts_recv`` for BBO/CBBO), then continues live. Scheduled faults
(:mod:`qmachina.live.gateway_faults`) break connections, stall them, take the whole gateway
down for a while or roll a continuous symbol to its next contract.

Use :class:`LiveGateway` inside an event loop (``async with``), :class:`GatewayThread` from
synchronous code such as tests, or ``qmachina gateway`` from the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import numpy as np

from qmachina.live.gateway_faults import CONNECTION_FAULTS, Fault, FaultKind
from qmachina.live.gateway_protocol import KeyRing
from qmachina.live.gateway_session import GatewaySession
from qmachina.live.gateway_symbols import Symbology
from qmachina.live.gateway_tape import Tape, load_tape, schema_code

__all__ = ["GatewayThread", "LiveGateway", "TapeClock", "TimedFault", "tape_records"]

log = logging.getLogger(__name__)

#: Records released per step when the clock runs as fast as possible.
FAST_BATCH: Final = 4096
# The market never sleeps longer than this, so a changed clock or a stop is noticed quickly.
_MAX_MARKET_SLEEP_S: Final = 0.25
_MIN_MARKET_SLEEP_S: Final = 0.001


class TapeClock:
    """Tape time: ``origin_ns`` plus elapsed wall time x ``speed`` once started.

    With an infinite speed the clock does not follow wall time: the market moves it as it
    releases records (:meth:`advance_to`).
    """

    def __init__(
        self, origin_ns: int, speed: float, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0 (math.inf: as fast as possible), got {speed}")
        self.origin_ns = origin_ns
        self.speed = speed
        self._monotonic = monotonic
        self._started_at: float | None = None
        self._fast_now = origin_ns

    @property
    def realtime(self) -> bool:
        """True when tape time follows wall time (a finite speed)."""
        return math.isfinite(self.speed)

    def start(self) -> None:
        """Start moving (the first call only)."""
        if self._started_at is None:
            self._started_at = self._monotonic()

    def now_ns(self) -> int:
        """The current tape time."""
        if not self.realtime or self._started_at is None:
            return self._fast_now
        elapsed = self._monotonic() - self._started_at
        return self.origin_ns + int(elapsed * self.speed * 1e9)

    def advance_to(self, ts_ns: int) -> None:
        """Move an as-fast-as-possible clock forward (never back)."""
        self._fast_now = max(self._fast_now, ts_ns)

    def wall_seconds_until(self, ts_ns: int) -> float:
        """Wall seconds until the tape reaches ``ts_ns`` (0 if it has)."""
        if not self.realtime:
            return 0.0
        return max(0.0, (ts_ns - self.now_ns()) / 1e9 / self.speed)


@dataclass(frozen=True)
class TimedFault:
    """A fault scheduled on tape time, with the tape position it happens before."""

    index: int
    fault: Fault
    position: int

    @property
    def at_ns(self) -> int:
        """When it fires (tape time)."""
        assert self.fault.at_ns is not None  # only built for faults with at_ns
        return self.fault.at_ns


class LiveGateway:
    """The gateway: a listening socket, the market (tape + clock) and one session per client.

    ``keys``: accepted API keys (32 characters, ``db-`` prefix). ``port=0`` picks a free port
    (see :attr:`port` after :meth:`start`). ``start_at``: tape time the clock starts from
    (default: the first record); records before it are history, available to ``start=``
    replays and snapshots. ``continuous``: continuous symbol -> raw symbol or instrument id it
    starts on; roll faults move it. ``parents``: parent symbol -> instruments (default: a
    ``ROOT.FUT`` symbol means every outright future of ROOT). ``heartbeat_s`` overrides the
    heartbeat interval clients ask for (tests use fractions of a second). ``close_at_end``:
    once the tape is exhausted, sessions that have sent everything close gracefully.
    ``send_clock``: what ``ts_out`` stamps on the records a session sends (ns since the epoch);
    by default tape time. Databento's gateways stamp their wall clock: a benchmark timing
    records from their send time passes ``time.time_ns``.
    """

    def __init__(
        self,
        tape: Tape,
        *,
        keys: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        speed: float = 1.0,
        start_at: int | None = None,
        faults: Sequence[Fault] = (),
        continuous: Mapping[str, str | int] | None = None,
        parents: Mapping[str, Sequence[str | int]] | None = None,
        heartbeat_s: float | None = None,
        close_at_end: bool = False,
        send_clock: Callable[[], int] | None = None,
    ) -> None:
        if heartbeat_s is not None and not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        self.tape = tape
        self.keys = KeyRing(keys)
        self.host = host
        self._requested_port = port
        self.clock = TapeClock(tape.start_ns if start_at is None else start_at, speed)
        self.faults = tuple(faults)
        rolls = [(i, f) for i, f in enumerate(self.faults) if f.kind is FaultKind.ROLL]
        self.symbology = Symbology(tape, continuous, rolls, parents)
        self.heartbeat_s = heartbeat_s
        self.close_at_end = close_at_end
        self._send_clock = send_clock
        self._timed = sorted(
            (
                TimedFault(i, f, tape.position_before(f.at_ns))
                for i, f in enumerate(self.faults)
                if f.at_ns is not None
            ),
            key=lambda t: (t.at_ns, t.index),
        )
        self._due = list(self._timed)  # not fired yet, in time order
        self._fired: set[int] = set()
        self.cursor = 0  # tape records released so far
        self.finished = False  # every record released and every timed fault fired
        self._sessions: set[GatewaySession] = set()
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._session_ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._market_task: asyncio.Task[None] | None = None
        self._down_task: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    def from_files(
        cls,
        paths: Sequence[Path | str],
        *,
        keys: Sequence[str],
        symbols: Mapping[str, int] | None = None,
        **options: Any,
    ) -> LiveGateway:
        """A gateway over DBN files (see :func:`load_tape`; ``options`` as for the class)."""
        return cls(load_tape(paths, symbols), keys=keys, **options)

    # ------------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("the gateway has not been started")
        return self._port

    @property
    def is_down(self) -> bool:
        """True while a ``down`` fault refuses connections."""
        return self._down_task is not None and not self._down_task.done()

    async def start(self) -> int:
        """Start the clock and the market, listen, and return the bound port."""
        self._server = await self._listen(self._requested_port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        # No await from here on: the first step (faults due at the clock's start included)
        # happens before any connection is served.
        self.clock.start()
        self._step_market()
        self._market_task = asyncio.create_task(self._run_market(), name="gateway-market")
        log.info(
            "gateway listening on %s:%d: %d records of %s (DBN v%d), speed %s",
            self.host,
            self._port,
            len(self.tape),
            self.tape.dataset,
            self.tape.version,
            "max" if not self.clock.realtime else f"{self.clock.speed:g}x",
        )
        return self._port

    async def stop(self) -> None:
        """Close every session and stop listening."""
        self._stopping = True
        for task in (self._market_task, self._down_task):
            if task is not None:
                task.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in list(self._sessions):
            session.abort()
        tasks = [t for t in (self._market_task, self._down_task) if t is not None]
        tasks += list(self._session_tasks)
        for task in self._session_tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def serve_forever(self) -> None:
        """Run until cancelled (Ctrl-C in the command)."""
        if self._port is None:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(
            self._on_connection, self.host, port, limit=1 << 20, reuse_address=True
        )

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        session = GatewaySession(self, reader, writer, str(next(self._session_ids)))
        self._sessions.add(session)
        self._session_tasks.add(task)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            self._session_tasks.discard(task)

    def send_time_ns(self) -> int:
        """The send time a ``ts_out`` session's records carry now."""
        return self.clock.now_ns() if self._send_clock is None else self._send_clock()

    # --------------------------------------------------------------------------- market

    def wake_sessions(self) -> None:
        """Tell every session that the market moved or a fault fired."""
        for session in self._sessions:
            session.wake()

    def _release(self, cursor: int) -> None:
        if cursor > self.cursor:
            self.cursor = cursor
            self.wake_sessions()

    def _fire(self, timed: TimedFault) -> None:
        fault = timed.fault
        self._fired.add(timed.index)
        log.warning("fault fired: %s (tape position %d)", fault.describe(), timed.position)
        if fault.kind is FaultKind.DOWN:
            self.go_down(fault.seconds)
        self.wake_sessions()

    def _step_market(self) -> float:
        """Release what the clock has reached and fire due faults; wall seconds to sleep."""
        tape, n = self.tape, len(self.tape)
        if self.clock.realtime:
            now = self.clock.now_ns()
            target = tape.position_through(now)
        elif self.cursor < n:
            target = min(self.cursor + FAST_BATCH, n)
            now = int(tape.ts_index[target - 1])
        else:
            target = n
            now = max([t.at_ns for t in self._due], default=self.clock.now_ns())
        while self._due and self._due[0].at_ns <= now:
            timed = self._due.pop(0)
            # Everything before the fault's time happens before it.
            self._release(timed.position)
            self.clock.advance_to(timed.at_ns)
            self._fire(timed)
        self.clock.advance_to(now)
        self._release(target)
        if self.cursor >= n and not self._due and not self.finished:
            self.finished = True
            log.info("tape exhausted at %d records", n)
            self.wake_sessions()
        if not self.clock.realtime:
            return 0.0
        upcoming = [int(tape.ts_index[self.cursor])] if self.cursor < n else []
        upcoming += [self._due[0].at_ns] if self._due else []
        if not upcoming:
            return _MAX_MARKET_SLEEP_S
        wait = self.clock.wall_seconds_until(min(upcoming))
        return min(max(wait, _MIN_MARKET_SLEEP_S), _MAX_MARKET_SLEEP_S)

    async def _run_market(self) -> None:
        # Once everything is released and fired there is nothing left to schedule: the clock
        # itself is read on demand.
        while not self.finished:
            await asyncio.sleep(self._step_market())

    # --------------------------------------------------------------------------- faults

    def fired(self, index: int) -> bool:
        """Whether fault ``index`` (its place in ``faults``) has fired."""
        return index in self._fired

    def pending_connection_faults(self) -> list[TimedFault]:
        """Timed connection faults that have not fired yet (a new session will get them)."""
        return [t for t in self._due if t.fault.kind in CONNECTION_FAULTS]

    def next_count_fault(self) -> tuple[int, Fault] | None:
        """The unfired fault with the smallest record count, if any."""
        counted = [
            (f.after_records, i, f)
            for i, f in enumerate(self.faults)
            if f.after_records is not None and i not in self._fired
        ]
        if not counted:
            return None
        _, index, fault = min(counted, key=lambda c: (c[0], c[1]))
        return index, fault

    def claim_fault(self, index: int) -> bool:
        """Mark a counted fault fired; False if another session got there first."""
        if index in self._fired:
            return False
        self._fired.add(index)
        log.warning("fault fired: %s", self.faults[index].describe())
        return True

    def go_down(self, seconds: float) -> None:
        """Drop every session and refuse connections for ``seconds`` of wall time."""
        if self.is_down or self._stopping:
            return
        # Synchronously, as a crash: no session gets to send another byte.
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for session in list(self._sessions):
            session.abort()
        log.warning("gateway down for %gs: connections refused", seconds)
        self._down_task = asyncio.create_task(self._up_after(seconds), name="gateway-down")

    async def _up_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if not self._stopping:
            self._server = await self._listen(self.port)
            log.warning("gateway up again on port %d", self.port)

    # ------------------------------------------------------------------------- the tape

    def tape_records(
        self,
        schema: str,
        symbols: Sequence[str | int] | str | int,
        *,
        stype_in: str = "raw_symbol",
        start: int | None = None,
    ) -> list[bytes]:
        """Every tape record a subscription would receive, in order (see :func:`tape_records`)."""
        return tape_records(
            self.tape, schema, symbols, stype_in=stype_in, start=start, symbology=self.symbology
        )


def tape_records(
    tape: Tape,
    schema: str,
    symbols: Sequence[str | int] | str | int,
    *,
    stype_in: str = "raw_symbol",
    start: int | None = None,
    symbology: Symbology | None = None,
) -> list[bytes]:
    """The raw bytes of every tape record of ``schema`` for ``symbols``, in tape order.

    With ``start``, only records with ``ts_event >= start`` (``ts_recv`` for BBO/CBBO), as a
    replay. Continuous symbols follow their roll steps by tape position. A live subscription
    without ``start`` receives a contiguous run of this list: from its session's start on.
    """
    symbology = symbology or Symbology(tape)
    wanted = [str(s) for s in ([symbols] if isinstance(symbols, str | int) else symbols)]
    n = len(tape)
    member = np.zeros(n, dtype=np.bool_)
    for symbol in wanted:
        if stype_in == "continuous":
            steps = symbology.rolls(symbol)
            bounds = [0, *(s.position for s in steps), n]
            iids = [symbology.continuous_base(symbol), *(s.instrument_id for s in steps)]
            for lo, hi, iid in zip(bounds[:-1], bounds[1:], iids, strict=True):
                member[lo:hi] |= tape.instrument_id[lo:hi] == iid
        else:
            member |= np.isin(tape.instrument_id, symbology.resolve(stype_in, symbol))
    member &= tape.schema == schema_code(schema)
    if start is not None:
        member &= tape.ts_start >= np.uint64(max(start, 0))
    return tape.records(np.flatnonzero(member))


class GatewayThread:
    """Run a :class:`LiveGateway` on its own event loop in a daemon thread.

    For synchronous callers (tests, notebooks): ``with GatewayThread(gateway) as gw:`` starts
    it and ``gw.port`` is bound; leaving the block stops it.
    """

    def __init__(self, gateway: LiveGateway) -> None:
        self.gateway = gateway
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="qmachina-gateway", daemon=True
        )

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.gateway.start(), self._loop).result(timeout=30)
        return self.gateway

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
