"""What the promotion routes do: start a Promotion workflow for an alias, read its status, and
pass an editor's decision to it as an update (whose validator has the last word)."""

from __future__ import annotations

from temporalio.client import (
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.access import WorkspaceAccess
from api.dependencies import AppState
from api.jobs_service import sweep_roots
from api.problems import (
    PromotionConflictError,
    PromotionNotFoundError,
    TemporalUnavailableError,
)
from api.promotion_models import DecisionBody, PromotionDecision, PromotionStart, PromotionView
from qmachina.store import serving_registry as registry
from qmachina.temporal_names import (
    PROMOTION_JOB_KIND,
    PROMOTION_TASK_QUEUE,
    job_search_attributes,
    promotion_workflow_id,
)
from workflows.promotion import Decision, Promotion, PromotionRequest, PromotionStatus


def view_of(workflow_id: str, status: PromotionStatus) -> PromotionView:
    decision = status.decision
    return PromotionView(
        id=workflow_id,
        alias=status.alias,
        version_id=status.version_id,
        state=status.state,
        checks=status.checks,
        failures=status.failures,
        decision=None
        if decision is None
        else PromotionDecision(
            approver=decision.approver, approve=decision.approve, note=decision.note
        ),
        previous_version_id=status.previous_version_id,
    )


async def start_promotion(
    state: AppState, access: WorkspaceAccess, start: PromotionStart
) -> PromotionView:
    """Start the alias's promotion of the version; one at a time per alias."""
    workspace = access.workspace
    async with state.sessions() as session:
        version = await registry.find_version(session, workspace.id, start.version)
    roots = sweep_roots(state.settings)
    request = PromotionRequest(
        workspace_id=workspace.id,
        alias=start.alias,
        version_id=version.version_id,
        actor=access.principal.subject,
        reason=start.reason,
        configs_root=str(roots.configs),
        data_root=str(roots.data),
        thresholds=dict(start.thresholds),
        require_approval=start.require_approval,
    )
    workflow_id = promotion_workflow_id(workspace.id, start.alias)
    try:
        handle = await state.temporal.start_workflow(
            Promotion.run,
            request,
            id=workflow_id,
            task_queue=PROMOTION_TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=job_search_attributes(
                workspace.id, PROMOTION_JOB_KIND, version.version_id
            ),
        )
    except WorkflowAlreadyStartedError:
        raise PromotionConflictError(
            f"a promotion of serving alias {start.alias!r} is under way: decide it or wait for it"
        ) from None
    except RPCError as error:
        raise TemporalUnavailableError(f"the promotion could not be started: {error}") from error
    return await _view(handle, start.alias)


def _handle(
    state: AppState, access: WorkspaceAccess, alias: str
) -> WorkflowHandle[Promotion, PromotionStatus]:
    return state.temporal.get_workflow_handle_for(
        Promotion.run, promotion_workflow_id(access.workspace.id, alias)
    )


async def _view(handle: WorkflowHandle[Promotion, PromotionStatus], alias: str) -> PromotionView:
    try:
        return view_of(handle.id, await handle.query(Promotion.status))
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise PromotionNotFoundError(alias) from None
        raise TemporalUnavailableError(f"the promotion could not be read: {error}") from error
    except WorkflowQueryFailedError as error:
        raise TemporalUnavailableError(f"the promotion could not be read: {error}") from error


async def promotion_status(state: AppState, access: WorkspaceAccess, alias: str) -> PromotionView:
    """The alias's latest promotion."""
    return await _view(_handle(state, access, alias), alias)


async def decide(
    state: AppState, access: WorkspaceAccess, alias: str, body: DecisionBody
) -> PromotionView:
    """Approve or refuse the alias's promotion awaiting a decision, as the caller."""
    handle = _handle(state, access, alias)
    decision = Decision(access.principal.subject, body.approve, body.note)
    try:
        status = await handle.execute_update(Promotion.decide, decision)
    except WorkflowUpdateFailedError as error:
        cause = str(error.cause) if error.cause is not None else str(error)
        raise PromotionConflictError(f"serving alias {alias!r}: {cause}") from None
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise PromotionConflictError(
                f"serving alias {alias!r} has no promotion awaiting a decision"
            ) from None
        raise TemporalUnavailableError(f"the decision could not be sent: {error}") from error
    return view_of(handle.id, status)
