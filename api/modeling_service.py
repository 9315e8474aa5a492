"""What the modeling routes do: open a session (its row, audit event and workflow), read it,
and pass each change to its workflow as an update.

The checks that need files run here, before an update is sent: a section's references and data
(the spec chain validated as a sweep would load it), the job quotas before an execution, the run
a decision names. The workflow's validators check the rest (order, payload shape, who acts),
so a refused change leaves no trace in the history or in the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from temporalio.client import (
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from api.access import WorkspaceAccess
from api.dependencies import AppState
from api.jobs_service import PROGRESS_QUERY_TIMEOUT, sweep_roots
from api.modeling_access import SessionAccess
from api.modeling_models import (
    ActionBody,
    DecisionLog,
    DecisionView,
    ExecutionView,
    ManualModelBody,
    PreviewBody,
    PromotionRecordView,
    SessionPage,
    SessionStart,
    SessionSummary,
    SessionView,
    StepCommitBody,
    StepReopenBody,
    StepView,
)
from api.problems import (
    Issue,
    ModelingConflictError,
    PermissionDeniedError,
    SpecRejectedError,
    TemporalUnavailableError,
)
from api.quotas import reserve_job_slot
from qmachina.modeling.draft import (
    SECTION_OF_STEP,
    ModelIssues,
    StepIssue,
    check_sections,
    expand_from_file,
)
from qmachina.modeling.manual import parse_manual
from qmachina.modeling.preview import GoldPreview, PreviewError, SilverPreview, preview_gold
from qmachina.modeling.preview import preview_silver as silver_preview
from qmachina.store import modeling_sessions
from qmachina.store import repository as repo
from qmachina.store.models import ModelingSession as SessionRow
from qmachina.store.models import new_id
from qmachina.temporal_names import (
    MODELING_JOB_KIND,
    MODELING_TASK_QUEUE,
    job_search_attributes,
    modeling_workflow_id,
)
from workflows.experiment_sweep import ExperimentSweep
from workflows.modeling_session import (
    DECISION_STEP,
    EDIT_PERMISSION,
    EXECUTION_STEP,
    Actor,
    ActorRequest,
    ManualCommit,
    ModelingSession,
    SessionRequest,
    SessionStatus,
    StepCommit,
    StepReopen,
)

SessionHandle = WorkflowHandle[ModelingSession, SessionStatus]


def _handle(state: AppState, row: SessionRow) -> SessionHandle:
    return state.temporal.get_workflow_handle_for(ModelingSession.run, row.workflow_id)


async def open_session(
    state: AppState, access: WorkspaceAccess, start: SessionStart
) -> SessionView:
    """Create the session's row (audited) and start its workflow; a workflow that cannot start
    takes its row back with it."""
    workspace = access.workspace
    roots = sweep_roots(state.settings)
    session_id = new_id()
    workflow_id = modeling_workflow_id(workspace.id, session_id)
    async with state.sessions.begin() as session:
        row = await modeling_sessions.create_session(
            session,
            workspace.id,
            session_id=session_id,
            title=start.title,
            created_by=access.principal.subject,
            workflow_id=workflow_id,
        )
    request = SessionRequest(
        workspace_id=workspace.id,
        session_id=session_id,
        created_by=access.principal.subject,
        configs_root=str(roots.configs),
        data_root=str(roots.data),
        lake_root=str(roots.lake),
        sessions_root=str(sessions_root(state.settings.data_dir)),
        archive_root=str(roots.archive.root),
        title=start.title,
    )
    try:
        handle = await state.temporal.start_workflow(
            ModelingSession.run,
            request,
            id=workflow_id,
            task_queue=MODELING_TASK_QUEUE,
            search_attributes=job_search_attributes(workspace.id, MODELING_JOB_KIND, session_id),
        )
    except RPCError as error:
        async with state.sessions.begin() as session:
            await session.delete(await modeling_sessions.get_session(session, workspace.id, row.id))
        raise TemporalUnavailableError(f"the session could not be started: {error}") from error
    return await _view(state, handle, row, workspace.slug)


async def sessions_page(
    state: AppState, access: WorkspaceAccess, *, limit: int, offset: int
) -> SessionPage:
    async with state.sessions() as session:
        rows, total = await modeling_sessions.list_sessions(
            session, access.workspace.id, limit=limit, offset=offset
        )
    items = [
        SessionSummary(id=r.id, title=r.title, created_by=r.created_by, created_at=r.created_at)
        for r in rows
    ]
    return SessionPage(items=items, total=total)


async def session_view(state: AppState, access: SessionAccess) -> SessionView:
    return await _view(state, _handle(state, access.session), access.session, access.workspace.slug)


async def _status(handle: SessionHandle) -> SessionStatus:
    try:
        return await handle.query(ModelingSession.status)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as error:
        raise TemporalUnavailableError(f"the session could not be read: {error}") from error


async def _view(
    state: AppState, handle: SessionHandle, row: SessionRow, workspace_slug: str
) -> SessionView:
    return await _view_of(state, await _status(handle), row, workspace_slug)


async def _view_of(
    state: AppState, status: SessionStatus, row: SessionRow, workspace_slug: str
) -> SessionView:
    execution = status.execution
    progress: dict[str, Any] | None = None
    if execution is not None and execution.state == "running" and execution.sweep_workflow_id:
        sweep = state.temporal.get_workflow_handle_for(
            ExperimentSweep.run, execution.sweep_workflow_id
        )
        try:
            progress = asdict(
                await sweep.query(ExperimentSweep.progress, rpc_timeout=PROGRESS_QUERY_TIMEOUT)
            )
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
            progress = None  # the sweep is between workers: its progress shows again shortly
    promotion = status.promotion
    return SessionView(
        id=row.id,
        workspace=workspace_slug,
        title=row.title,
        created_by=row.created_by,
        created_at=row.created_at,
        state=status.state,
        steps=[StepView.model_validate(asdict(step)) for step in status.steps],
        next_step=status.next_step,
        execution=None
        if execution is None
        else ExecutionView(
            revision=execution.revision,
            state=execution.state,
            job_id=execution.job_id,
            error=execution.error,
            points_recorded=execution.points_recorded,
            points_failed=execution.points_failed,
            progress=progress,
        ),
        promotion=None
        if promotion is None
        else PromotionRecordView(
            alias=promotion.alias,
            version_id=promotion.version_id,
            state=promotion.state,
            failures=list(promotion.failures),
        ),
        decisions=status.decisions,
    )


def _actor(access: SessionAccess, actor_type: str = "user") -> Actor:
    # The route's permission checked ``can_mutate`` on the session before this is built.
    return Actor(
        access.principal.subject,
        "advisor" if actor_type == "advisor" else "user",
        [EDIT_PERMISSION],
    )


def _issues(issues: list[StepIssue], prefix: str = "payload") -> list[Issue]:
    return [
        Issue(
            field=f"{prefix}.{issue.field}" if issue.field else prefix,
            message=issue.message,
            line=issue.line,
        )
        for issue in issues
    ]


async def _update(state: AppState, access: SessionAccess, call: Any, argument: Any) -> SessionView:
    """Send one update; its validator's refusal becomes the matching problem."""
    handle = _handle(state, access.session)
    try:
        status: SessionStatus = await handle.execute_update(call, argument)
    except WorkflowUpdateFailedError as error:
        raise _refusal(access, error) from None
    except RPCError as error:
        raise TemporalUnavailableError(f"the change could not be sent: {error}") from error
    return await _view_of(state, status, access.session, access.workspace.slug)


def _refusal(access: SessionAccess, error: WorkflowUpdateFailedError) -> Exception:
    cause = error.cause
    message = str(cause) if cause is not None else str(error)
    if isinstance(cause, ApplicationError):
        if cause.type == "PayloadInvalid":
            found = cause.details[0] if cause.details else []
            issues = [
                Issue(
                    field=f"payload.{d['field']}" if d["field"] else "payload", message=d["message"]
                )
                for d in found
            ] or [Issue(field="payload", message=message)]
            return SpecRejectedError(issues, what="step payload")
        if cause.type == "NotAllowed":
            return PermissionDeniedError(
                access.principal.subject, message, f"modeling session {access.session.id}"
            )
    return ModelingConflictError(f"modeling session {access.session.id}: {message}")


async def commit_step(
    state: AppState, access: SessionAccess, step: int, body: StepCommitBody
) -> SessionView:
    roots = sweep_roots(state.settings)
    payload: dict[str, Any] = dict(body.payload)
    if step in SECTION_OF_STEP:
        try:
            payload = await asyncio.to_thread(expand_from_file, step, payload, roots.configs)
        except ModelIssues as error:
            raise SpecRejectedError(_issues(error.issues), what="step payload") from None
        status = await _status(_handle(state, access.session))
        sections = _committed_sections(status, before=step)
        # Out of order, the chain cannot be checked: the workflow refuses the commit itself.
        if len(sections) == step - 1:
            sections[SECTION_OF_STEP[step]] = payload
            found = await asyncio.to_thread(
                check_sections, sections, configs_root=roots.configs, data_root=roots.data
            )
            own = [issue for issue in found if issue.step == step]
            if own:
                raise SpecRejectedError(_issues(own), what="step payload")
    elif step == EXECUTION_STEP:
        async with state.sessions() as session:
            await reserve_job_slot(session, access.workspace)
            await session.rollback()  # a check only: the execution's activity takes the slot
    elif step == DECISION_STEP:
        await _check_decision(state, access, payload)
    commit = StepCommit(step, payload, _actor(access, body.actor_type))
    view = await _update(state, access, ModelingSession.commit, commit)
    await _audit(state, access, "modeling_session.commit", {"step": step})
    return view


def _committed_sections(status: SessionStatus, *, before: int) -> dict[str, Mapping[str, Any]]:
    return {
        SECTION_OF_STEP[view.step]: view.payload
        for view in status.steps
        if view.step < before and view.step in SECTION_OF_STEP and view.payload is not None
    }


async def _check_decision(
    state: AppState, access: SessionAccess, payload: Mapping[str, Any]
) -> None:
    """A decision naming a run must name a succeeded run of the session's sweep."""
    point_hash = payload.get("point_hash")
    if not isinstance(point_hash, str):
        return  # absent (the best run) or malformed: the workflow's validator says which
    status = await _status(_handle(state, access.session))
    execution = status.execution
    if execution is None or not execution.job_id:
        return
    async with state.sessions() as session:
        try:
            run = await repo.get_run(session, access.workspace.id, execution.job_id, point_hash)
        except repo.StoreError:
            run = None
    if run is None or run.status != "succeeded":
        raise SpecRejectedError(
            [
                Issue(
                    field="payload.point_hash",
                    message=f"no succeeded run {point_hash} in experiment job {execution.job_id}",
                )
            ],
            what="step payload",
        )


async def reopen_step(
    state: AppState, access: SessionAccess, step: int, body: StepReopenBody
) -> SessionView:
    reopen = StepReopen(step, _actor(access), body.reason)
    view = await _update(state, access, ModelingSession.reopen, reopen)
    await _audit(state, access, "modeling_session.reopen", {"step": step, "reason": body.reason})
    return view


async def commit_manual(
    state: AppState, access: SessionAccess, body: ManualModelBody
) -> SessionView:
    roots = sweep_roots(state.settings)
    try:
        manual = await asyncio.to_thread(
            parse_manual, body.yaml, configs_root=roots.configs, data_root=roots.data
        )
    except ModelIssues as error:
        raise SpecRejectedError(
            [
                Issue(
                    field=".".join(
                        part
                        for part in ("yaml", SECTION_OF_STEP.get(issue.step, ""), issue.field)
                        if part
                    ),
                    message=issue.message,
                    line=issue.line,
                )
                for issue in error.issues
            ],
            what="model",
        ) from None
    commit = ManualCommit(manual.sections, _actor(access, body.actor_type))
    view = await _update(state, access, ModelingSession.commit_manual, commit)
    await _audit(state, access, "modeling_session.manual", {})
    return view


async def cancel_execution(state: AppState, access: SessionAccess, body: ActionBody) -> SessionView:
    view = await _update(
        state, access, ModelingSession.cancel_execution, ActorRequest(_actor(access), body.reason)
    )
    await _audit(state, access, "modeling_session.cancel", {"reason": body.reason})
    return view


async def promote(state: AppState, access: SessionAccess, body: ActionBody) -> SessionView:
    view = await _update(
        state, access, ModelingSession.promote, ActorRequest(_actor(access), body.reason)
    )
    await _audit(state, access, "modeling_session.promote", {"reason": body.reason})
    return view


async def decisions(state: AppState, access: SessionAccess) -> DecisionLog:
    handle = _handle(state, access.session)
    try:
        entries = await handle.query(ModelingSession.decisions)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as error:
        raise TemporalUnavailableError(f"the session could not be read: {error}") from error
    return DecisionLog(entries=[DecisionView.model_validate(asdict(entry)) for entry in entries])


async def _section_for_preview(
    state: AppState, access: SessionAccess, given: dict[str, Any] | None, step: int
) -> dict[str, Any]:
    roots = sweep_roots(state.settings)
    if given is not None:
        try:
            return await asyncio.to_thread(expand_from_file, step, given, roots.configs)
        except ModelIssues as error:
            raise SpecRejectedError(
                _issues(error.issues, SECTION_OF_STEP[step]), what="preview"
            ) from None
    status = await _status(_handle(state, access.session))
    committed = status.steps[step - 1].payload
    if committed is None:
        raise SpecRejectedError(
            [
                Issue(
                    field=SECTION_OF_STEP[step],
                    message=f"step {step} is not committed: give the section to preview",
                )
            ],
            what="preview",
        )
    return committed


async def preview_silver(
    state: AppState, access: SessionAccess, body: PreviewBody
) -> SilverPreview:
    roots = sweep_roots(state.settings)
    pipeline = await _section_for_preview(state, access, body.pipeline, 1)
    try:
        return await asyncio.to_thread(
            silver_preview,
            pipeline,
            configs_root=roots.configs,
            data_root=roots.data,
            lake_root=roots.lake,
            samples=body.samples,
        )
    except PreviewError as error:
        raise SpecRejectedError(
            [Issue(field="pipeline", message=str(error))], what="preview"
        ) from None


async def preview_gold_outputs(
    state: AppState, access: SessionAccess, body: PreviewBody
) -> GoldPreview:
    roots = sweep_roots(state.settings)
    pipeline = await _section_for_preview(state, access, body.pipeline, 1)
    gold = await _section_for_preview(state, access, body.gold, 2)
    try:
        return await asyncio.to_thread(
            preview_gold,
            pipeline,
            gold,
            configs_root=roots.configs,
            data_root=roots.data,
            lake_root=roots.lake,
            max_bins=body.max_bins,
        )
    except PreviewError as error:
        raise SpecRejectedError([Issue(field="gold", message=str(error))], what="preview") from None


async def _audit(
    state: AppState, access: SessionAccess, action: str, payload: dict[str, Any]
) -> None:
    async with state.sessions.begin() as session:
        await repo.write_audit(
            session,
            access.workspace.id,
            actor=access.principal.subject,
            action=action,
            target=access.session.id,
            payload=payload,
        )


def sessions_root(data_dir: Path) -> Path:
    """Where sessions write their executions' spec chains."""
    return data_dir.resolve() / "modeling"
