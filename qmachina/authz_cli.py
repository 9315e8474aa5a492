"""``qmachina authz ...``: the deployment's authorization server, from the command line.

- ``bootstrap`` writes the model into the OpenFGA server (creating the store the first time)
  and records the store and model ids in ``<data_dir>/openfga.json``, where every process with
  ``OPENFGA_API_URL`` set and the same data directory finds them.
- ``sync`` makes the server hold exactly the tuples the control-plane store implies.
- ``check`` asks whichever authorizer the settings select, as the API would.

Errors are printed as ``error: ...`` and exit 2.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from qmachina.authz.authorizer import (
    AuthorizerUnavailableError,
    OpenFgaConfigError,
    OpenFgaIds,
    bootstrap_openfga,
    redacted_url,
)
from qmachina.authz.evaluator import AuthzError
from qmachina.authz.openfga_ids import record_openfga_ids, recorded_openfga_ids
from qmachina.authz.relationships import SyncCounts, sync_from_store
from qmachina.authz.setup import close_authorizer, open_authorizer, openfga_authorizer
from qmachina.cli_errors import fail, settings_or_fail
from qmachina.settings import Settings
from qmachina.store.database import create_store_engine, session_factory

app = typer.Typer(
    help="Authorization: set up and fill the OpenFGA server, and ask who may do what."
)
out = Console(soft_wrap=True, highlight=False)  # ids and URLs are copied from here


def _store_label(database_url: str) -> str:
    return make_url(database_url).render_as_string(hide_password=True)


def _known_store(settings: Settings, api_url: str) -> str | None:
    """The store this deployment already uses on the server at ``api_url``, if any."""
    same_server = bool(settings.openfga_api_url) and redacted_url(
        settings.openfga_api_url or ""
    ) == redacted_url(api_url)
    if same_server and settings.openfga_store_id:
        return settings.openfga_store_id
    try:
        recorded = recorded_openfga_ids(settings.data_dir, api_url)
    except OpenFgaConfigError:
        return None  # recorded for another server, or unreadable: this bootstrap replaces it
    return recorded.store_id if recorded is not None else None


@app.command()
def bootstrap(
    api_url: Annotated[
        str | None,
        typer.Option("--api-url", help="The OpenFGA server; default: OPENFGA_API_URL."),
    ] = None,
    new_store: Annotated[
        bool,
        typer.Option(
            "--new-store", help="Create a new, empty store even if one is already recorded."
        ),
    ] = False,
) -> None:
    """Write the model into the OpenFGA server and record the store and model ids.

    The first run creates the store; later runs write the model into the same store (a new
    model id; the tuples stay), so run it again after every change to ``model.fga``.
    """
    settings = settings_or_fail()
    url = api_url or settings.openfga_api_url
    if not url:
        raise fail("no OpenFGA server: pass --api-url or set OPENFGA_API_URL")
    if not url.startswith(("http://", "https://")):
        raise fail(f"--api-url: expected an http:// or https:// URL, got {redacted_url(url)!r}")
    store_id = None if new_store else _known_store(settings, url)
    try:
        ids = asyncio.run(bootstrap_openfga(url, store_id=store_id))
    except AuthorizerUnavailableError as error:
        hint = " (pass --new-store to create a new store)" if store_id else ""
        raise fail(f"{error}{hint}") from None
    except AuthzError as error:
        raise fail(str(error)) from None
    path = record_openfga_ids(settings.data_dir, url, ids)
    server = redacted_url(url)
    verb = "wrote the model into store" if store_id else "created store"
    out.print(f"{verb} {ids.store_id} on {server}: model {ids.model_id}")
    out.print(f"recorded in {path}; or set:")
    out.print(f"OPENFGA_API_URL={server}")
    out.print(f"OPENFGA_STORE_ID={ids.store_id}")
    out.print(f"OPENFGA_MODEL_ID={ids.model_id}")
    _warn_if_overridden(settings, ids)


def _warn_if_overridden(settings: Settings, ids: OpenFgaIds) -> None:
    """The environment's ids win over the recorded ones: say so when they differ."""
    for variable, configured, recorded in (
        ("OPENFGA_STORE_ID", settings.openfga_store_id, ids.store_id),
        ("OPENFGA_MODEL_ID", settings.openfga_model_id, ids.model_id),
    ):
        if configured and configured != recorded:
            sys.stderr.write(
                f"note: {variable} is set to {configured}, which takes precedence over the "
                "recorded id: update or unset it\n"
            )


@app.command()
def sync(
    keep_extra: Annotated[
        bool,
        typer.Option(
            "--keep-extra", help="Only write missing tuples; keep those the store does not imply."
        ),
    ] = False,
) -> None:
    """Make the OpenFGA server hold the tuples the store implies (and no others)."""
    settings = settings_or_fail()
    if not settings.openfga_api_url:
        raise fail(
            "no OpenFGA server is configured (set OPENFGA_API_URL): without one the "
            "in-process evaluator reads the store itself, and there is nothing to sync"
        )
    try:
        authorizer = openfga_authorizer(settings)
    except OpenFgaConfigError as error:
        raise fail(str(error)) from None

    async def run() -> SyncCounts:
        engine = create_store_engine(settings.database_url)
        try:
            async with authorizer, session_factory(engine)() as session:
                return await sync_from_store(authorizer, session, prune=not keep_extra)
        finally:
            await engine.dispose()

    try:
        counts = asyncio.run(run())
    except AuthzError as error:
        raise fail(str(error)) from None
    except SQLAlchemyError as error:
        raise fail(f"the store at {_store_label(settings.database_url)}: {error}") from None
    out.print(
        f"wrote {counts.written} and deleted {counts.deleted} tuples on {authorizer.server} "
        f"(store {authorizer.store_id})"
    )


@app.command()
def check(
    user: Annotated[str, typer.Argument(help="The subject as `type:id`, e.g. `user:alice`.")],
    relation: Annotated[str, typer.Argument(help="A relation of the model, e.g. `can_read`.")],
    object_: Annotated[
        str, typer.Argument(metavar="OBJECT", help="The object as `type:id`, e.g. `workspace:w1`.")
    ],
) -> None:
    """Print `allowed` (exit 0) or `denied` (exit 1), as the configured authorizer decides.

    Subjects are the model's `user:` objects: an OIDC subject holding `:`, `#`, `%`, spaces or
    non-ASCII is percent-escaped, as the API escapes it.
    """
    settings = settings_or_fail()

    async def run() -> bool:
        engine = create_store_engine(settings.database_url)
        try:
            authorizer = await open_authorizer(settings, session_factory(engine))
            try:
                return await authorizer.check(user, relation, object_)
            finally:
                await close_authorizer(authorizer)
        finally:
            await engine.dispose()

    try:
        allowed = asyncio.run(run())
    except AuthzError as error:
        raise fail(str(error)) from None
    except SQLAlchemyError as error:
        raise fail(f"the store at {_store_label(settings.database_url)}: {error}") from None
    out.print("allowed" if allowed else "denied")
    if not allowed:
        raise typer.Exit(code=1)
