"""Sharing a resource with another workspace: readable there, and nothing more.

The share row and its audit row commit together; the authorizer's ``shared_with`` tuple is
written after a grant commits and deleted before a withdrawal does (see
:mod:`qmachina.authz.relationships`).
"""

from __future__ import annotations

from api.dependencies import AppState
from api.workspaces import find_workspace
from qmachina.auth import Principal
from qmachina.authz.relationships import shared_with
from qmachina.store import governance
from qmachina.store import repository as repo
from qmachina.store.models import Workspace


async def set_shared(
    state: AppState,
    principal: Principal,
    owner: Workspace,
    resource: tuple[str, str],
    target_slug: str,
    shared: bool,
) -> None:
    """Share ``resource`` (type, id) of ``owner`` with the workspace ``target_slug``, or
    withdraw it; audited when it changes anything."""
    resource_type, resource_id = resource
    target = await find_workspace(state.sessions, target_slug)
    relation_tuple = shared_with(target.id, resource_type, resource_id)
    if not shared:
        await state.authorizer.delete_tuples([relation_tuple])
    async with state.sessions.begin() as session:
        if shared:
            _, changed = await governance.share_resource(
                session, owner.id, resource_type, resource_id, target.id
            )
        else:
            changed = await governance.unshare_resource(
                session, owner.id, resource_type, resource_id, target.id
            )
        if changed:
            await repo.write_audit(
                session,
                owner.id,
                actor=principal.subject,
                action=f"{resource_type}.{'share' if shared else 'unshare'}",
                target=f"{resource_type}:{resource_id}",
                payload={"workspace": target.slug},
            )
    if shared:
        await state.authorizer.write_tuples([relation_tuple])
