"""Bring a store to a usable state: the schema at head, the default workspace present and, when
one is configured, its owner."""

from __future__ import annotations

from qmachina.auth.client import local_user
from qmachina.settings import Settings
from qmachina.store import governance
from qmachina.store import repository as repo
from qmachina.store.database import create_store_engine, session_factory, upgrade_to_head

DEFAULT_WORKSPACE_SLUG = "default"
DEFAULT_WORKSPACE_NAME = "Default workspace"


def default_workspace_owner(settings: Settings) -> str | None:
    """Who owns the default workspace: the configured subject, else the local user when the
    dev issuer is in use (whose tokens are minted for that user), else nobody."""
    if settings.default_workspace_owner is not None:
        return settings.default_workspace_owner
    return local_user() if settings.oidc_issuer is None else None


async def bootstrap_store(url: str, owner: str | None = None) -> str:
    """Migrate the store at ``url`` to head, make sure the default workspace exists and, given
    an ``owner`` who is not yet a member, make them its owner (a member keeps the role they
    hold). Returns the default workspace's id. Safe to run any number of times.
    """
    await upgrade_to_head(url)
    engine = create_store_engine(url)
    try:
        async with session_factory(engine).begin() as session:
            workspace = await repo.ensure_workspace(
                session, DEFAULT_WORKSPACE_SLUG, DEFAULT_WORKSPACE_NAME
            )
            if (
                owner is not None
                and await governance.get_member(session, workspace.id, owner) is None
            ):
                await governance.set_member_role(session, workspace.id, owner, "owner")
                await repo.write_audit(
                    session,
                    workspace.id,
                    actor="qmachina-bootstrap",
                    action="workspace.member_set",
                    target=f"user:{owner}",
                    payload={"role": "owner", "previous": None},
                )
            return workspace.id
    finally:
        await engine.dispose()
