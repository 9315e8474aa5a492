"""What the workspace routes do: create a workspace, list the caller's, manage its members and
quotas, and page through its audit trail.

Every change commits with its audit row. The authorizer is kept in step as
:mod:`qmachina.authz.relationships` lays down: a grant is written after the store commits, a
revocation deleted before, so a failure between the two leaves at worst a stale denial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api.access import WorkspaceAccess
from api.dependencies import AppState, Sessions
from api.problems import PermissionDeniedError, WorkspaceNotFoundError
from qmachina.auth import Principal
from qmachina.authz.relationships import member_tuple, user_object, workspace_object
from qmachina.store import governance
from qmachina.store import repository as repo
from qmachina.store.models import AuditEvent, Workspace, WorkspaceMember

OWNER = "owner"


@dataclass(frozen=True)
class QuotaUsage:
    """What the workspace uses now of its quotas."""

    active_jobs: int
    storage_bytes: int
    streams: int
    """Serving streams open now in this API process (see :mod:`api.stream_slots`)."""


@dataclass(frozen=True)
class WorkspaceState:
    """A workspace as the caller sees it: their role, and the use of its quotas."""

    workspace: Workspace
    role: str | None
    usage: QuotaUsage


@dataclass(frozen=True)
class AuditQuery:
    """Which of a workspace's audit events to list."""

    limit: int
    offset: int
    action: str | None
    actor: str | None


def _member_target(subject: str) -> str:
    return f"user:{subject}"


async def _role(session: AsyncSession, workspace_id: str, subject: str) -> str | None:
    member = await governance.get_member(session, workspace_id, subject)
    return None if member is None else member.role


async def _usage(state: AppState, session: AsyncSession, workspace_id: str) -> QuotaUsage:
    return QuotaUsage(
        active_jobs=await governance.active_job_count(session, workspace_id),
        storage_bytes=await governance.storage_used(session, workspace_id),
        streams=state.streams.open_streams(workspace_id),
    )


async def create_workspace(
    state: AppState, principal: Principal, slug: str, name: str | None
) -> Workspace:
    """A new workspace owned by the caller; :class:`governance.WorkspaceExistsError` when the
    slug is taken (also when a concurrent request takes it first)."""
    try:
        async with state.sessions.begin() as session:
            workspace = await governance.create_owned_workspace(
                session, slug, name or slug, principal.subject
            )
            await repo.write_audit(
                session,
                workspace.id,
                actor=principal.subject,
                action="workspace.create",
                target=workspace_object(workspace.id),
                payload={"slug": workspace.slug, "name": workspace.name},
            )
    except IntegrityError:  # the unique slug, taken between the check and the commit
        raise governance.WorkspaceExistsError(slug) from None
    await state.authorizer.write_tuples([member_tuple(workspace.id, principal.subject, OWNER)])
    return workspace


async def readable_workspaces(
    state: AppState, principal: Principal
) -> list[tuple[Workspace, str | None]]:
    """The workspaces the authorizer lets the caller read, by slug, with the caller's role."""
    objects = await state.authorizer.list_objects(
        user_object(principal.subject), "can_read", "workspace"
    )
    ids = [object_.removeprefix("workspace:") for object_ in objects]
    async with state.sessions() as session:
        workspaces = await governance.workspaces_by_id(session, ids)
        return [
            (workspace, await _role(session, workspace.id, principal.subject))
            for workspace in workspaces
        ]


async def workspace_state(state: AppState, access: WorkspaceAccess) -> WorkspaceState:
    """The workspace with the caller's role and the current use of its quotas."""
    workspace_id = access.workspace.id
    async with state.sessions() as session:
        workspace = await governance.workspaces_by_id(session, [workspace_id])
        if not workspace:  # deleted since the access check
            raise WorkspaceNotFoundError(access.workspace.slug)
        return WorkspaceState(
            workspace[0],
            await _role(session, workspace_id, access.principal.subject),
            await _usage(state, session, workspace_id),
        )


async def members(sessions: Sessions, workspace: Workspace) -> list[WorkspaceMember]:
    """The workspace's members, by subject."""
    async with sessions() as session:
        return await repo.list_members(session, workspace.id)


async def _require_owner_rights(state: AppState, access: WorkspaceAccess) -> None:
    """Granting or taking away the owner role needs ``can_manage_owners`` (owners only)."""
    relation = "can_manage_owners"
    allowed = await state.authorizer.check(
        user_object(access.principal.subject), relation, workspace_object(access.workspace.id)
    )
    if not allowed:
        raise PermissionDeniedError(
            access.principal.subject, relation, f"workspace {access.workspace.slug!r}"
        )


async def set_member(
    state: AppState, access: WorkspaceAccess, subject: str, role: str
) -> tuple[WorkspaceMember, str | None]:
    """Give ``subject`` ``role``, adding them if needed; returns the membership and the role
    held before. Granting or changing the owner role needs ``can_manage_owners``
    (:class:`PermissionDeniedError`); demoting the last owner raises
    :class:`governance.LastOwnerError`. Setting the role held already changes nothing."""
    workspace = access.workspace
    async with state.sessions.begin() as session:
        await governance.lock_workspace(session, workspace.id)
        if OWNER in (role, await _role(session, workspace.id, subject)):
            await _require_owner_rights(state, access)
        member, previous = await governance.set_member_role(session, workspace.id, subject, role)
        if previous != role:
            await repo.write_audit(
                session,
                workspace.id,
                actor=access.principal.subject,
                action="workspace.member_set",
                target=_member_target(subject),
                payload={"role": role, "previous": previous},
            )
        if previous is not None and previous != role:
            await state.authorizer.delete_tuples([member_tuple(workspace.id, subject, previous)])
    # Also when nothing changed: rewriting a present grant is a no-op, and repairs a missing one.
    await state.authorizer.write_tuples([member_tuple(workspace.id, subject, role)])
    return member, previous


async def remove_member(state: AppState, access: WorkspaceAccess, subject: str) -> str:
    """Take ``subject`` out of the workspace; returns the role they held. Removing an owner
    needs ``can_manage_owners``; :class:`governance.MemberNotFoundError` for a non-member,
    :class:`governance.LastOwnerError` for the last owner."""
    workspace = access.workspace
    async with state.sessions.begin() as session:
        await governance.lock_workspace(session, workspace.id)
        if await _role(session, workspace.id, subject) == OWNER:
            await _require_owner_rights(state, access)
        role = await governance.remove_member(session, workspace.id, subject)
        await repo.write_audit(
            session,
            workspace.id,
            actor=access.principal.subject,
            action="workspace.member_remove",
            target=_member_target(subject),
            payload={"role": role},
        )
        await state.authorizer.delete_tuples([member_tuple(workspace.id, subject, role)])
    return role


async def set_quotas(
    state: AppState, access: WorkspaceAccess, limits: Mapping[str, int | None]
) -> tuple[Workspace, QuotaUsage]:
    """Set the given quotas (None: unlimited), leaving the others; audited with each changed
    quota's old and new value, and not at all when nothing changes. Returns the workspace and
    its current use."""
    workspace_id = access.workspace.id
    async with state.sessions.begin() as session:
        before = await governance.lock_workspace(session, workspace_id)
        changed = {
            column: {"from": getattr(before, column), "to": value}
            for column, value in limits.items()
            if getattr(before, column) != value
        }
        workspace = await governance.set_quotas(
            session, workspace_id, {column: change["to"] for column, change in changed.items()}
        )
        if changed:
            await repo.write_audit(
                session,
                workspace_id,
                actor=access.principal.subject,
                action="workspace.quotas",
                target=workspace_object(workspace_id),
                payload=changed,
            )
        return workspace, await _usage(state, session, workspace_id)


async def audit_events(
    sessions: Sessions, workspace: Workspace, query: AuditQuery
) -> tuple[list[AuditEvent], int]:
    """One page of the workspace's audit events, newest first, with the total that match."""
    async with sessions() as session:
        return await governance.audit_page(
            session,
            workspace.id,
            limit=query.limit,
            offset=query.offset,
            action=query.action,
            actor=query.actor,
        )
