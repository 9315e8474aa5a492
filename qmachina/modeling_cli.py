"""``qmachina model new|show|commit|reopen|manual|cancel|promote|decisions``: Create-a-Model
sessions through the API.

``commit`` takes the step by number or name and its payload from a YAML or JSON file, or
``--from-file`` naming a shipped spec (``pipelines/es_default.yaml``); step 5 needs neither, and
``--wait`` follows the sweep it starts until it ends. ``promote`` follows the promotion until the
session is promoted or the promotion was refused. Errors exit 2 with the API's problem.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from rich.console import Console

from qmachina.cli_errors import fail
from qmachina.modeling.draft import STEP_NAMES
from qmachina.sweep_cli import ApiOption, TokenOption, call_api, connect_api

SESSIONS_PATH = "/v1/modeling/sessions"
FOLLOW_SECONDS = 1.0

app = typer.Typer(help="Create-a-Model sessions: six gated steps from data to promotion.")
out = Console(soft_wrap=True, highlight=False)

WorkspaceOption = Annotated[str, typer.Option(help="The workspace's slug.")]
SessionArgument = Annotated[str, typer.Argument(help="The session's id.")]
AdvisorOption = Annotated[
    bool, typer.Option("--advisor", help="Commit as an advisor acting for you.")
]


def step_number(step: str) -> int:
    """A step given by number (``3``) or name (``signal``)."""
    if step.isdigit() and 1 <= int(step) <= len(STEP_NAMES):
        return int(step)
    if step in STEP_NAMES:
        return STEP_NAMES.index(step) + 1
    raise fail(f"no step {step!r}: give 1-6 or one of {', '.join(STEP_NAMES)}")


def _payload(file: Path | None, from_file: str | None) -> dict[str, Any]:
    if from_file is not None:
        return {"from_file": from_file}
    if file is None:
        return {}
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise fail(f"{file}: {error}") from None
    if not isinstance(data, dict):
        raise fail(f"{file}: expected a mapping of fields")
    return data


def show_session(view: dict[str, Any]) -> None:
    title = f" {view['title']!r}" if view["title"] else ""
    out.print(f"modeling session {view['id']}{title}: {view['state']}")
    for step in view["steps"]:
        by = f" by {step['committed_by']}" if step["committed_by"] else ""
        out.print(f"  {step['step']}. {step['name']:<16} {step['status']}{by}")
    if view["next_step"] is not None:
        out.print(f"  next: step {view['next_step']} ({STEP_NAMES[view['next_step'] - 1]})")
    execution = view.get("execution")
    if execution:
        line = (
            f"  execution r{execution['revision']}: {execution['state']}, job {execution['job_id']}"
        )
        progress = execution.get("progress")
        if progress:
            line += f", {progress['points_done']}/{progress['points_total']} points"
        else:
            line += f", {execution['points_recorded']} points recorded"
        out.print(line)
        if execution["error"]:
            out.print(f"    error: {execution['error']}")
    promotion = view.get("promotion")
    if promotion:
        out.print(
            f"  promotion: {promotion['state']}, alias {promotion['alias']} -> "
            f"{promotion['version_id'] or '(registering)'}"
        )
        for failure in promotion["failures"]:
            out.print(f"    rejected: {failure}")


def _follow(
    client: httpx.Client, view: dict[str, Any], workspace: str, waiting: tuple[str, ...]
) -> dict[str, Any]:
    while view["state"] in waiting:
        time.sleep(FOLLOW_SECONDS)
        view = call_api(client, "GET", f"{SESSIONS_PATH}/{view['id']}", workspace)
    return view


@app.command("new")
def new(
    title: Annotated[str, typer.Option(help="A name for the session.")] = "",
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Open a session; step 1 (dataset) is next."""
    with connect_api(api, token) as client:
        show_session(call_api(client, "POST", SESSIONS_PATH, workspace, json={"title": title}))


@app.command("show")
def show(
    session: SessionArgument,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Every step's state, what is next, the execution's progress, the promotion."""
    with connect_api(api, token) as client:
        show_session(call_api(client, "GET", f"{SESSIONS_PATH}/{session}", workspace))


@app.command("commit")
def commit(
    session: SessionArgument,
    step: Annotated[str, typer.Argument(help="1-6 or the step's name.")],
    file: Annotated[
        Path | None, typer.Argument(help="The payload, YAML or JSON.", exists=True)
    ] = None,
    from_file: Annotated[
        str | None, typer.Option(help="A shipped spec, relative to the configs root.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="After step 5, follow the sweep to its end.")
    ] = False,
    advisor: AdvisorOption = False,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Commit the next step."""
    number = step_number(step)
    body = {"payload": _payload(file, from_file), "actor_type": "advisor" if advisor else "user"}
    with connect_api(api, token) as client:
        view = call_api(
            client, "POST", f"{SESSIONS_PATH}/{session}/steps/{number}/commit", workspace, json=body
        )
        if wait:
            view = _follow(client, view, workspace, ("executing",))
    show_session(view)


@app.command("reopen")
def reopen(
    session: SessionArgument,
    step: Annotated[str, typer.Argument(help="1-6 or the step's name.")],
    reason: Annotated[str, typer.Option(help="Why.")] = "",
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Take a committed step back; the steps after it are invalidated."""
    number = step_number(step)
    with connect_api(api, token) as client:
        view = call_api(
            client,
            "POST",
            f"{SESSIONS_PATH}/{session}/steps/{number}/reopen",
            workspace,
            json={"reason": reason},
        )
    show_session(view)


@app.command("manual")
def manual(
    session: SessionArgument,
    file: Annotated[Path, typer.Argument(help="The whole model in YAML.", exists=True)],
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Fill steps 1-4 from a model file (pipeline, gold, serving, experiment)."""
    with connect_api(api, token) as client:
        view = call_api(
            client,
            "POST",
            f"{SESSIONS_PATH}/{session}/manual",
            workspace,
            json={"yaml": file.read_text(encoding="utf-8")},
        )
    show_session(view)


@app.command("cancel")
def cancel(
    session: SessionArgument,
    reason: Annotated[str, typer.Option(help="Why.")] = "",
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Cancel the running sweep of step 5."""
    with connect_api(api, token) as client:
        view = call_api(
            client,
            "POST",
            f"{SESSIONS_PATH}/{session}/execution/cancel",
            workspace,
            json={"reason": reason},
        )
    show_session(view)


@app.command("promote")
def promote(
    session: SessionArgument,
    reason: Annotated[str, typer.Option(help="Why.")] = "",
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Promote a completed session and follow it; exits 1 when the promotion is refused."""
    with connect_api(api, token) as client:
        view = call_api(
            client, "POST", f"{SESSIONS_PATH}/{session}/promote", workspace, json={"reason": reason}
        )
        view = _follow(client, view, workspace, ("promoting",))
    show_session(view)
    if view["state"] != "promoted":
        raise typer.Exit(code=1)


@app.command("decisions")
def decisions(
    session: SessionArgument,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """The session's decision log, oldest first."""
    with connect_api(api, token) as client:
        log = call_api(client, "GET", f"{SESSIONS_PATH}/{session}/decisions", workspace)
    for entry in log["entries"]:
        if as_json:
            out.print(json.dumps(entry), markup=False)
        else:
            out.print(
                f"{entry['seq']:>3} {entry['at']} step {entry['step']} {entry['action']} "
                f"by {entry['actor']} ({entry['actor_type']})",
                markup=False,
            )
