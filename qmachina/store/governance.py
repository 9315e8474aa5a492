"""Typed reads and writes of who belongs to a workspace, what it may use and what it shares.

Like :mod:`qmachina.store.repository`, every function takes the caller's session and flushes
without committing, so an audit row written beside a change commits or rolls back with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from qmachina.store.models import (
    MEMBER_ROLES,
    QUOTA_COLUMNS,
    SHAREABLE_TYPES,
    AuditEvent,
    ExperimentJob,
    JobArtifact,
    ResourceShare,
    Workspace,
    WorkspaceMember,
    new_id,
    utc_now,
)
from qmachina.store.repository import StoreError, create_workspace, workspace_by_slug

ACTIVE_JOB_STATUSES = ("queued", "running")


class WorkspaceExistsError(StoreError):
    """The slug is taken."""

    def __init__(self, slug: str) -> None:
        super().__init__(f"workspace {slug!r} already exists")
        self.slug = slug


class MemberNotFoundError(StoreError):
    """The subject holds no role in the workspace."""

    def __init__(self, workspace_id: str, subject: str) -> None:
        super().__init__(f"{subject!r} is not a member of workspace {workspace_id}")
        self.subject = subject


class LastOwnerError(StoreError):
    """The change would leave the workspace without an owner."""

    def __init__(self, workspace_id: str, subject: str) -> None:
        super().__init__(
            f"{subject!r} is the last owner of workspace {workspace_id}: make another member "
            "owner first"
        )
        self.subject = subject


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`MEMBER_ROLES`, else a :class:`StoreError` naming them."""
    if role not in MEMBER_ROLES:
        raise StoreError(f"role {role!r} is not one of {', '.join(MEMBER_ROLES)}")
    return role


async def create_owned_workspace(
    session: AsyncSession, slug: str, name: str, owner: str
) -> Workspace:
    """A new workspace with ``owner`` (an OIDC subject) as its owner."""
    if await workspace_by_slug(session, slug) is not None:
        raise WorkspaceExistsError(slug)
    workspace = await create_workspace(session, slug, name)
    session.add(
        WorkspaceMember(id=new_id(), workspace_id=workspace.id, subject=owner, role="owner")
    )
    await session.flush()
    return workspace


async def workspaces_by_id(session: AsyncSession, ids: Sequence[str]) -> list[Workspace]:
    """The workspaces with these ids, by slug (unknown ids are left out)."""
    if not ids:
        return []
    rows = await session.scalars(
        sa.select(Workspace).where(Workspace.id.in_(ids)).order_by(Workspace.slug)
    )
    return list(rows)


async def get_member(
    session: AsyncSession, workspace_id: str, subject: str
) -> WorkspaceMember | None:
    """The subject's membership of the workspace, if any."""
    found: WorkspaceMember | None = await session.scalar(
        sa.select(WorkspaceMember).where(
            WorkspaceMember.workspace_id == workspace_id, WorkspaceMember.subject == subject
        )
    )
    return found


async def _owner_count(session: AsyncSession, workspace_id: str) -> int:
    count = await session.scalar(
        sa.select(sa.func.count()).where(
            WorkspaceMember.workspace_id == workspace_id, WorkspaceMember.role == "owner"
        )
    )
    return int(count or 0)


async def set_member_role(
    session: AsyncSession, workspace_id: str, subject: str, role: str
) -> tuple[WorkspaceMember, str | None]:
    """Give ``subject`` ``role`` in the workspace, adding them if needed; returns the membership
    and the role held before (None for a new member). Refuses to demote the last owner."""
    check_role(role)
    await lock_workspace(session, workspace_id)
    member = await get_member(session, workspace_id, subject)
    if member is None:
        member = WorkspaceMember(id=new_id(), workspace_id=workspace_id, subject=subject, role=role)
        session.add(member)
        await session.flush()
        return member, None
    previous = member.role
    if previous == "owner" and role != "owner" and await _owner_count(session, workspace_id) <= 1:
        raise LastOwnerError(workspace_id, subject)
    member.role = role
    await session.flush()
    return member, previous


async def remove_member(session: AsyncSession, workspace_id: str, subject: str) -> str:
    """Remove ``subject`` from the workspace; returns the role they held. Refuses to remove
    the last owner."""
    await lock_workspace(session, workspace_id)
    member = await get_member(session, workspace_id, subject)
    if member is None:
        raise MemberNotFoundError(workspace_id, subject)
    if member.role == "owner" and await _owner_count(session, workspace_id) <= 1:
        raise LastOwnerError(workspace_id, subject)
    await session.delete(member)
    await session.flush()
    return member.role


async def lock_workspace(session: AsyncSession, workspace_id: str) -> Workspace:
    """Write the workspace row first in the transaction, so concurrent quota checks and
    membership changes of one workspace run one after another (a row lock on PostgreSQL, the
    database's write lock on SQLite)."""
    workspace: Workspace | None = await session.scalar(
        sa.update(Workspace)
        .where(Workspace.id == workspace_id)
        .values(updated_at=utc_now())
        .returning(Workspace)
    )
    if workspace is None:
        raise StoreError(f"workspace {workspace_id} not found")
    return workspace


async def set_quotas(
    session: AsyncSession, workspace_id: str, limits: Mapping[str, int | None]
) -> Workspace:
    """Set the given quotas (None: unlimited); quotas not named keep their value. The chunk
    bound ``max_concurrent_chunks`` is set here too."""
    columns = {*QUOTA_COLUMNS, "max_concurrent_chunks"}
    unknown = sorted(set(limits) - columns)
    if unknown:
        raise StoreError(f"unknown quota {', '.join(unknown)}; known: {', '.join(sorted(columns))}")
    for column, value in limits.items():
        floor = 1 if column == "max_concurrent_chunks" else 0
        if value is not None and value < floor:
            raise StoreError(f"workspace {workspace_id}: {column} must be at least {floor}")
    workspace = await lock_workspace(session, workspace_id)
    for column, value in limits.items():
        setattr(workspace, column, value)
    await session.flush()
    return workspace


async def active_job_count(session: AsyncSession, workspace_id: str) -> int:
    """The workspace's jobs that are queued or running."""
    count = await session.scalar(
        sa.select(sa.func.count()).where(
            ExperimentJob.workspace_id == workspace_id,
            ExperimentJob.status.in_(ACTIVE_JOB_STATUSES),
        )
    )
    return int(count or 0)


async def storage_used(session: AsyncSession, workspace_id: str) -> int:
    """Bytes of the distinct lake files the workspace's jobs reference."""
    per_file = (
        sa.select(JobArtifact.uri, sa.func.max(JobArtifact.size_bytes).label("size"))
        .where(JobArtifact.workspace_id == workspace_id)
        .group_by(JobArtifact.uri)
        .subquery()
    )
    total = await session.scalar(sa.select(sa.func.coalesce(sa.func.sum(per_file.c.size), 0)))
    return int(total or 0)


def _check_type(resource_type: str) -> None:
    if resource_type not in SHAREABLE_TYPES:
        raise StoreError(
            f"resource type {resource_type!r} is not one of {', '.join(SHAREABLE_TYPES)}"
        )


async def share_resource(
    session: AsyncSession,
    workspace_id: str,
    resource_type: str,
    resource_id: str,
    shared_with_workspace_id: str,
) -> tuple[ResourceShare, bool]:
    """Make the workspace's resource readable in another workspace; returns the share and
    whether it is new (sharing twice is a no-op)."""
    _check_type(resource_type)
    if shared_with_workspace_id == workspace_id:
        raise StoreError(f"{resource_type} {resource_id}: a workspace cannot share with itself")
    found = await session.scalar(
        sa.select(ResourceShare).where(
            ResourceShare.workspace_id == workspace_id,
            ResourceShare.resource_type == resource_type,
            ResourceShare.resource_id == resource_id,
            ResourceShare.shared_with_workspace_id == shared_with_workspace_id,
        )
    )
    if found is not None:
        return found, False
    share = ResourceShare(
        id=new_id(),
        workspace_id=workspace_id,
        resource_type=resource_type,
        resource_id=resource_id,
        shared_with_workspace_id=shared_with_workspace_id,
    )
    session.add(share)
    await session.flush()
    return share, True


async def unshare_resource(
    session: AsyncSession,
    workspace_id: str,
    resource_type: str,
    resource_id: str,
    shared_with_workspace_id: str,
) -> bool:
    """Withdraw a share; returns whether there was one."""
    _check_type(resource_type)
    result = await session.execute(
        sa.delete(ResourceShare).where(
            ResourceShare.workspace_id == workspace_id,
            ResourceShare.resource_type == resource_type,
            ResourceShare.resource_id == resource_id,
            ResourceShare.shared_with_workspace_id == shared_with_workspace_id,
        )
    )
    return bool(getattr(result, "rowcount", 0))


async def shared_resource(
    session: AsyncSession, workspace_id: str, resource_type: str, resource_id: str
) -> ResourceShare | None:
    """The share that makes another workspace's resource readable in this one, if any."""
    found: ResourceShare | None = await session.scalar(
        sa.select(ResourceShare).where(
            ResourceShare.shared_with_workspace_id == workspace_id,
            ResourceShare.resource_type == resource_type,
            ResourceShare.resource_id == resource_id,
        )
    )
    return found


async def audit_page(
    session: AsyncSession,
    workspace_id: str,
    *,
    limit: int,
    offset: int = 0,
    action: str | None = None,
    actor: str | None = None,
) -> tuple[list[AuditEvent], int]:
    """The workspace's audit rows, newest first, filtered by action and actor; with the total
    that match."""
    where = [AuditEvent.workspace_id == workspace_id]
    if action is not None:
        where.append(AuditEvent.action == action)
    if actor is not None:
        where.append(AuditEvent.actor == actor)
    total = await session.scalar(sa.select(sa.func.count()).where(*where))
    rows = await session.scalars(
        sa.select(AuditEvent)
        .where(*where)
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), int(total or 0)
