"""``/v1/ingestion/live/sessions``: live ingestion sessions, started and stopped explicitly.

Viewers read a session's status (state, connection, counts, checkpoint, lag, reconnects,
contracts and rolls); editors start and stop sessions. The gateway and the API key are the
deployment's, never a request's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status

from api import live_service
from api.access import InWorkspace, WorkspaceAccess
from api.bounds import Limit, Offset
from api.dependencies import State
from api.live_access import LiveAccess, OnLiveSession
from api.live_models import LIVE_PATH, LiveSessionPage, LiveSessionStart, LiveSessionView, StopBody
from api.problems import problem_responses

router = APIRouter(prefix=LIVE_PATH, tags=["ingestion"])

Starter = Annotated[WorkspaceAccess, Depends(InWorkspace("can_mutate"))]
Lister = Annotated[WorkspaceAccess, Depends(InWorkspace("can_read"))]
Reader = Annotated[LiveAccess, Depends(OnLiveSession("can_read"))]
Editor = Annotated[LiveAccess, Depends(OnLiveSession("can_mutate"))]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=LiveSessionView,
    responses=problem_responses(403, 404, 422),
)
async def start_session(body: LiveSessionStart, state: State, access: Starter) -> LiveSessionView:
    """Start a session: it connects, writes bronze and reconnects on faults until stopped."""
    return await live_service.start_session(state, access, body)


@router.get("", response_model=LiveSessionPage, responses=problem_responses(404, 422))
async def list_sessions(
    state: State, access: Lister, limit: Limit = 50, offset: Offset = 0
) -> LiveSessionPage:
    """The workspace's live sessions, newest first."""
    return await live_service.sessions_page(state, access, limit=limit, offset=offset)


@router.get("/{session_id}", response_model=LiveSessionView, responses=problem_responses(404, 422))
async def get_session(state: State, access: Reader) -> LiveSessionView:
    """The session's state, connection, counts, checkpoint, lag, reconnects and rolls."""
    return await live_service.session_view(state, access)


@router.post(
    "/{session_id}/stop",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=LiveSessionView,
    responses=problem_responses(403, 404, 422),
)
async def stop_session(body: StopBody, state: State, access: Editor) -> LiveSessionView:
    """Ask the session to drain, close and flush; it ends ``stopped``. A session already ended
    stays as it is."""
    return await live_service.stop_session(state, access, body)
