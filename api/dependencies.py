"""What routes depend on: the process's settings, Temporal client and store sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from qmachina.settings import Settings


@dataclass(frozen=True)
class AppState:
    """Held on ``app.state.qmachina`` for the application's lifetime."""

    settings: Settings
    temporal: Client
    sessions: async_sessionmaker[AsyncSession]


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.qmachina
    return state


async def store_session(
    state: Annotated[AppState, Depends(app_state)],
) -> AsyncIterator[AsyncSession]:
    """One session per request; the route commits what it writes."""
    async with state.sessions() as session:
        yield session


State = Annotated[AppState, Depends(app_state)]
StoreSession = Annotated[AsyncSession, Depends(store_session)]
