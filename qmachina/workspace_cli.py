"""``qmachina workspace chunk-limit``: a workspace's settings in the control-plane store.

Written straight to the configured store (``QMACHINA_DATABASE_URL``), like ``qmachina db
upgrade``; every change is audited in the same transaction.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from qmachina.local_stack import mask_password
from qmachina.settings import SettingsError, load_settings
from qmachina.store import repository as repo
from qmachina.store.database import create_store_engine, session_factory

app = typer.Typer(help="Workspace settings in the control-plane store.")
out = Console(soft_wrap=True, highlight=False)

ACTOR = "cli"
"""Who a change from this command is audited as until authentication lands."""


def _fail(message: str) -> typer.Exit:
    sys.stderr.write(f"error: {message}\n")
    return typer.Exit(code=2)


async def _chunk_limit(
    database_url: str, slug: str, limit: int | None, clear: bool
) -> tuple[str, int | None]:
    engine = create_store_engine(database_url)
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and not Path(database).is_file():
        await engine.dispose()
        raise LookupError(
            f"the store {database_url} does not exist yet: run `qmachina db upgrade` "
            "(or `qmachina up`) first"
        )
    try:
        async with session_factory(engine).begin() as session:
            workspace = await repo.workspace_by_slug(session, slug)
            if workspace is None:
                raise LookupError(f"workspace {slug!r} not found")
            if limit is not None or clear:
                before = workspace.max_concurrent_chunks
                await repo.set_workspace_chunk_limit(session, workspace.id, limit)
                await repo.write_audit(
                    session,
                    workspace.id,
                    actor=ACTOR,
                    action="workspace.chunk_limit",
                    target=f"workspace:{workspace.id}",
                    payload={"from": before, "to": limit},
                )
            return workspace.id, workspace.max_concurrent_chunks
    finally:
        await engine.dispose()


@app.command("chunk-limit")
def chunk_limit(
    max_concurrent_chunks: Annotated[
        int | None, typer.Argument(min=1, help="The new limit; omit it to show the current one.")
    ] = None,
    workspace: Annotated[str, typer.Option(help="The workspace's slug.")] = "default",
    clear: Annotated[bool, typer.Option("--clear", help="Remove the limit.")] = False,
) -> None:
    """Show or set how many chunks of one of the workspace's sweeps may run at once; a sweep
    asking for more runs at this limit."""
    if clear and max_concurrent_chunks is not None:
        raise _fail("give a limit or --clear, not both")
    try:
        settings = load_settings()
        workspace_id, limit = asyncio.run(
            _chunk_limit(settings.database_url, workspace, max_concurrent_chunks, clear)
        )
    except (SettingsError, LookupError, repo.StoreError) as error:
        raise _fail(str(error)) from None
    except SQLAlchemyError as error:
        store = mask_password(settings.database_url)
        raise _fail(
            f"the store {store} cannot be used ({str(error).splitlines()[0]}); "
            "is it migrated? (`qmachina db upgrade` or `qmachina up`)"
        ) from None
    shown = "unbounded (each sweep's own parallelism)" if limit is None else str(limit)
    out.print(f"workspace {workspace} ({workspace_id}): max concurrent chunks {shown}")
