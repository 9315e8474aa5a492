"""One client connection: greeting and CRAM, subscriptions, then the DBN stream.

The stream is the tape, filtered by the session's subscriptions, from the position the session
started at (or from each replay's start), cut at *stops*: a roll step of a continuous symbol
(a new ``SymbolMappingMsg``, then the new instrument's records) and the timed connection faults
that were pending when the session started. A session never runs ahead of the market's cursor,
so it waits at a stop until the fault has actually fired.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
import zstandard
from databento_dbn import ErrorCode

from qmachina.live.gateway_book import snapshot_records
from qmachina.live.gateway_faults import Fault, FaultKind
from qmachina.live.gateway_protocol import (
    ALL_SYMBOLS,
    HEARTBEAT,
    INTERNAL_ERROR,
    INVALID_SUBSCRIPTION,
    REPLAY_COMPLETED,
    START_SESSION,
    SUBSCRIPTION_ACK,
    SYMBOL_RESOLUTION_FAILED,
    AuthRequest,
    ProtocolError,
    SubscriptionRequest,
    auth_failure_line,
    auth_success_line,
    challenge_line,
    error_record,
    greeting_line,
    metadata_header,
    new_challenge,
    parse_auth_request,
    parse_control_line,
    parse_subscription,
    symbol_mapping_record,
    system_record,
    with_ts_out,
)
from qmachina.live.gateway_symbols import RollStep
from qmachina.live.gateway_tape import schema_code

if TYPE_CHECKING:
    from qmachina.live.gateway import LiveGateway

__all__ = ["AUTH_FAILED", "GatewaySession"]

log = logging.getLogger(__name__)

AUTH_FAILED: Final = "Authentication failed: the API key is not accepted by this gateway"
AUTH_TIMEOUT_S: Final = 30.0
#: What Databento's client asks for when the user does not say (``LiveSession``).
DEFAULT_HEARTBEAT_S: Final = 30.0
#: Tape records examined per write, so one session cannot hold the event loop for long.
CHUNK_RECORDS: Final = 4096
_ZSTD_FLUSH: Final = zstandard.COMPRESSOBJ_FLUSH_BLOCK


class _SessionOver(Exception):  # noqa: N818 - control flow, not an error
    """The session ends here: a fault, the client left, or the tape is over."""


@dataclass
class _Subscription:
    request: SubscriptionRequest
    schema_code: int
    from_pos: int  # for live subscriptions: the first tape position they receive
    members: dict[str, list[int]]  # subscribed symbol -> the instruments it means now
    iids: npt.NDArray[np.uint32] = dataclasses.field(
        default_factory=lambda: np.zeros(0, dtype=np.uint32)
    )

    def refresh(self) -> None:
        every = {iid for iids in self.members.values() for iid in iids}
        self.iids = np.asarray(sorted(every), dtype=np.uint32)


@dataclass(frozen=True)
class _Stop:
    """Something the stream must do before sending the record at ``position``."""

    position: int
    at_ns: int
    fault_index: int
    roll: RollStep | None = None
    fault: Fault | None = None


class GatewaySession:
    """The gateway side of one connection; :meth:`run` serves it until it ends."""

    def __init__(
        self,
        gateway: LiveGateway,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session_id: str,
    ) -> None:
        self._gw = gateway
        self._tape = gateway.tape
        self._reader = reader
        self._writer = writer
        self.session_id = session_id
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._wake_event = asyncio.Event()
        self._closed = False
        self._auth: AuthRequest | None = None
        self._requests: list[SubscriptionRequest] = []
        self._incoming: list[SubscriptionRequest] = []
        self._errors: list[tuple[str, ErrorCode]] = []
        self._subs: list[_Subscription] = []
        self._stops: list[_Stop] = []
        self._roll_state: dict[str, int] = {}  # continuous symbol -> instrument, as streamed
        self._mapped: dict[str, set[int]] = {}  # symbol -> instruments announced for it
        self._pos = 0
        self._live_from = 0
        self._sent = 0
        self._replaying: set[str] = set()
        self._stall_until = 0.0
        self._last_send = 0.0
        self._heartbeat_s = DEFAULT_HEARTBEAT_S
        self._compressor: Any = None
        self._reader_task: asyncio.Task[None] | None = None

    # --------------------------------------------------------------------- control

    def wake(self) -> None:
        """The market moved or a fault fired: look again."""
        self._wake_event.set()

    def abort(self) -> None:
        """Reset the connection: a TCP RST, not a clean close."""
        if self._closed:
            return
        self._closed = True
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER 0 makes close() send RST, so the client sees a reset, not an EOF.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()
        self.wake()

    async def run(self) -> None:
        """Serve the connection until the client leaves, a fault ends it or the gateway stops."""
        log.info("session %s: connection from %s", self.session_id, self.peer)
        try:
            if await self._authenticate() and await self._read_subscriptions():
                await self._start_stream()
                await self._stream()
        except _SessionOver:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.info("session %s: connection lost (%s)", self.session_id, type(exc).__name__)
        finally:
            if self._reader_task is not None:
                self._reader_task.cancel()
            if not self._writer.is_closing():
                self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            log.info("session %s: closed after %d tape records", self.session_id, self._sent)

    # ------------------------------------------------------------------- handshake

    async def _authenticate(self) -> bool:
        challenge = new_challenge()
        self._writer.write(greeting_line() + challenge_line(challenge))
        await self._writer.drain()
        line = await asyncio.wait_for(self._reader.readline(), AUTH_TIMEOUT_S)
        if not line:
            return False
        try:
            auth = parse_auth_request(parse_control_line(line))
        except ProtocolError as exc:
            return await self._refuse(f"Invalid authentication request: {exc}")
        if not self._gw.keys.accepts(challenge, auth.response):
            return await self._refuse(AUTH_FAILED)
        if auth.dataset != self._tape.dataset:
            return await self._refuse(
                f"Unknown dataset {auth.dataset}: this gateway serves {self._tape.dataset}"
            )
        self._auth = auth
        self._heartbeat_s = float(
            self._gw.heartbeat_s or auth.heartbeat_interval_s or DEFAULT_HEARTBEAT_S
        )
        self._writer.write(auth_success_line(self.session_id))
        await self._writer.drain()
        log.info(
            "session %s: authenticated for %s (client %s, compression %s, ts_out %d)",
            self.session_id,
            auth.dataset,
            auth.client or "unknown",
            auth.compression,
            auth.ts_out,
        )
        return True

    async def _refuse(self, error: str) -> bool:
        log.warning("session %s: refused: %s", self.session_id, error)
        self._writer.write(auth_failure_line(error))
        await self._writer.drain()
        return False

    async def _read_subscriptions(self) -> bool:
        while True:
            line = await self._reader.readline()
            if not line:
                return False
            # Older clients send a bare ``start_session``; the Python client ``start_session=0``.
            if line.strip() == START_SESSION.encode():
                return True
            try:
                fields = parse_control_line(line)
                if START_SESSION in fields:
                    return True
                self._requests.append(parse_subscription(fields))
            except ProtocolError as exc:
                log.warning("session %s: bad subscription: %s", self.session_id, exc)
                self._errors.append((str(exc), INVALID_SUBSCRIPTION))

    # ---------------------------------------------------------------------- stream

    async def _start_stream(self) -> None:
        auth = self._auth
        assert auth is not None
        gw, tape = self._gw, self._tape
        now = gw.clock.now_ns()
        self._live_from = gw.cursor
        scan_from = self._live_from
        starts = [r.start for r in self._requests if r.start is not None]
        for start in starts:
            later = np.flatnonzero(tape.ts_start >= np.uint64(max(start, 0)))
            scan_from = min(scan_from, int(later[0]) if len(later) else len(tape))
        self._pos = scan_from
        # Rolls before the stream's first record are history: the initial mappings say them.
        for symbol in gw.symbology.continuous_symbols():
            self._roll_state[symbol] = gw.symbology.continuous_base(symbol)
        for step in gw.symbology.all_rolls():
            if step.position < scan_from or (
                step.position == scan_from and gw.fired(step.fault_index)
            ):
                self._roll_state[step.symbol] = step.instrument_id
            else:
                self._stops.append(_Stop(step.position, step.at_ns, step.fault_index, roll=step))
        for timed in gw.pending_connection_faults():
            self._stops.append(_Stop(timed.position, timed.at_ns, timed.index, fault=timed.fault))
        self._stops.sort(key=lambda s: (s.position, s.at_ns, s.fault_index))
        if auth.compression == "zstd":
            self._compressor = zstandard.ZstdCompressor().compressobj()
        metadata_start = min(starts) if starts else now
        self._send(
            metadata_header(tape.dataset, metadata_start, tape.version, auth.ts_out), record=False
        )
        for message, code in self._errors:
            self._send(error_record(tape.version, now, message, code))
        for request in self._requests:
            live_from = self._live_from if request.start is None else 0
            await self._subscribe(request, live_from)
        self._reader_task = asyncio.create_task(self._read_more())
        log.info(
            "session %s: streaming %d subscription(s) from tape position %d (live from %d)",
            self.session_id,
            len(self._subs),
            self._pos,
            self._live_from,
        )
        await self._writer.drain()

    async def _subscribe(self, request: SubscriptionRequest, from_pos: int) -> None:
        gw, tape = self._gw, self._tape
        now = gw.clock.now_ns()
        members: dict[str, list[int]] = {}
        for symbol in request.symbols:
            if request.stype_in == "continuous" and symbol in self._roll_state:
                iids = [self._roll_state[symbol]]
            else:
                iids = gw.symbology.resolve(request.stype_in, symbol)
            if not iids:
                self._send(
                    error_record(
                        tape.version,
                        now,
                        f"Failed to resolve symbol {symbol} ({request.stype_in})",
                        SYMBOL_RESOLUTION_FAILED,
                    )
                )
                continue
            members[symbol] = iids
        sub = _Subscription(request, schema_code(request.schema), from_pos, members)
        sub.refresh()
        self._subs.append(sub)
        if request.is_last:
            self._send(
                system_record(
                    tape.version,
                    now,
                    f"Subscription request {request.request_id} for {request.schema} data "
                    "succeeded",
                    SUBSCRIPTION_ACK,
                )
            )
        for symbol, iids in members.items():
            for iid in iids:
                self._announce(
                    gw.symbology.raw_symbol(iid) if symbol == ALL_SYMBOLS else symbol, iid
                )
        if request.start is not None:
            self._replaying.add(request.schema)
        if request.snapshot:
            if request.schema != "mbo":
                self._send(
                    error_record(
                        tape.version,
                        now,
                        f"Snapshots are only available for mbo, not {request.schema}",
                        INVALID_SUBSCRIPTION,
                    )
                )
                return
            iids = [int(i) for i in sub.iids]
            blocks = await asyncio.to_thread(snapshot_records, tape, iids, from_pos, now)
            self._send(blocks)
            log.info(
                "session %s: snapshot of %d instrument(s) at tape position %d (%d bytes)",
                self.session_id,
                len(iids),
                from_pos,
                len(blocks),
            )

    def _announce(self, symbol: str, instrument_id: int) -> None:
        known = self._mapped.setdefault(symbol, set())
        if instrument_id in known:
            return
        known.add(instrument_id)
        out_symbol = self._gw.symbology.raw_symbol(instrument_id)
        self._send(
            symbol_mapping_record(
                self._tape.version, instrument_id, self._gw.clock.now_ns(), symbol, out_symbol
            )
        )

    async def _read_more(self) -> None:
        """Subscriptions added after the start; EOF means the client has gone."""
        try:
            while line := await self._reader.readline():
                try:
                    request = parse_subscription(parse_control_line(line))
                except ProtocolError as exc:
                    log.warning("session %s: bad subscription: %s", self.session_id, exc)
                    continue
                self._incoming.append(request)
                self.wake()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        self._closed = True
        self.wake()

    async def _stream(self) -> None:
        loop = asyncio.get_running_loop()
        gw, n = self._gw, len(self._tape)
        while True:
            self._wake_event.clear()
            if self._closed:
                raise _SessionOver
            stalled = self._stall_until - loop.time()
            if stalled > 0:
                await self._wait(stalled)
                continue
            if self._incoming:
                await self._take_incoming()
                continue
            counted = gw.next_count_fault()
            if counted is not None and self._sent >= (counted[1].after_records or 0):
                if gw.claim_fault(counted[0]):
                    await self._apply_fault(counted[1])
                continue
            stop = self._stops[0] if self._stops else None
            limit = gw.cursor if stop is None else min(gw.cursor, stop.position)
            if self._pos < limit:
                await self._send_tape(min(limit, self._pos + CHUNK_RECORDS))
                continue
            if stop is not None and stop.position == self._pos and gw.fired(stop.fault_index):
                self._stops.pop(0)
                await self._apply_stop(stop)
                continue
            self._replay_check()
            if gw.finished and gw.close_at_end and self._pos >= n and not self._stops:
                log.info("session %s: end of tape, closing", self.session_id)
                await self._writer.drain()
                raise _SessionOver
            idle = loop.time() - self._last_send
            if idle >= self._heartbeat_s:
                self._send(
                    system_record(self._tape.version, gw.clock.now_ns(), "Heartbeat", HEARTBEAT)
                )
                await self._writer.drain()
                continue
            await self._wait(self._heartbeat_s - idle)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake_event.wait(), seconds)

    async def _take_incoming(self) -> None:
        requests, self._incoming = self._incoming, []
        for request in requests:
            if request.start is not None:
                # As Databento: once a session has started, new subscriptions are live only.
                log.info("session %s: start= ignored on a late subscription", self.session_id)
                request = dataclasses.replace(request, start=None)
            await self._subscribe(request, self._gw.cursor)
        await self._writer.drain()

    def _matching(self, lo: int, hi: int) -> npt.NDArray[np.int64]:
        tape = self._tape
        schema = tape.schema[lo:hi]
        iid = tape.instrument_id[lo:hi]
        wanted = np.zeros(hi - lo, dtype=np.bool_)
        for sub in self._subs:
            if sub.from_pos >= hi or len(sub.iids) == 0:
                continue
            match = (schema == sub.schema_code) & np.isin(iid, sub.iids)
            if sub.from_pos > lo:
                match[: sub.from_pos - lo] = False
            if sub.request.start is not None:
                match &= tape.ts_start[lo:hi] >= np.uint64(max(sub.request.start, 0))
            wanted |= match
        return np.flatnonzero(wanted).astype(np.int64) + lo

    async def _send_tape(self, end: int) -> None:
        positions = self._matching(self._pos, end)
        counted = self._gw.next_count_fault()
        due: tuple[int, Fault] | None = None
        if counted is not None:
            left = max((counted[1].after_records or 0) - self._sent, 0)
            if len(positions) >= left:
                positions = positions[:left]
                end = int(positions[-1]) + 1 if left > 0 else self._pos
                due = counted
        if len(positions):
            self._send(self._tape.gather(positions))
            self._sent += len(positions)
        self._pos = end
        self._replay_check()
        await self._writer.drain()
        if due is not None and self._gw.claim_fault(due[0]):
            await self._apply_fault(due[1])

    def _replay_check(self) -> None:
        if self._replaying and self._pos >= self._live_from:
            for schema in sorted(self._replaying):
                self._send(
                    system_record(
                        self._tape.version,
                        self._gw.clock.now_ns(),
                        f"Finished {schema} replay",
                        REPLAY_COMPLETED,
                    )
                )
            self._replaying.clear()

    async def _apply_stop(self, stop: _Stop) -> None:
        if stop.fault is not None:
            await self._apply_fault(stop.fault)
            return
        step = stop.roll
        assert step is not None
        self._roll_state[step.symbol] = step.instrument_id
        rolled = False
        for sub in self._subs:
            if sub.request.stype_in == "continuous" and step.symbol in sub.members:
                sub.members[step.symbol] = [step.instrument_id]
                sub.refresh()
                rolled = True
        if rolled:
            self._mapped[step.symbol] = set()
            self._announce(step.symbol, step.instrument_id)
            log.info(
                "session %s: %s rolled to %s",
                self.session_id,
                step.symbol,
                self._gw.symbology.raw_symbol(step.instrument_id),
            )
            await self._writer.drain()

    async def _apply_fault(self, fault: Fault) -> None:
        log.warning("session %s: %s", self.session_id, fault.describe())
        if fault.kind is FaultKind.RESET:
            self.abort()
            raise _SessionOver
        if fault.kind is FaultKind.CLOSE:
            await self._writer.drain()
            raise _SessionOver
        if fault.kind is FaultKind.ERROR:
            now = self._gw.clock.now_ns()
            self._send(error_record(self._tape.version, now, fault.message, INTERNAL_ERROR))
            await self._writer.drain()
            raise _SessionOver
        if fault.kind is FaultKind.STALL:
            self._stall_until = asyncio.get_running_loop().time() + fault.seconds
        elif fault.kind is FaultKind.DOWN:
            self._gw.go_down(fault.seconds)
            raise _SessionOver

    def _send(self, data: bytes, *, record: bool = True) -> None:
        auth = self._auth
        assert auth is not None
        if record and auth.ts_out:
            data = with_ts_out(data, self._gw.send_time_ns())
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(_ZSTD_FLUSH)
        self._writer.write(data)
        self._last_send = asyncio.get_running_loop().time()
