"""The embedded default's authorizer: the in-process evaluator over tuples read from the store.

With no OpenFGA server the store is the only record of relationships, so every question is
answered from it as it stands: the tuples that can bear on the question (the caller's roles, the
object's owning and sharing workspaces) are read in one short transaction and evaluated by the
same :class:`Evaluator` that the differential test proves equal to the real engine. Nothing is
cached, so any number of API processes agree, and a change is visible as soon as its
transaction commits. ``write_tuples`` and ``delete_tuples`` only validate: the store's own
commit is the write.

Which tuples bear on a question follows from the model's shape, which the golden and model tests
pin: a resource's permissions reach users only through its ``workspace`` and ``shared_with``
workspaces, and a workspace's only through the roles users hold in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qmachina.authz.authorizer import InProcessAuthorizer, default_model
from qmachina.authz.evaluator import RelationTuple, split_object
from qmachina.authz.relationships import (
    OWNED_RESOURCES,
    OwnedResource,
    member_tuple,
    owned_by,
    shared_with,
    store_relationships,
    subject_of,
)
from qmachina.store.models import ResourceShare, WorkspaceMember


class StoreAuthorizer:
    """Checks and listings evaluated over the store's current relationships."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def check(self, user: str, relation: str, object_: str) -> bool:
        async with self._sessions() as session:
            tuples = await _roles_of(session, user)
            object_type, object_id = split_object(object_)
            if object_type != "workspace":
                tuples += await _resource_tuples(session, object_type, [object_id])
        return await InProcessAuthorizer(tuples).check(user, relation, object_)

    async def list_objects(self, user: str, relation: str, type_name: str) -> list[str]:
        default_model().require_type(type_name)
        async with self._sessions() as session:
            tuples = await _roles_of(session, user)
            if type_name != "workspace":
                workspaces = sorted({split_object(t.object)[1] for t in tuples})
                tuples += await _resources_reachable(session, type_name, workspaces)
        return await InProcessAuthorizer(tuples).list_objects(user, relation, type_name)

    async def read_tuples(self) -> list[RelationTuple]:
        async with self._sessions() as session:
            return await store_relationships(session)

    async def write_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        _validate(tuples)

    async def delete_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        _validate(tuples)


def _validate(tuples: Sequence[RelationTuple]) -> None:
    model = default_model()
    for relation_tuple in tuples:
        model.validate_tuple(relation_tuple)


async def _roles_of(session: AsyncSession, user: str) -> list[RelationTuple]:
    subject = subject_of(user)
    if subject is None:
        return []
    rows = await session.execute(
        sa.select(WorkspaceMember.workspace_id, WorkspaceMember.role).where(
            WorkspaceMember.subject == subject
        )
    )
    return [member_tuple(workspace_id, subject, role) for workspace_id, role in rows]


def _share_tuples(shares: Sequence[ResourceShare]) -> list[RelationTuple]:
    tuples: list[RelationTuple] = []
    for share in shares:
        tuples.append(owned_by(share.workspace_id, share.resource_type, share.resource_id))
        tuples.append(
            shared_with(share.shared_with_workspace_id, share.resource_type, share.resource_id)
        )
    return tuples


async def _resource_tuples(
    session: AsyncSession, resource_type: str, resource_ids: Sequence[str]
) -> list[RelationTuple]:
    """The owning and sharing workspaces of these resources."""
    return await _owned_and_shared(
        session,
        resource_type,
        lambda table: table.id.in_(resource_ids),
        ResourceShare.resource_id.in_(resource_ids),
    )


async def _resources_reachable(
    session: AsyncSession, resource_type: str, workspace_ids: Sequence[str]
) -> list[RelationTuple]:
    """The resources of this type owned by or shared with these workspaces."""
    return await _owned_and_shared(
        session,
        resource_type,
        lambda table: table.workspace_id.in_(workspace_ids),
        sa.or_(
            ResourceShare.workspace_id.in_(workspace_ids),
            ResourceShare.shared_with_workspace_id.in_(workspace_ids),
        ),
    )


async def _owned_and_shared(
    session: AsyncSession,
    resource_type: str,
    rows_where: Callable[[OwnedResource], sa.ColumnElement[bool]],
    shares_where: sa.ColumnElement[bool],
) -> list[RelationTuple]:
    """The ``workspace`` tuples of the type's rows matching ``rows_where`` (for a type the store
    keeps rows of: jobs, serving versions and aliases), and the tuples of the shares of this
    type matching ``shares_where``."""
    tuples: list[RelationTuple] = []
    table = OWNED_RESOURCES.get(resource_type)
    if table is not None:
        rows = await session.execute(
            sa.select(table.workspace_id, table.id).where(rows_where(table))
        )
        tuples += [
            owned_by(workspace_id, resource_type, resource_id) for workspace_id, resource_id in rows
        ]
    shares = await session.scalars(
        sa.select(ResourceShare).where(ResourceShare.resource_type == resource_type, shares_where)
    )
    return tuples + _share_tuples(list(shares))
