"""``/v1/workspaces``: create a workspace, list the caller's, read one with its quotas, manage
its members and quotas, and read its audit trail.

Roles and what they may do are ``qmachina/authz/model.fga``'s: viewers read, admins manage
members and quotas and read the audit trail, and only owners grant or take away the owner role.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response, status

from api import workspace_service
from api.access import AnyUser, OnWorkspace, WorkspaceAccess
from api.bounds import Limit, Offset
from api.dependencies import State
from api.problems import problem_responses
from api.workspace_models import (
    WORKSPACES_PATH,
    AuditEvent,
    AuditPage,
    Member,
    MemberChange,
    MemberList,
    MemberRole,
    QuotaPatch,
    QuotaState,
    Workspace,
    WorkspaceCreate,
    WorkspaceDetail,
    WorkspaceList,
    WorkspaceQuotas,
)
from qmachina.auth import Principal
from qmachina.store import models as store

router = APIRouter(prefix=WORKSPACES_PATH, tags=["workspaces"])

Caller = Annotated[Principal, Depends(AnyUser())]
Reader = Annotated[WorkspaceAccess, Depends(OnWorkspace("can_read"))]
MemberManager = Annotated[WorkspaceAccess, Depends(OnWorkspace("can_manage_members"))]
QuotaManager = Annotated[WorkspaceAccess, Depends(OnWorkspace("can_manage_quotas"))]
AuditReader = Annotated[WorkspaceAccess, Depends(OnWorkspace("can_read_audit"))]
Subject = Annotated[
    str, Path(min_length=1, max_length=200, description="The member's OIDC subject")
]


def _workspace(workspace: store.Workspace, role: str | None) -> Workspace:
    return Workspace.model_validate(
        {
            "id": workspace.id,
            "slug": workspace.slug,
            "name": workspace.name,
            "created_at": workspace.created_at,
            "role": role,
        }
    )


def _quotas(workspace: store.Workspace, usage: workspace_service.QuotaUsage) -> WorkspaceQuotas:
    return WorkspaceQuotas(
        max_concurrent_jobs=QuotaState(
            limit=workspace.max_concurrent_jobs, current=usage.active_jobs
        ),
        max_streams=QuotaState(limit=workspace.max_streams, current=usage.streams),
        max_storage_bytes=QuotaState(
            limit=workspace.max_storage_bytes, current=usage.storage_bytes
        ),
        max_concurrent_chunks=workspace.max_concurrent_chunks,
    )


def _member(member: store.WorkspaceMember) -> Member:
    return Member.model_validate(
        {
            "subject": member.subject,
            "role": member.role,
            "created_at": member.created_at,
            "updated_at": member.updated_at,
        }
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Workspace,
    responses=problem_responses(409, 422),
)
async def create_workspace(
    creation: WorkspaceCreate, state: State, principal: Caller, response: Response
) -> Workspace:
    """Create a workspace; the caller becomes its owner. 409 when the slug is taken."""
    workspace = await workspace_service.create_workspace(
        state, principal, creation.slug, creation.name
    )
    response.headers["Location"] = f"{WORKSPACES_PATH}/{workspace.slug}"
    return _workspace(workspace, workspace_service.OWNER)


@router.get("", response_model=WorkspaceList)
async def list_workspaces(state: State, principal: Caller) -> WorkspaceList:
    """The workspaces the caller may read, by slug, with the caller's role in each."""
    found = await workspace_service.readable_workspaces(state, principal)
    return WorkspaceList(workspaces=[_workspace(workspace, role) for workspace, role in found])


@router.get("/{workspace}", response_model=WorkspaceDetail, responses=problem_responses(404, 422))
async def get_workspace(state: State, access: Reader) -> WorkspaceDetail:
    """The workspace, the caller's role, and its quotas with their current use."""
    seen = await workspace_service.workspace_state(state, access)
    return WorkspaceDetail(
        **_workspace(seen.workspace, seen.role).model_dump(),
        quotas=_quotas(seen.workspace, seen.usage),
    )


@router.get(
    "/{workspace}/members", response_model=MemberList, responses=problem_responses(404, 422)
)
async def list_members(state: State, access: Reader) -> MemberList:
    """The workspace's members and their roles, by subject."""
    found = await workspace_service.members(state.sessions, access.workspace)
    return MemberList(members=[_member(member) for member in found])


@router.put(
    "/{workspace}/members/{subject:path}",
    response_model=MemberChange,
    responses=problem_responses(403, 404, 409, 422),
)
async def set_member(
    subject: Subject, body: MemberRole, state: State, access: MemberManager
) -> MemberChange:
    """Give ``subject`` a role, adding them to the workspace if needed. Needs
    ``can_manage_members`` (admins and owners); granting, changing or taking away the owner
    role also needs ``can_manage_owners`` (owners). 409 when it would demote the last owner."""
    member, previous = await workspace_service.set_member(state, access, subject, body.role)
    return MemberChange.model_validate(_member(member).model_dump() | {"previous": previous})


@router.delete(
    "/{workspace}/members/{subject:path}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=problem_responses(403, 404, 409, 422),
)
async def remove_member(subject: Subject, state: State, access: MemberManager) -> None:
    """Take ``subject`` out of the workspace. Needs ``can_manage_members``; removing an owner
    also needs ``can_manage_owners``. 404 for a non-member, 409 for the last owner."""
    await workspace_service.remove_member(state, access, subject)


@router.get(
    "/{workspace}/quotas", response_model=WorkspaceQuotas, responses=problem_responses(404, 422)
)
async def get_quotas(state: State, access: Reader) -> WorkspaceQuotas:
    """The workspace's quotas with their current use."""
    seen = await workspace_service.workspace_state(state, access)
    return _quotas(seen.workspace, seen.usage)


@router.patch(
    "/{workspace}/quotas",
    response_model=WorkspaceQuotas,
    responses=problem_responses(403, 404, 422),
)
async def patch_quotas(body: QuotaPatch, state: State, access: QuotaManager) -> WorkspaceQuotas:
    """Change the quotas named in the body (null: unlimited); the others keep their value.
    Needs ``can_manage_quotas`` (admins and owners). Audited with each change's old and new
    value. A quota lowered below the current use stops new work, not work already running."""
    limits = body.model_dump(include=body.model_fields_set)
    workspace, usage = await workspace_service.set_quotas(state, access, limits)
    return _quotas(workspace, usage)


@router.get(
    "/{workspace}/audit", response_model=AuditPage, responses=problem_responses(403, 404, 422)
)
async def read_audit(
    state: State,
    access: AuditReader,
    limit: Limit = 100,
    offset: Offset = 0,
    action: Annotated[
        str | None, Query(min_length=1, description="Only this action (`workspace.quotas`)")
    ] = None,
    actor: Annotated[str | None, Query(min_length=1, description="Only this actor")] = None,
) -> AuditPage:
    """The workspace's audit trail, newest first, filtered by action and actor. Needs
    ``can_read_audit`` (admins and owners)."""
    query = workspace_service.AuditQuery(limit, offset, action, actor)
    events, total = await workspace_service.audit_events(state.sessions, access.workspace, query)
    return AuditPage(
        total=total,
        limit=limit,
        offset=offset,
        events=[
            AuditEvent.model_validate(
                {
                    "id": event.id,
                    "actor": event.actor,
                    "action": event.action,
                    "target": event.target,
                    "payload": event.payload,
                    "created_at": event.created_at,
                }
            )
            for event in events
        ],
    )
