"""Modeling session rows: created with their audit event, read within their workspace."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from qmachina.store import repository as repo
from qmachina.store.models import ModelingSession
from qmachina.store.session_rows import page_in_workspace, row_in_workspace


class SessionNotFoundError(repo.StoreError, LookupError):
    """No modeling session with this id in the workspace."""

    def __init__(self, workspace: str, session_id: str) -> None:
        super().__init__(f"modeling session {session_id} not found in workspace {workspace!r}")
        self.session_id = session_id


async def create_session(
    session: AsyncSession,
    workspace_id: str,
    *,
    session_id: str,
    title: str,
    created_by: str,
    workflow_id: str,
) -> ModelingSession:
    """A new session row and its audit event, in the caller's transaction."""
    row = ModelingSession(
        id=session_id,
        workspace_id=workspace_id,
        title=title,
        created_by=created_by,
        workflow_id=workflow_id,
    )
    session.add(row)
    await session.flush()
    await repo.write_audit(
        session,
        workspace_id,
        actor=created_by,
        action="modeling_session.create",
        target=session_id,
        payload={"title": title, "workflow_id": workflow_id},
    )
    return row


async def get_session(session: AsyncSession, workspace_id: str, session_id: str) -> ModelingSession:
    row = await row_in_workspace(session, ModelingSession, workspace_id, session_id)
    if row is None:
        raise SessionNotFoundError(workspace_id, session_id)
    return row


async def list_sessions(
    session: AsyncSession, workspace_id: str, *, limit: int, offset: int
) -> tuple[list[ModelingSession], int]:
    """A page of the workspace's sessions, newest first, and how many it has."""
    return await page_in_workspace(
        session, ModelingSession, workspace_id, limit=limit, offset=offset
    )
