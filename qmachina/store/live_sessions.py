"""Live ingestion session rows (created with their audit event, read within their workspace)
and the contract rolls their ingestion records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from qmachina.store import repository as repo
from qmachina.store.models import ContractRollEvent, LiveSession
from qmachina.store.session_rows import page_in_workspace, row_in_workspace


class LiveSessionNotFoundError(repo.StoreError, LookupError):
    """No live session with this id in the workspace."""

    def __init__(self, workspace: str, session_id: str) -> None:
        super().__init__(f"live session {session_id} not found in workspace {workspace!r}")
        self.session_id = session_id


async def create_session(
    session: AsyncSession,
    workspace_id: str,
    *,
    session_id: str,
    dataset: str,
    subscription: Mapping[str, Any],
    created_by: str,
    workflow_id: str,
) -> LiveSession:
    """A new session row and its audit event, in the caller's transaction."""
    row = LiveSession(
        id=session_id,
        workspace_id=workspace_id,
        dataset=dataset,
        subscription=dict(subscription),
        created_by=created_by,
        workflow_id=workflow_id,
    )
    session.add(row)
    await session.flush()
    await repo.write_audit(
        session,
        workspace_id,
        actor=created_by,
        action="live_session.start",
        target=session_id,
        payload={"dataset": dataset, **subscription},
    )
    return row


async def get_session(session: AsyncSession, workspace_id: str, session_id: str) -> LiveSession:
    row = await row_in_workspace(session, LiveSession, workspace_id, session_id)
    if row is None:
        raise LiveSessionNotFoundError(workspace_id, session_id)
    return row


async def list_sessions(
    session: AsyncSession, workspace_id: str, *, limit: int, offset: int
) -> tuple[list[LiveSession], int]:
    """A page of the workspace's sessions, newest first, and how many it has."""
    return await page_in_workspace(session, LiveSession, workspace_id, limit=limit, offset=offset)


async def record_roll(session: AsyncSession, roll: ContractRollEvent) -> bool:
    """Store the roll unless this session already recorded it (a retried ingestion sees the
    same roll again); whether it was new."""
    found = await session.scalar(
        sa.select(ContractRollEvent.id).where(
            ContractRollEvent.session_id == roll.session_id,
            ContractRollEvent.ts_event == roll.ts_event,
            ContractRollEvent.to_instrument_id == roll.to_instrument_id,
        )
    )
    if found is not None:
        return False
    session.add(roll)
    await session.flush()
    return True


async def rolls_of(
    session: AsyncSession, workspace_id: str, session_id: str
) -> list[ContractRollEvent]:
    """The session's rolls in market-time order."""
    rows = await session.scalars(
        sa.select(ContractRollEvent)
        .where(
            ContractRollEvent.workspace_id == workspace_id,
            ContractRollEvent.session_id == session_id,
        )
        .order_by(ContractRollEvent.ts_event, ContractRollEvent.id)
    )
    return list(rows)
