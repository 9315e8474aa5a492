"""LiveIngestionSession: a Databento Live feed ingested into bronze, durably, until stopped.

The workflow runs one long activity, ``ingest_live``: it runs the official ``databento.Live``
client, writes every record to the session's bronze DBN files (from which its checkpoint is
derived, so bronze and checkpoint cannot disagree), reconnects with backoff on any fault
(resubscribing from the checkpoint and dropping duplicates), and heartbeats its checkpoint. A
lost worker's attempt times out on its heartbeat and the next attempt, on any worker, resumes
from the bronze the last one left. The activity reports what it sees (connected, reconnecting,
progress, a contract roll) with the ``report`` signal, on each change and every few seconds, and
the ``status`` query answers from the last report.

``stop`` (a signal) cancels the activity, which drains what the client delivered, closes it and
flushes its files; the session ends ``stopped``. A refused key or dataset ends it ``failed`` at
once (no retry loop). Terminal states are final: a stop after the end changes nothing.

This module holds the workflow and its input/output types; the activity imports them, and the
workflow knows it only by name.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ActivityCancellationType

INGEST_LIVE = "ingest_live"
AUTHENTICATION_FAILED = "LiveAuthenticationError"
"""The error type of a refused key or dataset: not retried."""

LiveState = Literal["starting", "running", "stopping", "stopped", "failed"]
ConnectionState = Literal["connecting", "connected", "reconnecting", "closed"]
TERMINAL: tuple[LiveState, ...] = ("stopped", "failed")


@dataclass(frozen=True)
class Reconnect:
    """Backoff between reconnection attempts: ``initial_seconds`` times ``multiplier`` per
    attempt, at most ``max_seconds``, each delay jittered by up to ``jitter`` of itself."""

    initial_seconds: float = 0.5
    multiplier: float = 2.0
    max_seconds: float = 30.0
    jitter: float = 0.25


@dataclass(frozen=True)
class CalendarStep:
    """From ``from_ns`` (market time, nanoseconds since the epoch) on, ``symbol`` is in force."""

    from_ns: int
    symbol: str


@dataclass(frozen=True)
class RollCalendar:
    """The calendar roll policy: ``name`` (what the session's roll events call the rolling
    symbol, e.g. ``ES``) stands for each step's raw symbol from its time on."""

    name: str
    steps: list[CalendarStep]


@dataclass(frozen=True)
class LiveSessionRequest:
    """What to ingest and from where. The API key is never here (it would be in the history):
    the workers read it from their own settings."""

    workspace_id: str
    session_id: str
    created_by: str
    dataset: str
    symbols: list[str]
    bronze_root: str
    gateway_host: str | None = None
    """None: Databento's own live gateway for the dataset."""
    gateway_port: int = 13000
    stype_in: str = "raw_symbol"
    schema: str = "mbo"
    start: int | None = None
    """Nanoseconds since the epoch to replay from on the first connection; None: live now."""
    reconnect: Reconnect = field(default_factory=Reconnect)
    watchdog_seconds: float = 10.0
    report_every_seconds: float = 30.0
    heartbeat_timeout_seconds: float = 30.0
    roll_calendar: RollCalendar | None = None
    """None: rolls follow the gateway's mappings of continuous symbols."""


@dataclass(frozen=True)
class InstrumentCheckpoint:
    instrument_id: int
    ts_event: int
    """The last ``ts_event`` taken for the instrument."""
    taken_at_ts: int
    """How many records with that ``ts_event`` were taken."""


@dataclass(frozen=True)
class LiveReport:
    """What the ingestion reports: its connection, counts, checkpoint and contracts."""

    connection: ConnectionState
    events_received: int = 0
    records_written: int = 0
    duplicates_dropped: int = 0
    reconnects: int = 0
    lag_ns: int | None = None
    checkpoint: list[InstrumentCheckpoint] = field(default_factory=list)
    contracts: dict[str, str] = field(default_factory=dict)
    """Each subscribed symbol's active contract (``ES.c.0`` -> ``ESH4``)."""
    rolls: int = 0
    last_error: str = ""
    reported_at: datetime | None = None


@dataclass(frozen=True)
class StopRequest:
    actor: str
    reason: str = ""


@dataclass(frozen=True)
class LiveStatus:
    session_id: str
    state: LiveState
    report: LiveReport
    stopped_by: str | None = None
    error: str = ""


@workflow.defn
class LiveIngestionSession:
    def __init__(self) -> None:
        self._request: LiveSessionRequest | None = None
        self._state: LiveState = "starting"
        self._report = LiveReport(connection="connecting")
        self._stop: StopRequest | None = None
        self._error = ""

    @workflow.run
    async def run(self, request: LiveSessionRequest) -> LiveStatus:
        self._request = request
        ingestion = workflow.start_activity(
            INGEST_LIVE,
            request,
            start_to_close_timeout=timedelta(days=7),
            heartbeat_timeout=timedelta(seconds=request.heartbeat_timeout_seconds),
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=10),
                non_retryable_error_types=[AUTHENTICATION_FAILED],
            ),
        )
        if self._state == "starting":
            self._state = "running"
        stop_asked = asyncio.ensure_future(workflow.wait_condition(lambda: self._stop is not None))
        await workflow.wait([ingestion, stop_asked], return_when=asyncio.FIRST_COMPLETED)
        if not ingestion.done():
            self._state = "stopping"
            ingestion.cancel()
        try:
            await ingestion
        except ActivityError as error:
            if self._stop is None:
                self._state = "failed"
                self._error = _cause(error)
        except asyncio.CancelledError:
            pass  # the stop asked for: the activity drained and flushed before it ended
        if self._state != "failed":
            self._state = "stopped"
        stop_asked.cancel()
        self._report = replace(self._report, connection="closed")
        return self.status()

    @workflow.signal
    def report(self, report: LiveReport) -> None:
        if self._state in TERMINAL:
            return
        self._report = report
        if self._state == "starting":
            self._state = "running"

    @workflow.signal
    def stop(self, request: StopRequest) -> None:
        """Drain and end ``stopped``; once asked (or once ended), later stops change nothing."""
        if self._stop is None and self._state not in TERMINAL:
            self._stop = request

    @workflow.query
    def status(self) -> LiveStatus:
        request = self._request
        return LiveStatus(
            session_id="" if request is None else request.session_id,
            state=self._state,
            report=self._report,
            stopped_by=None if self._stop is None else self._stop.actor,
            error=self._error,
        )


def _cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, ApplicationError) and error.type:
        return f"{error.type}: {error.message}"
    return str(error)
