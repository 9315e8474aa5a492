"""Bring a store to a usable state: the schema at head and the default workspace present."""

from __future__ import annotations

from qmachina.store import repository as repo
from qmachina.store.database import create_store_engine, session_factory, upgrade_to_head

DEFAULT_WORKSPACE_SLUG = "default"
DEFAULT_WORKSPACE_NAME = "Default workspace"


async def bootstrap_store(url: str) -> str:
    """Migrate the store at ``url`` to head and make sure the default workspace exists.

    Returns the default workspace's id. Safe to run any number of times.
    """
    await upgrade_to_head(url)
    engine = create_store_engine(url)
    try:
        async with session_factory(engine).begin() as session:
            workspace = await repo.ensure_workspace(
                session, DEFAULT_WORKSPACE_SLUG, DEFAULT_WORKSPACE_NAME
            )
            return workspace.id
    finally:
        await engine.dispose()
