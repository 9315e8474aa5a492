"""Finding the workspace a request names by its slug."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.problems import WorkspaceNotFoundError
from qmachina.store import repository as repo
from qmachina.store.models import Workspace


async def find_workspace(sessions: async_sessionmaker[AsyncSession], slug: str) -> Workspace:
    """The workspace with this slug, or :class:`WorkspaceNotFoundError` (a 404)."""
    async with sessions() as session:
        workspace = await repo.workspace_by_slug(session, slug)
    if workspace is None:
        raise WorkspaceNotFoundError(slug)
    return workspace
