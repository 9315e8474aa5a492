"""The permission of the routes that act on one modeling session: ``relation`` on the session
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
from qmachina.store import modeling_sessions
from qmachina.store.models import ModelingSession, Workspace


@dataclass(frozen=True)
class SessionAccess:
    principal: Principal
    workspace: Workspace
    session: ModelingSession


class OnModelingSession(Permission):
    """``relation`` on the workspace's modeling session ``{session_id}``."""

    object_type = "modeling_session"

    async def __call__(
        self,
        state: State,
        principal: CurrentPrincipal,
        session_id: Annotated[str, Path(max_length=36, description="The session's id")],
        workspace: WorkspaceSlugQuery = "default",
    ) -> SessionAccess:
        acting = await workspace_access(state, principal, workspace, "can_read")
        async with state.sessions() as session:
            row = await modeling_sessions.get_session(session, acting.workspace.id, session_id)
        await require_relation(
            state,
            principal,
            self.relation,
            resource_object("modeling_session", row.id),
            modeling_sessions.SessionNotFoundError(acting.workspace.slug, session_id),
            f"modeling session {row.id}",
        )
        return SessionAccess(principal, acting.workspace, row)
