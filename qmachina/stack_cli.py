"""``qmachina up``, ``down``, ``status`` and ``db upgrade``: the local stack from the command line.

The work happens in :mod:`qmachina.local_stack`; this module reads the settings, shows a spinner
while it waits and prints the outcome.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.status import Status
from rich.text import Text

from qmachina import local_stack
from qmachina.cli_errors import fail, settings_or_fail
from qmachina.local_stack import ComponentStatus, Progress, StackError
from qmachina.settings import Settings

db_app = typer.Typer(help="The control-plane store.")

# URLs, paths and commands are copied from here: never wrap them.
err = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)

STATE_STYLES = {"healthy": "green", "unhealthy": "yellow", "stopped": "red", "external": "cyan"}


def _show(message: str) -> None:
    err.print(Text(message))


def _on_spinner(spinner: Status) -> Progress:
    return lambda message: spinner.update(Text(message))


def start_stack(settings: Settings, timeout: float) -> local_stack.UpResult:
    """``up`` with a spinner; errors become ``error:`` lines and exit code 2."""
    try:
        with err.status("starting the local stack") as spinner:
            result = local_stack.up(settings, _on_spinner(spinner), timeout)
    except StackError as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: what this `up` had started is stopped again\n")
        raise typer.Exit(code=130) from None
    for note in result.notes:
        _show(note)
    return result


def print_endpoints(result: local_stack.UpResult) -> None:
    """Where the stack answers, one label and URL per line."""
    width = max(len(label) for label in result.endpoints)
    for label, value in result.endpoints.items():
        out.print(Text.assemble((f"  {label:<{width}}  ", "bold"), value))


def up(
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for each component to become healthy.")
    ] = local_stack.DEFAULT_TIMEOUT_S,
) -> None:
    """Start the local stack (Temporal dev server, worker, API), wait until each is healthy and
    print where to reach it. With TEMPORAL_ADDRESS set, use that cluster instead of a dev
    server."""
    result = start_stack(settings_or_fail(), timeout)
    if result.already_running:
        headline = f"qMachina is already running (started {result.started_at:%Y-%m-%d %H:%M:%S %Z})"
    else:
        headline = f"qMachina is up ({result.seconds:.1f} s)"
    out.print(Text(headline, style="bold green"))
    print_endpoints(result)


def down() -> None:
    """Stop the local stack: the API, then the worker, then the Temporal dev server."""
    settings = settings_or_fail()
    try:
        with err.status("stopping the local stack") as spinner:
            lines = local_stack.down(settings, _on_spinner(spinner))
    except StackError as error:
        raise fail(str(error)) from None
    for line in lines:
        out.print(Text(line))


def _state_word(component: ComponentStatus) -> str:
    if component.running is None:
        return "external" if component.healthy else "unhealthy"
    if not component.running:
        return "stopped"
    return "healthy" if component.healthy else "unhealthy"


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the components as JSON.")] = False,
) -> None:
    """Report each component of the local stack; exit 0 when all are healthy, 1 otherwise."""
    settings = settings_or_fail()
    try:
        components = local_stack.status(settings)
    except StackError as error:
        raise fail(str(error)) from None
    if as_json:
        sys.stdout.write(
            json.dumps(
                [
                    {
                        "name": c.name,
                        "state": _state_word(c),
                        "healthy": c.healthy,
                        "pid": c.pid,
                        "address": c.address,
                        "detail": c.detail,
                        "log": str(c.log) if c.log else None,
                    }
                    for c in components
                ],
                indent=2,
            )
            + "\n"
        )
    else:
        for c in components:
            word = _state_word(c)
            out.print(
                Text.assemble(
                    (f"{c.name:<9}", "bold"),
                    (f"{word:<10}", STATE_STYLES[word]),
                    f"pid {c.pid or '-':<8}",
                    c.address,
                    f"  {c.detail}" if c.detail != "ok" else "",
                )
            )
    if not all(c.healthy for c in components):
        raise typer.Exit(code=1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the configured store (QMACHINA_DATABASE_URL) to head and make sure the default
    workspace exists; `qmachina up` does the same before it starts anything."""
    settings = settings_or_fail()
    try:
        with err.status("migrating the store"):
            workspace_id = local_stack.upgrade_store(settings)
    except StackError as error:
        raise fail(str(error)) from None
    store = local_stack.mask_password(settings.database_url)
    out.print(Text(f"{store} is at head; default workspace {workspace_id}"))
