"""What each route needs: every route but the public ones depends on one :class:`Permission`.

A permission names the relation of ``qmachina/authz/model.fga`` the caller must hold and the
object it is checked on: the workspace the request acts in (``?workspace=`` or the path), or a
resource in it. Deny by default, and no leak: an object the caller cannot read answers 404,
exactly as one that does not exist; one it can read but not act on answers 403.

``tests/test_api_access.py`` enumerates the app's routes and fails on one that declares none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Path, Query

from api.auth import CurrentPrincipal
from api.dependencies import AppState, State
from api.problems import PermissionDeniedError, WorkspaceNotFoundError
from api.workspaces import find_workspace
from qmachina.auth import Principal
from qmachina.authz.relationships import resource_object, user_object, workspace_object
from qmachina.store import governance
from qmachina.store import repository as repo
from qmachina.store.models import ExperimentJob, Workspace

WorkspaceSlugQuery = Annotated[
    str, Query(min_length=1, max_length=64, description="The slug of the workspace acted in")
]
WorkspaceSlugPath = Annotated[
    str, Path(min_length=1, max_length=64, description="The workspace's slug")
]


@dataclass(frozen=True)
class WorkspaceAccess:
    """The caller and the workspace a route acts in, the relation on it checked."""

    principal: Principal
    workspace: Workspace


@dataclass(frozen=True)
class JobAccess:
    """The caller, the workspace acted in, and the job: its own or one shared with it."""

    principal: Principal
    workspace: Workspace
    job: ExperimentJob
    owner: Workspace
    """The workspace the job belongs to: the one acted in, or the one that shared it."""


async def _allowed(state: AppState, principal: Principal, relation: str, object_: str) -> bool:
    return await state.authorizer.check(user_object(principal.subject), relation, object_)


async def require_relation(
    state: AppState,
    principal: Principal,
    relation: str,
    object_: str,
    not_found: Exception,
    target: str,
) -> None:
    """Pass if the caller holds ``relation``; else ``not_found`` if they cannot even read the
    object, a 403 if they can."""
    if await _allowed(state, principal, relation, object_):
        return
    if relation == "can_read" or not await _allowed(state, principal, "can_read", object_):
        raise not_found
    raise PermissionDeniedError(principal.subject, relation, target)


async def workspace_access(
    state: AppState, principal: Principal, slug: str, relation: str
) -> WorkspaceAccess:
    """The workspace with this slug if the caller holds ``relation`` on it."""
    workspace = await find_workspace(state.sessions, slug)
    await require_relation(
        state,
        principal,
        relation,
        workspace_object(workspace.id),
        WorkspaceNotFoundError(slug),
        f"workspace {slug!r}",
    )
    return WorkspaceAccess(principal, workspace)


class Permission:
    """A route's declared need: ``relation`` on an object of ``object_type``."""

    object_type = "workspace"

    def __init__(self, relation: str) -> None:
        self.relation = relation

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.relation!r} on {self.object_type})"


class InWorkspace(Permission):
    """``relation`` on the workspace named by ``?workspace=`` (default ``default``)."""

    async def __call__(
        self, state: State, principal: CurrentPrincipal, workspace: WorkspaceSlugQuery = "default"
    ) -> WorkspaceAccess:
        return await workspace_access(state, principal, workspace, self.relation)


class OnWorkspace(Permission):
    """``relation`` on the workspace named by the path's ``{workspace}``."""

    async def __call__(
        self, state: State, principal: CurrentPrincipal, workspace: WorkspaceSlugPath
    ) -> WorkspaceAccess:
        return await workspace_access(state, principal, workspace, self.relation)


class OnJob(Permission):
    """``relation`` on the experiment job ``{job_id}`` seen from ``?workspace=``: the
    workspace's own job or one shared with it (the caller must be able to read the workspace)."""

    object_type = "experiment_job"

    async def __call__(
        self,
        state: State,
        principal: CurrentPrincipal,
        job_id: Annotated[str, Path(description="The experiment job's id")],
        workspace: WorkspaceSlugQuery = "default",
    ) -> JobAccess:
        acting = await workspace_access(state, principal, workspace, "can_read")
        job, owner = await _visible_job(state, acting.workspace, job_id)
        await require_relation(
            state,
            principal,
            self.relation,
            resource_object("experiment_job", job.id),
            repo.JobNotFoundError(acting.workspace.id, job_id),
            f"experiment job {job.id}",
        )
        return JobAccess(principal, acting.workspace, job, owner)


async def _visible_job(
    state: AppState, workspace: Workspace, job_id: str
) -> tuple[ExperimentJob, Workspace]:
    """The workspace's job, else the job shared with it, with the workspace owning it."""
    async with state.sessions() as session:
        try:
            return await repo.get_job(session, workspace.id, job_id), workspace
        except repo.JobNotFoundError:
            share = await governance.shared_resource(
                session, workspace.id, "experiment_job", job_id
            )
            if share is None:
                raise
            owner = await governance.workspaces_by_id(session, [share.workspace_id])
            return await repo.get_job(session, share.workspace_id, job_id), owner[0]


class AnyUser(Permission):
    """Any authenticated caller: for creating a workspace and listing one's own. Declared, like
    every other need, so no route is open by omission."""

    object_type = "user"

    def __init__(self) -> None:
        super().__init__("authenticated")

    async def __call__(self, principal: CurrentPrincipal) -> Principal:
        return principal
