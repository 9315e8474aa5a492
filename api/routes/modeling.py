"""``/v1/modeling/sessions``: Create-a-Model sessions, six gated steps from data to promotion.

Viewers read a session and its decision log; editors (``can_mutate`` on the session) commit,
reopen, cancel and promote. The session's workflow has the last word on every change: a commit
out of order or with an invalid payload is refused before anything is written (409, 422).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, status

from api import modeling_service
from api.access import InWorkspace, WorkspaceAccess
from api.bounds import Limit, Offset
from api.dependencies import State
from api.modeling_access import OnModelingSession, SessionAccess
from api.modeling_models import (
    MODELING_PATH,
    ActionBody,
    DecisionLog,
    ManualModelBody,
    PreviewBody,
    SessionPage,
    SessionStart,
    SessionView,
    StepCommitBody,
    StepReopenBody,
)
from api.problems import problem_responses
from qmachina.modeling.preview import GoldPreview, SilverPreview

router = APIRouter(prefix=MODELING_PATH, tags=["modeling"])

Creator = Annotated[WorkspaceAccess, Depends(InWorkspace("can_mutate"))]
Lister = Annotated[WorkspaceAccess, Depends(InWorkspace("can_read"))]
Reader = Annotated[SessionAccess, Depends(OnModelingSession("can_read"))]
Editor = Annotated[SessionAccess, Depends(OnModelingSession("can_mutate"))]
StepNumber = Annotated[int, Path(ge=1, le=6, description="The step: 1 dataset ... 6 decision")]
CHANGE_RESPONSES = problem_responses(403, 404, 409, 422)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionView,
    responses=problem_responses(403, 404, 422),
)
async def open_session(body: SessionStart, state: State, access: Creator) -> SessionView:
    """Open a session; step 1 (dataset) is next."""
    return await modeling_service.open_session(state, access, body)


@router.get("", response_model=SessionPage, responses=problem_responses(404, 422))
async def list_sessions(
    state: State, access: Lister, limit: Limit = 50, offset: Offset = 0
) -> SessionPage:
    """The workspace's sessions, newest first."""
    return await modeling_service.sessions_page(state, access, limit=limit, offset=offset)


@router.get("/{session_id}", response_model=SessionView, responses=problem_responses(404, 422))
async def get_session(state: State, access: Reader) -> SessionView:
    """Every step's state and payload, what is next, the execution with its live progress, the
    promotion."""
    return await modeling_service.session_view(state, access)


@router.post(
    "/{session_id}/steps/{step}/commit",
    response_model=SessionView,
    responses=problem_responses(403, 404, 409, 422, 429),
)
async def commit_step(
    step: StepNumber, body: StepCommitBody, state: State, access: Editor
) -> SessionView:
    """Commit the next step. 409 out of order; 422 with every issue's field path for a payload
    that does not validate; committing step 5 starts the sweep (429 at the job quota)."""
    return await modeling_service.commit_step(state, access, step, body)


@router.post(
    "/{session_id}/steps/{step}/reopen", response_model=SessionView, responses=CHANGE_RESPONSES
)
async def reopen_step(
    step: StepNumber, body: StepReopenBody, state: State, access: Editor
) -> SessionView:
    """Take a committed step back; every step after it is invalidated (the decision log says
    which)."""
    return await modeling_service.reopen_step(state, access, step, body)


@router.post("/{session_id}/manual", response_model=SessionView, responses=CHANGE_RESPONSES)
async def commit_manual(body: ManualModelBody, state: State, access: Editor) -> SessionView:
    """Fill steps 1-4 from a whole model in YAML; each issue names its line."""
    return await modeling_service.commit_manual(state, access, body)


@router.post(
    "/{session_id}/execution/cancel", response_model=SessionView, responses=CHANGE_RESPONSES
)
async def cancel_execution(body: ActionBody, state: State, access: Editor) -> SessionView:
    """Cancel the running sweep; step 5 opens again."""
    return await modeling_service.cancel_execution(state, access, body)


@router.post("/{session_id}/promote", response_model=SessionView, responses=CHANGE_RESPONSES)
async def promote(body: ActionBody, state: State, access: Editor) -> SessionView:
    """Promote a completed session: its chosen run is registered and put behind the decided
    alias through the Promotion workflow; the session ends ``promoted``."""
    return await modeling_service.promote(state, access, body)


@router.get(
    "/{session_id}/decisions",
    response_model=DecisionLog,
    responses=problem_responses(404, 422),
)
async def decisions(state: State, access: Reader) -> DecisionLog:
    """The decision log: every commit, reopening, cancellation and outcome, oldest first."""
    return await modeling_service.decisions(state, access)


@router.post(
    "/{session_id}/preview/silver",
    response_model=SilverPreview,
    responses=problem_responses(404, 422),
)
async def preview_silver(body: PreviewBody, state: State, access: Reader) -> SilverPreview:
    """Sample bins of the silver of the given pipeline section (else the committed one)."""
    return await modeling_service.preview_silver(state, access, body)


@router.post(
    "/{session_id}/preview/gold", response_model=GoldPreview, responses=problem_responses(404, 422)
)
async def preview_gold(body: PreviewBody, state: State, access: Reader) -> GoldPreview:
    """Distribution statistics of every gold output over the pipeline's silver."""
    return await modeling_service.preview_gold_outputs(state, access, body)
