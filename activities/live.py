"""The LiveIngestionSession's activity: the live ingestor run in a thread, its checkpoint
heartbeated, what it sees reported to the workflow, and contract rolls recorded in the store.

The ingestor (:mod:`qmachina.live.ingest`) owns correctness: bronze is the record of what was
taken and the checkpoint is derived from it, so a retried attempt, on this worker or another,
resumes from the bronze the last one left, whatever its heartbeat said. The activity adds the
Temporal side: a heartbeat every second (which is also how a stop's cancellation reaches it),
a ``report`` signal on every change of connection and every ``report_every_seconds``, and one
``contract_roll_event`` row per roll.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from qmachina.live.bronze import Bronze, BronzeLockedError
from qmachina.live.checkpoint import Checkpoint
from qmachina.live.ingest import (
    IngestSummary,
    LiveIngestor,
    LiveRefusedError,
    LiveTarget,
    ReconnectPolicy,
    heartbeat_for,
)
from qmachina.live.ingest_events import (
    Connected,
    Disconnected,
    GatewayError,
    LiveEvent,
    Progress,
    Reconnecting,
    SymbolMapped,
)
from qmachina.live.rolls import (
    CalendarRollPolicy,
    CalendarTracker,
    ContractRoll,
    ContractTracker,
)
from qmachina.store import live_sessions
from qmachina.store.models import ContractRollEvent
from workflows.live_session import (
    AUTHENTICATION_FAILED,
    INGEST_LIVE,
    InstrumentCheckpoint,
    LiveIngestionSession,
    LiveReport,
    LiveSessionRequest,
)

HEARTBEAT_SECONDS = 1.0


def databento_gateway(dataset: str) -> str:
    """Databento's own live gateway for ``dataset`` (``GLBX.MDP3`` -> ``glbx-mdp3.lsg...``)."""
    return f"{dataset.lower().replace('.', '-')}.lsg.databento.com"


def checkpoint_view(checkpoint: Checkpoint) -> list[InstrumentCheckpoint]:
    return [
        InstrumentCheckpoint(instrument_id, ts_event, taken)
        for instrument_id, (ts_event, taken) in sorted(checkpoint.instruments.items())
    ]


class _Reporter:
    """The report the workflow sees, kept up to date from the ingestor's events, and the rolls
    the session's policy finds in them: the gateway's mappings of continuous symbols, or a
    calendar followed in market time (the checkpoint's latest ``ts_event``)."""

    def __init__(self, request: LiveSessionRequest) -> None:
        self.report = LiveReport(connection="connecting")
        self.tracker = ContractTracker(request.symbols)
        calendar = request.roll_calendar
        self.calendar = (
            None
            if calendar is None
            else CalendarTracker(
                calendar.name,
                CalendarRollPolicy([(step.from_ns, step.symbol) for step in calendar.steps]),
            )
        )
        self.reconnects = 0

    def apply(self, event: LiveEvent) -> tuple[bool, list[ContractRoll]]:
        """Take one event; whether it is worth reporting at once, and the rolls it settled."""
        report = self.report
        if isinstance(event, Connected):
            self.report = replace(report, connection="connected")
            return True, []
        if isinstance(event, Disconnected):
            self.report = replace(report, connection="reconnecting", last_error=_fault(event))
            return True, []
        if isinstance(event, Reconnecting):
            self.reconnects += 1
            self.report = replace(report, connection="reconnecting", reconnects=self.reconnects)
            return True, []
        if isinstance(event, Progress):
            self.report = replace(
                report,
                events_received=event.received,
                records_written=event.written,
                duplicates_dropped=event.duplicates,
                lag_ns=event.lag_ns,
                checkpoint=checkpoint_view(event.checkpoint),
            )
            market_ns = max((ts for ts, _ in event.checkpoint.instruments.values()), default=None)
            if self.calendar is None or market_ns is None:
                return False, []
            return self._rolled(self.calendar.advance(market_ns))
        if isinstance(event, SymbolMapped):
            contracts = dict(report.contracts)
            contracts[event.stype_in_symbol] = event.stype_out_symbol
            self.report = replace(report, contracts=contracts)
            if self.calendar is not None:
                self.calendar.observe(event)
                return False, []
            roll = self.tracker.observe(event)
            return self._rolled([] if roll is None else [roll])
        if isinstance(event, GatewayError):
            self.report = replace(report, last_error=f"gateway error: {event.message}")
            return True, []
        return False, []

    def _rolled(self, rolls: list[ContractRoll]) -> tuple[bool, list[ContractRoll]]:
        if not rolls:
            return False, []
        contracts = dict(self.report.contracts)
        contracts[rolls[-1].symbol] = rolls[-1].to_contract.symbol
        moved = sum(roll.from_contract is not None for roll in rolls)
        self.report = replace(self.report, contracts=contracts, rolls=self.report.rolls + moved)
        return True, rolls


def _fault(event: Disconnected) -> str:
    return f"{event.reason}: {event.detail}" if event.detail else str(event.reason)


def _hand_over(
    loop: asyncio.AbstractEventLoop, events: asyncio.Queue[LiveEvent], event: LiveEvent
) -> None:
    """From the ingestor's thread to the activity's loop."""
    loop.call_soon_threadsafe(events.put_nowait, event)


class LiveActivities:
    """Bound to the worker's Temporal client (to report to the workflow), the store (rolls) and
    the key the workers hold."""

    def __init__(
        self,
        client: Client,
        sessions: async_sessionmaker[AsyncSession],
        api_key: SecretStr | None,
    ) -> None:
        self._client = client
        self._sessions = sessions
        self._api_key = api_key

    @activity.defn(name=INGEST_LIVE)
    async def ingest_live(self, request: LiveSessionRequest) -> LiveReport:
        """Ingest until cancelled (the session's stop), then drain, flush and report."""
        if self._api_key is None or not self._api_key.get_secret_value().strip():
            raise ApplicationError(
                "the workers have no Databento API key: set DATABENTO_API_KEY",
                type=AUTHENTICATION_FAILED,
                non_retryable=True,
            )
        try:
            heartbeat = heartbeat_for(request.watchdog_seconds)
        except ValueError as error:
            raise ApplicationError(
                str(error), type="InvalidLiveRequest", non_retryable=True
            ) from None
        try:
            bronze = await asyncio.to_thread(
                Bronze.open, Path(request.bronze_root), request.session_id
            )
        except BronzeLockedError as error:
            # The previous attempt's thread is still draining: retry once it let go.
            raise ApplicationError(str(error), type="BronzeLocked") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[LiveEvent] = asyncio.Queue()
        ingestor = LiveIngestor(
            LiveTarget(
                host=request.gateway_host or databento_gateway(request.dataset),
                port=request.gateway_port,
                dataset=request.dataset,
                symbols=tuple(request.symbols),
                key=self._api_key,
                stype_in=request.stype_in,
                schema=request.schema,
                heartbeat_interval_s=heartbeat,
            ),
            bronze,
            policy=ReconnectPolicy(
                initial_seconds=request.reconnect.initial_seconds,
                multiplier=request.reconnect.multiplier,
                max_seconds=request.reconnect.max_seconds,
                jitter=request.reconnect.jitter,
            ),
            watchdog_seconds=request.watchdog_seconds,
            on_event=lambda event: _hand_over(loop, events, event),
            session_start=request.start,
        )
        reporter = _Reporter(request)
        reporter.report = replace(reporter.report, checkpoint=checkpoint_view(bronze.checkpoint))
        running = asyncio.ensure_future(asyncio.to_thread(ingestor.run))
        try:
            await self._follow(request, running, events, reporter)
            summary = running.result()
        except asyncio.CancelledError:
            ingestor.stop()
            summary = await asyncio.shield(running)
            await self._drain(request, events, reporter)
            await self._send(_final(reporter, summary))
            raise
        except LiveRefusedError as error:
            raise ApplicationError(
                str(error), type=AUTHENTICATION_FAILED, non_retryable=True
            ) from None
        finally:
            if running.done():
                await asyncio.to_thread(bronze.close)
        final = _final(reporter, summary)
        await self._send(final)
        return final

    async def _follow(
        self,
        request: LiveSessionRequest,
        running: asyncio.Future[IngestSummary],
        events: asyncio.Queue[LiveEvent],
        reporter: _Reporter,
    ) -> None:
        last_sent = 0.0
        while not running.done():
            changed = await self._take(request, events, reporter)
            activity.heartbeat(reporter.report.checkpoint)
            now = time.monotonic()
            if changed or now - last_sent >= request.report_every_seconds:
                await self._send(reporter.report)
                last_sent = now

    async def _take(
        self, request: LiveSessionRequest, events: asyncio.Queue[LiveEvent], reporter: _Reporter
    ) -> bool:
        """Apply the events that arrive within a heartbeat period; whether one is worth
        reporting at once."""
        changed = False
        deadline = time.monotonic() + HEARTBEAT_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(events.get(), timeout=left)
            except TimeoutError:
                break
            urgent, rolls = reporter.apply(event)
            for roll in rolls:
                await self._record_roll(request, roll)
            changed = changed or urgent
        return changed

    async def _drain(
        self, request: LiveSessionRequest, events: asyncio.Queue[LiveEvent], reporter: _Reporter
    ) -> None:
        while not events.empty():
            _, rolls = reporter.apply(events.get_nowait())
            for roll in rolls:
                await self._record_roll(request, roll)

    async def _record_roll(self, request: LiveSessionRequest, roll: ContractRoll) -> None:
        came_from = roll.from_contract
        async with self._sessions.begin() as session:
            await live_sessions.record_roll(
                session,
                ContractRollEvent(
                    workspace_id=request.workspace_id,
                    session_id=request.session_id,
                    symbol=roll.symbol,
                    from_instrument_id=None if came_from is None else came_from.instrument_id,
                    from_symbol=None if came_from is None else came_from.symbol,
                    to_instrument_id=roll.to_contract.instrument_id,
                    to_symbol=roll.to_contract.symbol,
                    reason=roll.reason,
                    ts_event=roll.ts_event,
                ),
            )

    async def _send(self, report: LiveReport) -> None:
        stamped = replace(report, reported_at=datetime.now(UTC))
        workflow_id = activity.info().workflow_id
        assert workflow_id is not None  # a workflow's activity, never a standalone one
        handle = self._client.get_workflow_handle(workflow_id)
        try:
            await handle.signal(LiveIngestionSession.report, stamped)
        except RPCError:
            activity.logger.warning("the session's status could not be reported", exc_info=True)


def _final(reporter: _Reporter, summary: IngestSummary) -> LiveReport:
    return replace(
        reporter.report,
        connection="closed",
        events_received=summary.received,
        records_written=summary.written,
        duplicates_dropped=summary.duplicates,
        checkpoint=checkpoint_view(summary.checkpoint),
    )
