"""The permission of the routes that act on one live session: ``relation`` on the session
``{session_id}`` of the workspace named by ``?workspace=``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Path

from api.access import Permission, WorkspaceSlugQuery, require_relation, workspace_access
from api.auth import CurrentPrincipal
from api.dependencies import State
from qmachina.auth import Principal
from qmachina.authz.relationships import resource_object
from qmachina.store import live_sessions
from qmachina.store.models import LiveSession, Workspace


@dataclass(frozen=True)
class LiveAccess:
    principal: Principal
    workspace: Workspace
    session: LiveSession


class OnLiveSession(Permission):
    """``relation`` on the workspace's live session ``{session_id}``."""

    object_type = "live_session"

    async def __call__(
        self,
        state: State,
        principal: CurrentPrincipal,
        session_id: Annotated[str, Path(max_length=36, description="The session's id")],
        workspace: WorkspaceSlugQuery = "default",
    ) -> LiveAccess:
        acting = await workspace_access(state, principal, workspace, "can_read")
        async with state.sessions() as session:
            row = await live_sessions.get_session(session, acting.workspace.id, session_id)
        await require_relation(
            state,
            principal,
            self.relation,
            resource_object("live_session", row.id),
            live_sessions.LiveSessionNotFoundError(acting.workspace.slug, session_id),
            f"live session {row.id}",
        )
        return LiveAccess(principal, acting.workspace, row)
