"""Live ingestion: the official ``databento.Live`` client into bronze, with no gap and no
duplicate across faults.

One :class:`LiveIngestor` runs one subscription on its caller's thread (:meth:`LiveIngestor.run`
blocks until asked to stop). It connects, subscribes and appends every market record, as the
gateway sent it, to :class:`qmachina.live.bronze.Bronze`. When the connection ends for any
reason it did not ask for (a reset, a clean close, a gateway error, or the watchdog: nothing at
all, not even a heartbeat, for ``watchdog_seconds``) it waits with exponential backoff and
jitter and subscribes again with ``start=`` the bronze checkpoint (intraday replay), dropping
what it already has (:class:`qmachina.live.checkpoint.ReplayFilter`). The client's own
``reconnect_policy`` stays off: it resubscribes without ``start`` and loses the outage.

A refused session (a bad API key, an unknown dataset) raises at once; nothing else does until
``ReconnectPolicy.max_attempts`` attempts in a row have failed.

The client runs with its raw record path (:mod:`qmachina.live.raw_client`): its event loop
hands the gateway's bytes on per socket read, and the ingestor's thread, woken by them, cuts
them into record blocks and works on whole blocks with numpy (control records, duplicates,
checkpoint, day files) and one write each: no Python per record anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import databento
import databento_dbn
from databento.common.error import BentoError
from pydantic import SecretStr

from qmachina.live.bronze import Bronze, BronzeStream
from qmachina.live.checkpoint import Checkpoint, ReplayFilter
from qmachina.live.ingest_events import (
    Connected,
    Disconnected,
    DisconnectReason,
    GatewayError,
    GatewayNotice,
    LiveEvent,
    Progress,
    Reconnecting,
    SymbolMapped,
)
from qmachina.live.raw_client import RawRecordFeed, RawStreamError, raw_live_client

__all__ = [
    "IngestSummary",
    "LiveAuthenticationError",
    "LiveConnectionError",
    "LiveDatasetError",
    "LiveIngestError",
    "LiveIngestor",
    "LiveRefusedError",
    "LiveTarget",
    "ReconnectPolicy",
]

log = logging.getLogger(__name__)

#: How the client words failures to reach a gateway (``databento.live.session``); any other
#: failure of ``subscribe`` is the gateway refusing the session.
_TRANSIENT_PREFIXES: Final = ("Connection to ", "Authentication with ")
#: How much earlier than the checkpoint a resumed subscription starts (one second of replay
#: costs little; it covers instruments whose first record had not arrived yet).
DEFAULT_REPLAY_MARGIN_NS: Final = 1_000_000_000
#: Databento's bounds on the heartbeat interval a client may ask for.
HEARTBEAT_BOUNDS_S: Final = (5, 1800)


def heartbeat_for(watchdog_seconds: float) -> int:
    """The heartbeat interval to ask for so that a quiet but healthy feed never trips a
    watchdog of ``watchdog_seconds``: half of it, within Databento's bounds.

    Raises ``ValueError`` for a watchdog no heartbeat fits under (5 s or less).
    """
    low, high = HEARTBEAT_BOUNDS_S
    if not watchdog_seconds > low:
        raise ValueError(
            f"watchdog_seconds must exceed {low} s, the shortest heartbeat interval the "
            f"gateway sends, or a quiet market counts as a fault (got {watchdog_seconds:g})"
        )
    return max(low, min(high, int(watchdog_seconds // 2)))


class LiveIngestError(Exception):
    """Live ingestion cannot go on."""


class LiveRefusedError(LiveIngestError):
    """The gateway refused the session; retrying would be refused again."""


class LiveAuthenticationError(LiveRefusedError):
    """The API key was not accepted."""


class LiveDatasetError(LiveRefusedError):
    """The gateway does not serve the dataset."""


class LiveConnectionError(LiveIngestError):
    """Reconnection gave up after ``max_attempts`` attempts in a row."""


@dataclass(frozen=True, kw_only=True)
class LiveTarget:
    """Where and what to subscribe. ``key`` stays secret: never logged, never in messages."""

    host: str
    port: int
    dataset: str
    symbols: tuple[str, ...]
    key: SecretStr
    stype_in: str = "raw_symbol"
    schema: str = "mbo"
    #: Asked of the gateway (Databento accepts 5..1800 s); keep it below ``watchdog_seconds``.
    heartbeat_interval_s: int | None = None
    #: Ask the gateway to append its send time to every record (DBN ``ts_out``).
    ts_out: bool = False

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("a live target needs at least one symbol")
        if not self.key.get_secret_value().strip():
            raise ValueError("the API key is empty")


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff with jitter between connection attempts.

    Attempt ``n`` (1 for the first after a failure) waits ``initial_seconds * multiplier**(n-1)``
    capped at ``max_seconds``, then moved by up to ``± jitter`` of itself (and capped again).
    ``max_attempts``: failed attempts in a row before giving up (None: never give up). The count
    starts over once a connection has written new records or stayed up for ``max_seconds``.
    """

    initial_seconds: float = 0.2
    multiplier: float = 2.0
    max_seconds: float = 10.0
    jitter: float = 0.25
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.initial_seconds <= self.max_seconds:
            raise ValueError("need 0 <= initial_seconds <= max_seconds")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError("max_attempts must be >= 0")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before attempt ``attempt`` (>= 1)."""
        base = self.initial_seconds
        for _ in range(attempt - 1):
            base *= self.multiplier
            if base >= self.max_seconds:
                break
        base = min(base, self.max_seconds)
        spread = base * self.jitter
        return min(self.max_seconds, max(0.0, base + rng.uniform(-spread, spread)))


@dataclass(frozen=True)
class IngestSummary:
    """What one :meth:`LiveIngestor.run` did."""

    received: int  # market records received, duplicates included
    written: int
    duplicates: int
    connections: int
    disconnects: Mapping[DisconnectReason, int]  # connections that ended unasked, by reason
    checkpoint: Checkpoint
    files: tuple[Path, ...]
    seconds: float

    @property
    def reconnects(self) -> int:
        """Connections after the first."""
        return max(self.connections - 1, 0)


class _Retry(Exception):  # noqa: N818 - control flow inside the ingestor
    """A connection attempt failed in a way worth retrying; the text is safe to show."""


class LiveIngestor:
    """Runs one live subscription into one bronze session until stopped."""

    def __init__(
        self,
        target: LiveTarget,
        bronze: Bronze,
        *,
        policy: ReconnectPolicy | None = None,
        watchdog_seconds: float = 45.0,
        on_event: Callable[[LiveEvent], None] | None = None,
        session_start: int | None = None,
        replay_margin_ns: int = DEFAULT_REPLAY_MARGIN_NS,
        progress_seconds: float = 0.5,
        sync_seconds: float = 1.0,
        poll_seconds: float = 0.005,
        drain_seconds: float = 5.0,
        seed: int | None = None,
    ) -> None:
        """``session_start``: where a brand-new session's first subscription starts (None:
        live now); a session bronze already holds resumes from its checkpoint instead, moved
        ``replay_margin_ns`` earlier (see :meth:`Checkpoint.resume_start`)."""
        if not watchdog_seconds > 0:
            raise ValueError("watchdog_seconds must be > 0")
        heartbeat = target.heartbeat_interval_s
        if heartbeat is not None and watchdog_seconds <= heartbeat:
            raise ValueError(
                f"watchdog_seconds ({watchdog_seconds:g}) must exceed the heartbeat interval "
                f"({heartbeat} s): a quiet market sends nothing else"
            )
        if replay_margin_ns < 0:
            raise ValueError("replay_margin_ns must be >= 0")
        self.target = target
        self.bronze = bronze
        self.policy = policy or ReconnectPolicy()
        self.watchdog_seconds = watchdog_seconds
        self.replay_margin_ns = replay_margin_ns
        self._on_event = on_event
        self._progress_s = progress_seconds
        self._sync_s = sync_seconds
        self._poll_s = poll_seconds
        self._drain_s = drain_seconds
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        # Where to start while bronze has no record: the caller's start, else the gateway's
        # session start of the first connection (its metadata), so an early fault loses nothing.
        self._floor = session_start
        self.received = 0
        self.written = 0
        self.duplicates = 0
        self._last_ts: int | None = None
        # Per connection: the gateway's bytes, its replay filter and the errors it reported.
        self._feed = RawRecordFeed()
        self._filter = ReplayFilter(Checkpoint())
        self._errors: list[str] = []
        self._stream_checked = False

    # --------------------------------------------------------------------------- control

    def stop(self) -> None:
        """Ask :meth:`run` to drain, close, sync and return (from any thread)."""
        self._stop.set()

    def run(self, stop: threading.Event | None = None) -> IngestSummary:
        """Ingest until ``stop`` (or :meth:`stop`) is set; the summary of what happened.

        Raises :class:`LiveRefusedError` subclasses at once and :class:`LiveConnectionError`
        when reconnection gives up; bronze is synced in every case.
        """
        if stop is not None:
            self._stop = stop
        stop = self._stop
        started = time.monotonic()
        connections = 0
        failures = 0  # failed attempts in a row
        disconnects: Counter[DisconnectReason] = Counter()
        try:
            while not stop.is_set():
                start = self._resume_start()
                try:
                    client = self._connect(start)
                except _Retry as exc:
                    failures += 1
                    self._backoff(failures, str(exc))
                    continue
                connections += 1
                written_before, since = self.written, time.monotonic()
                try:
                    self._emit(Connected(failures, client.session_id, start))
                    log.info("live session %s streaming from %s", client.session_id, start)
                    reason, detail = self._stream(client, stop)
                except BaseException:
                    # The caller's callback or the disk failed: leave no client running.
                    client.terminate()
                    raise
                self._emit(Disconnected(reason, detail))
                if reason is DisconnectReason.STOPPED:
                    break
                log.warning("live session %s ended: %s (%s)", client.session_id, reason, detail)
                disconnects[reason] += 1
                lasted = time.monotonic() - since
                if self.written > written_before or lasted >= self.policy.max_seconds:
                    failures = 0
                failures += 1
                self._backoff(failures, detail)
        finally:
            self.bronze.sync()
        self._progress()
        return IngestSummary(
            received=self.received,
            written=self.written,
            duplicates=self.duplicates,
            connections=connections,
            disconnects=dict(disconnects),
            checkpoint=self.bronze.checkpoint,
            files=tuple(self.bronze.files()),
            seconds=time.monotonic() - started,
        )

    def _backoff(self, attempt: int, detail: str) -> None:
        limit = self.policy.max_attempts
        if limit is not None and attempt > limit:
            raise LiveConnectionError(
                f"{self.target.host}:{self.target.port}: gave up after {limit} reconnection "
                f"attempt(s); last: {detail}"
            )
        delay = self.policy.delay(attempt, self._rng)
        self._emit(Reconnecting(attempt, delay, detail))
        self._stop.wait(delay)

    def _resume_start(self) -> int | None:
        checkpoint = self.bronze.checkpoint
        if checkpoint.records:
            return checkpoint.resume_start(self.replay_margin_ns)
        stream = self.bronze.stream
        return stream.start if stream is not None else self._floor

    # ------------------------------------------------------------------------ connection

    def _scrub(self, text: str) -> str:
        """``text`` without the API key, should any library ever quote it."""
        key = self.target.key.get_secret_value()
        return text.replace(key, "**********") if key else text

    def _connect(self, start: int | None) -> databento.Live:
        target = self.target
        feed = RawRecordFeed()
        client = raw_live_client(
            feed,
            key=target.key.get_secret_value(),
            gateway=target.host,
            port=target.port,
            ts_out=target.ts_out,
            heartbeat_interval_s=target.heartbeat_interval_s,
            reconnect_policy="none",
        )
        try:
            client.subscribe(
                target.dataset,
                target.schema,
                list(target.symbols),
                stype_in=target.stype_in,
                start=start,
            )
        except BentoError as exc:
            text = self._scrub(str(exc))
            where = f"{target.host}:{target.port} ({target.dataset})"
            if text.startswith(_TRANSIENT_PREFIXES):
                raise _Retry(text) from None
            if "dataset" in text.lower():
                raise LiveDatasetError(f"{where}: {text}") from None
            raise LiveAuthenticationError(f"{where}: {text}") from None
        client.start()
        self._feed = feed
        self._filter = ReplayFilter(self.bronze.checkpoint)
        self._errors = []
        self._stream_checked = False
        return client

    def _stream(
        self, client: databento.Live, stop: threading.Event
    ) -> tuple[DisconnectReason, str]:
        """Take records until the connection ends or ``stop`` is set; why it ended."""
        feed = self._feed
        now = time.monotonic()
        last_seen = next_progress = next_sync = now
        while True:
            if self._take():
                last_seen = time.monotonic()
            if stop.is_set():
                self._close(client)
                return DisconnectReason.STOPPED, "stop requested"
            if not client.is_connected():
                # Closed: the client has handed on every byte it read.
                self._take()
                return self._why_closed(client)
            now = time.monotonic()
            if now - last_seen > self.watchdog_seconds:
                client.terminate()
                self._take()
                return (
                    DisconnectReason.WATCHDOG,
                    f"nothing received for {now - last_seen:.2f}s "
                    f"(watchdog {self.watchdog_seconds:g}s)",
                )
            if now >= next_progress:
                next_progress = now + self._progress_s
                self._progress()
            if now >= next_sync:
                next_sync = now + self._sync_s
                self.bronze.sync(background=True)
            feed.wait(self._poll_s)

    def _close(self, client: databento.Live) -> None:
        """Close on request: what the client has already received still goes to bronze."""
        client.stop()
        deadline = time.monotonic() + self._drain_s
        while client.is_connected() and time.monotonic() < deadline:
            time.sleep(self._poll_s)
        self._take()
        if client.is_connected():
            client.terminate()
        else:
            with contextlib.suppress(BentoError):
                client.block_for_close(timeout=self._drain_s)

    def _why_closed(self, client: databento.Live) -> tuple[DisconnectReason, str]:
        try:
            client.block_for_close(timeout=self._drain_s)
        except BentoError as exc:
            text = self._scrub(str(exc))
            if self._errors:
                return DisconnectReason.ERROR, "; ".join(self._errors)
            if text.startswith("Gateway timeout"):
                return DisconnectReason.WATCHDOG, text  # the client's own heartbeat monitor
            return DisconnectReason.RESET, text or type(exc.__context__).__name__
        if self._errors:
            return DisconnectReason.ERROR, "; ".join(self._errors)
        return DisconnectReason.CLOSED, "closed by the gateway"

    # --------------------------------------------------------------------------- records

    def _take(self) -> int:
        """Move what the gateway sent since the last call into bronze; how many records."""
        feed = self._feed
        metadata = feed.metadata
        if self._floor is None and metadata is not None:
            # A new session without a start of its own starts where its first connection did
            # (its metadata's start), so an early fault loses nothing.
            self._floor = int(metadata.start)
        try:
            block = feed.take()
        except RawStreamError as exc:
            raise LiveIngestError(f"{self.target.host}:{self.target.port}: {exc}") from None
        taken = len(block)
        if not taken:
            return 0
        control = block.control_mask()
        if control.any():
            for record in feed.decode(block.select(control)):
                self._control(record)
            block = block.select(~control)
        if not len(block):
            return taken
        if not self._stream_checked:
            self._begin()
        self.received += len(block)
        block, dropped = self._filter.apply(block)
        self.duplicates += dropped
        if len(block):
            self.bronze.append(block)
            self.bronze.flush()  # a killed process loses nothing it has taken
            self.written += len(block)
            self._last_ts = int(block.ts_event[-1])
        return taken

    def _begin(self) -> None:
        metadata = self._feed.metadata
        if metadata is None:
            raise LiveIngestError("the gateway sent records before its DBN metadata")
        target = self.target
        floor = self._floor if self._floor is not None else int(metadata.start)
        self.bronze.begin(
            BronzeStream(
                dataset=str(metadata.dataset),
                schema=target.schema,
                version=int(metadata.version),
                start=floor,
                stype_in=target.stype_in,
                symbols=target.symbols,
                ts_out=bool(metadata.ts_out),
            )
        )
        self._stream_checked = True

    def _control(self, record: Any) -> None:
        if isinstance(record, databento_dbn.SymbolMappingMsg | databento_dbn.SymbolMappingMsgV1):
            self._emit(
                SymbolMapped(
                    int(record.instrument_id),
                    str(record.stype_in_symbol),
                    str(record.stype_out_symbol),
                    int(record.ts_event),
                )
            )
        elif isinstance(record, databento_dbn.ErrorMsg | databento_dbn.ErrorMsgV1):
            message = self._scrub(str(record.err))
            self._errors.append(message)
            self._emit(GatewayError(message, _code(record), int(record.ts_event)))
        elif (
            isinstance(record, databento_dbn.SystemMsg | databento_dbn.SystemMsgV1)
            and not record.is_heartbeat()
        ):
            self._emit(GatewayNotice(str(record.msg), _code(record), int(record.ts_event)))

    # ---------------------------------------------------------------------------- events

    def _emit(self, event: LiveEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _progress(self) -> None:
        lag = None if self._last_ts is None else time.time_ns() - self._last_ts
        self._emit(
            Progress(self.received, self.written, self.duplicates, self.bronze.checkpoint, lag)
        )


def _code(record: Any) -> int | None:
    code = getattr(record, "code", None)
    return None if code is None else int(code)
