"""The relationship tuples the control-plane store implies, and keeping an authorizer in step.

The store is the record of who belongs where and what belongs to whom; the authorizer holds the
same facts as tuples of ``model.fga``:

- a member's role: ``(user:<subject>, <role>, workspace:<id>)``;
- a resource's workspace: ``(workspace:<id>, workspace, <type>:<id>)``, for each row of the
  tables in :data:`OWNED_RESOURCES` (experiment jobs, serving versions and aliases, modeling
  and live sessions, each named by its row id);
- a share: ``(workspace:<other id>, shared_with, <type>:<id>)``.

With no OpenFGA server, :class:`~qmachina.authz.store_authorizer.StoreAuthorizer` reads these
tuples from the store for each question. With a server, grants are written to it after the store
commits and revocations before, so a failure between the two can leave a stale denial but never
a grant the store does not record; ``qmachina authz sync`` repairs either.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote, unquote

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from qmachina.authz.authorizer import Authorizer
from qmachina.authz.evaluator import RelationTuple
from qmachina.store.models import (
    ExperimentJob,
    LiveSession,
    ModelingSession,
    ResourceShare,
    ServingAlias,
    ServingVersion,
    WorkspaceMember,
)

OwnedResource = (
    type[ExperimentJob]
    | type[ServingVersion]
    | type[ServingAlias]
    | type[ModelingSession]
    | type[LiveSession]
)
OWNED_RESOURCES: dict[str, OwnedResource] = {
    "experiment_job": ExperimentJob,
    "serving_version": ServingVersion,
    "serving_alias": ServingAlias,
    "modeling_session": ModelingSession,
    "live_session": LiveSession,
}
"""The resource types of the model the store keeps rows of, with their tables: each row belongs
to its ``workspace_id`` and is the object ``<type>:<row id>``."""

# Printable ASCII but ``:`` and ``#`` (OpenFGA ids may not hold them) and ``%`` (so escaping is
# reversible); whitespace and anything else is percent-escaped by ``quote``.
_KEPT_IN_ID = "".join(c for c in map(chr, range(33, 127)) if c not in ":#%")


def user_object(subject: str) -> str:
    """The model's ``user:`` object for an OIDC subject, with ``:``, ``#``, ``%``, whitespace and
    non-ASCII percent-escaped (issuers put some of them in subjects; OpenFGA ids may not)."""
    return "user:" + quote(subject, safe=_KEPT_IN_ID)


def subject_of(user: str) -> str | None:
    """The OIDC subject of a ``user:`` object (the inverse of :func:`user_object`), else None."""
    kind, _, escaped = user.partition(":")
    return unquote(escaped) if kind == "user" and escaped else None


def workspace_object(workspace_id: str) -> str:
    return f"workspace:{workspace_id}"


def resource_object(resource_type: str, resource_id: str) -> str:
    return f"{resource_type}:{resource_id}"


def member_tuple(workspace_id: str, subject: str, role: str) -> RelationTuple:
    return RelationTuple(user_object(subject), role, workspace_object(workspace_id))


def owned_by(workspace_id: str, resource_type: str, resource_id: str) -> RelationTuple:
    return RelationTuple(
        workspace_object(workspace_id), "workspace", resource_object(resource_type, resource_id)
    )


def shared_with(workspace_id: str, resource_type: str, resource_id: str) -> RelationTuple:
    """``workspace_id`` may read the resource (it is not the owner)."""
    return RelationTuple(
        workspace_object(workspace_id), "shared_with", resource_object(resource_type, resource_id)
    )


async def store_relationships(session: AsyncSession) -> list[RelationTuple]:
    """Every tuple the store implies, sorted."""
    tuples = [
        member_tuple(workspace_id, subject, role)
        for workspace_id, subject, role in await session.execute(
            sa.select(WorkspaceMember.workspace_id, WorkspaceMember.subject, WorkspaceMember.role)
        )
    ]
    for resource_type, table in OWNED_RESOURCES.items():
        tuples += [
            owned_by(workspace_id, resource_type, resource_id)
            for workspace_id, resource_id in await session.execute(
                sa.select(table.workspace_id, table.id)
            )
        ]
    for share in await session.scalars(sa.select(ResourceShare)):
        tuples.append(owned_by(share.workspace_id, share.resource_type, share.resource_id))
        tuples.append(
            shared_with(share.shared_with_workspace_id, share.resource_type, share.resource_id)
        )
    return sorted(set(tuples))


class SyncCounts(NamedTuple):
    """What a sync changed in the authorizer."""

    written: int
    deleted: int


async def sync_from_store(
    authorizer: Authorizer, session: AsyncSession, *, prune: bool = True
) -> SyncCounts:
    """Make the authorizer hold exactly the tuples the store implies: write the missing ones
    and, with ``prune``, delete those the store no longer implies. Safe at any time.

    The authorizer is read before the store: a grant is written to the authorizer only after
    the store commits it, so a tuple the authorizer holds is either in the (later) store read or
    being revoked, and a concurrent grant is never taken for an extra and deleted. Extras are
    deleted before the missing tuples are written, like any revocation before a grant.
    """
    held = set(await authorizer.read_tuples())
    implied = set(await store_relationships(session))
    extra = sorted(held - implied) if prune else []
    missing = sorted(implied - held)
    await authorizer.delete_tuples(extra)
    await authorizer.write_tuples(missing)
    return SyncCounts(written=len(missing), deleted=len(extra))
