"""What the live-session routes do: start a session (its row, audit event and workflow), read
its status with the rolls it recorded, and ask it to stop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio.client import (
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.service import RPCError, RPCStatusCode

from api.access import WorkspaceAccess
from api.dependencies import AppState
from api.live_access import LiveAccess
from api.live_models import (
    InstrumentCheckpointView,
    LiveSessionPage,
    LiveSessionStart,
    LiveSessionSummary,
    LiveSessionView,
    RollView,
    StopBody,
)
from api.problems import TemporalUnavailableError
from qmachina.store import live_sessions
from qmachina.store import repository as repo
from qmachina.store.models import LiveSession, new_id
from qmachina.temporal_names import (
    LIVE_JOB_KIND,
    LIVE_TASK_QUEUE,
    job_search_attributes,
    live_workflow_id,
)
from workflows.live_session import (
    CalendarStep,
    LiveIngestionSession,
    LiveSessionRequest,
    LiveStatus,
    RollCalendar,
    StopRequest,
)

LiveHandle = WorkflowHandle[LiveIngestionSession, LiveStatus]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _handle(state: AppState, row: LiveSession) -> LiveHandle:
    return state.temporal.get_workflow_handle_for(LiveIngestionSession.run, row.workflow_id)


async def start_session(
    state: AppState, access: WorkspaceAccess, start: LiveSessionStart
) -> LiveSessionView:
    """Create the row (audited) and start the workflow; a workflow that cannot start takes its
    row back with it."""
    workspace = access.workspace
    settings = state.settings
    session_id = new_id()
    workflow_id = live_workflow_id(workspace.id, session_id)
    subscription = {
        "symbols": list(start.symbols),
        "stype_in": start.stype_in,
        "schema": "mbo",
        "start": None if start.start is None else start.start.isoformat(),
        "roll_policy": start.roll_policy,
        "roll_calendar": None
        if start.roll_calendar is None
        else start.roll_calendar.model_dump(mode="json"),
    }
    async with state.sessions.begin() as session:
        row = await live_sessions.create_session(
            session,
            workspace.id,
            session_id=session_id,
            dataset=start.dataset,
            subscription=subscription,
            created_by=access.principal.subject,
            workflow_id=workflow_id,
        )
    request = LiveSessionRequest(
        workspace_id=workspace.id,
        session_id=session_id,
        created_by=access.principal.subject,
        dataset=start.dataset,
        symbols=list(start.symbols),
        bronze_root=str(bronze_root(state)),
        gateway_host=settings.databento_live_gateway,
        gateway_port=settings.databento_live_port,
        stype_in=start.stype_in,
        start=None if start.start is None else epoch_ns(start.start),
        watchdog_seconds=start.watchdog_seconds,
        report_every_seconds=start.report_every_seconds,
        roll_calendar=None
        if start.roll_calendar is None
        else RollCalendar(
            start.roll_calendar.name,
            [CalendarStep(epoch_ns(step.at), step.symbol) for step in start.roll_calendar.schedule],
        ),
    )
    try:
        handle = await state.temporal.start_workflow(
            LiveIngestionSession.run,
            request,
            id=workflow_id,
            task_queue=LIVE_TASK_QUEUE,
            search_attributes=job_search_attributes(workspace.id, LIVE_JOB_KIND, session_id),
        )
    except RPCError as error:
        async with state.sessions.begin() as session:
            await session.delete(await live_sessions.get_session(session, workspace.id, row.id))
        raise TemporalUnavailableError(f"the session could not be started: {error}") from error
    return await _view(state, handle, row, workspace.slug)


def epoch_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, exactly (a time without a zone is UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1) * 1_000


def bronze_root(state: AppState) -> Path:
    """Where sessions write their bronze DBN files."""
    return state.settings.lake_dir.resolve() / "bronze" / "live"


async def sessions_page(
    state: AppState, access: WorkspaceAccess, *, limit: int, offset: int
) -> LiveSessionPage:
    async with state.sessions() as session:
        rows, total = await live_sessions.list_sessions(
            session, access.workspace.id, limit=limit, offset=offset
        )
    items = [
        LiveSessionSummary(
            id=row.id,
            dataset=row.dataset,
            symbols=list(row.subscription["symbols"]),
            created_by=row.created_by,
            created_at=row.created_at,
        )
        for row in rows
    ]
    return LiveSessionPage(items=items, total=total)


async def session_view(state: AppState, access: LiveAccess) -> LiveSessionView:
    return await _view(state, _handle(state, access.session), access.session, access.workspace.slug)


async def stop_session(state: AppState, access: LiveAccess, body: StopBody) -> LiveSessionView:
    """Ask the session to drain and stop (audited); a session already ended stays as it is."""
    handle = _handle(state, access.session)
    try:
        await handle.signal(
            LiveIngestionSession.stop, StopRequest(access.principal.subject, body.reason)
        )
    except RPCError as error:
        # An ended session's workflow takes no signal: it is already as a stop would leave it.
        if error.status != RPCStatusCode.NOT_FOUND:
            raise TemporalUnavailableError(f"the stop could not be sent: {error}") from error
    async with state.sessions.begin() as session:
        await repo.write_audit(
            session,
            access.workspace.id,
            actor=access.principal.subject,
            action="live_session.stop",
            target=access.session.id,
            payload={"reason": body.reason},
        )
    return await _view(state, handle, access.session, access.workspace.slug)


async def _view(
    state: AppState, handle: LiveHandle, row: LiveSession, workspace_slug: str
) -> LiveSessionView:
    try:
        status = await handle.query(LiveIngestionSession.status)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as error:
        raise TemporalUnavailableError(f"the session could not be read: {error}") from error
    async with state.sessions() as session:
        rolls = await live_sessions.rolls_of(session, row.workspace_id, row.id)
    report = status.report
    return LiveSessionView(
        id=row.id,
        workspace=workspace_slug,
        dataset=row.dataset,
        symbols=list(row.subscription["symbols"]),
        stype_in=str(row.subscription["stype_in"]),
        roll_policy=row.subscription.get("roll_policy", "mapping"),
        roll_calendar=row.subscription.get("roll_calendar"),
        created_by=row.created_by,
        created_at=row.created_at,
        state=status.state,
        connection=report.connection,
        events_received=report.events_received,
        records_written=report.records_written,
        duplicates_dropped=report.duplicates_dropped,
        reconnects=report.reconnects,
        lag_ns=report.lag_ns,
        checkpoint=[
            InstrumentCheckpointView(
                instrument_id=c.instrument_id, ts_event=c.ts_event, taken_at_ts=c.taken_at_ts
            )
            for c in report.checkpoint
        ],
        contracts=dict(report.contracts),
        rolls=[
            RollView(
                symbol=r.symbol,
                from_instrument_id=r.from_instrument_id,
                from_symbol=r.from_symbol,
                to_instrument_id=r.to_instrument_id,
                to_symbol=r.to_symbol,
                reason=r.reason,
                ts_event=r.ts_event,
            )
            for r in rolls
        ],
        last_error=report.last_error,
        error=status.error,
        stopped_by=status.stopped_by,
    )
