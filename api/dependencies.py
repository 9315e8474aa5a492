"""What routes depend on: the process's settings, Temporal client and store sessions, and the
workspace a request names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from api.stream_slots import StreamSlots
from api.workspaces import find_workspace
from qmachina.authz.authorizer import Authorizer
from qmachina.settings import Settings
from qmachina.store.models import Workspace

Sessions = async_sessionmaker[AsyncSession]


@dataclass(frozen=True)
class AppState:
    """Held on ``app.state.qmachina`` for the application's lifetime."""

    settings: Settings
    temporal: Client
    sessions: Sessions
    authorizer: Authorizer
    streams: StreamSlots = field(default_factory=StreamSlots)
    """The serving streams this process has open, per workspace (``max_streams``)."""


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.qmachina
    return state


async def store_session(
    state: Annotated[AppState, Depends(app_state)],
) -> AsyncIterator[AsyncSession]:
    """One session per request; the route commits what it writes."""
    async with state.sessions() as session:
        yield session


async def current_workspace(
    state: Annotated[AppState, Depends(app_state)],
    workspace: Annotated[
        str, Query(min_length=1, max_length=64, description="The workspace's slug")
    ] = "default",
) -> Workspace:
    """The workspace named by ``?workspace=``; a 404 when there is none. It holds no session
    open, so a long response (an event stream) keeps no transaction."""
    return await find_workspace(state.sessions, workspace)


State = Annotated[AppState, Depends(app_state)]
StoreSession = Annotated[AsyncSession, Depends(store_session)]
CurrentWorkspace = Annotated[Workspace, Depends(current_workspace)]
