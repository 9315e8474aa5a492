"""``qmachina promote``, ``qmachina rollback`` and ``qmachina promotion status|decide``: serving
aliases moved through the API (the Promotion workflow, the registry's rollback).

``promote`` takes a serving version (its id or a unique prefix) or an experiment run
(``JOB_ID:POINT_HASH``, registered as a version first), starts its promotion and follows it until
it ends or awaits a decision. Errors exit 2 with the API's problem.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from qmachina.cli_errors import fail
from qmachina.sweep_cli import ApiOption, TokenOption, call_api, connect_api

PROMOTIONS_PATH = "/v1/serving/promotions"
VERSIONS_PATH = "/v1/serving/versions"
ALIASES_PATH = "/v1/serving/aliases"
FOLLOW_SECONDS = 0.5
WAITING = ("preflight", "repointing")

app = typer.Typer(help="Promotions of serving versions behind aliases (through the API).")
out = Console(soft_wrap=True, highlight=False)

WorkspaceOption = Annotated[str, typer.Option(help="The workspace's slug.")]
ReasonOption = Annotated[str, typer.Option(help="Why: recorded in the alias's history.")]


def _thresholds(given: list[str]) -> dict[str, float]:
    thresholds: dict[str, float] = {}
    for text in given:
        path, _, value = text.partition("=")
        try:
            thresholds[path.strip()] = float(value)
        except ValueError:
            raise fail(f"--threshold {text!r}: give METRIC=VALUE, e.g. test.hit_rate=0.5") from None
    return thresholds


def show_promotion(view: dict[str, Any]) -> None:
    out.print(f"promotion {view['id']}: {view['state']}")
    out.print(f"  alias {view['alias']} -> version {view['version_id']}")
    for failure in view["failures"]:
        out.print(f"  rejected: {failure}")
    decision = view.get("decision")
    if decision:
        verdict = "approved" if decision["approve"] else "refused"
        out.print(f"  {verdict} by {decision['approver']}: {decision['note']}")
    if view["state"] == "promoted":
        out.print(f"  previous version: {view['previous_version_id'] or 'none'}")


@app.command("status")
def status(
    alias: Annotated[str, typer.Argument(help="The serving alias.")],
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show the alias's latest promotion."""
    with connect_api(api, token) as client:
        show_promotion(
            call_api(client, "GET", f"{PROMOTIONS_PATH}/{alias}", params={"workspace": workspace})
        )


@app.command("decide")
def decide(
    alias: Annotated[str, typer.Argument(help="The serving alias.")],
    approve: Annotated[bool, typer.Option("--approve/--refuse", help="The decision.")],
    note: Annotated[str, typer.Option(help="Why.")] = "",
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Approve or refuse the alias's promotion awaiting a decision (not your own)."""
    with connect_api(api, token) as client:
        view = call_api(
            client,
            "POST",
            f"{PROMOTIONS_PATH}/{alias}/decision",
            params={"workspace": workspace},
            json={"approve": approve, "note": note},
        )
        show_promotion(_follow(client, view, workspace))


def _follow(client: httpx.Client, view: dict[str, Any], workspace: str) -> dict[str, Any]:
    while view["state"] in WAITING:
        time.sleep(FOLLOW_SECONDS)
        view = call_api(
            client, "GET", f"{PROMOTIONS_PATH}/{view['alias']}", params={"workspace": workspace}
        )
    return view


def register_run(client: httpx.Client, workspace: str, run: str) -> str:
    """Register the run ``JOB_ID:POINT_HASH`` as a serving version; its id."""
    job_id, _, point_hash = run.partition(":")
    registered = call_api(
        client,
        "POST",
        VERSIONS_PATH,
        params={"workspace": workspace},
        json={"job_id": job_id, "point_hash": point_hash},
    )
    version: str = registered["version_id"]
    return version


def promote_version(client: httpx.Client, workspace: str, body: dict[str, Any]) -> dict[str, Any]:
    """Start the promotion ``body`` describes and follow it until it ends or awaits a
    decision; its last view."""
    started = call_api(client, "POST", PROMOTIONS_PATH, params={"workspace": workspace}, json=body)
    return _follow(client, started, workspace)


def promote(
    target: Annotated[
        str,
        typer.Argument(help="A version id (or 8+ character prefix), or a run JOB_ID:POINT_HASH."),
    ],
    alias: Annotated[str, typer.Option(help="The serving alias to point at it.")],
    reason: ReasonOption,
    threshold: Annotated[
        list[str] | None,
        typer.Option(help="METRIC=VALUE the run must reach (repeatable), e.g. test.hit_rate=0.5."),
    ] = None,
    approval: Annotated[
        bool, typer.Option("--approval", help="Wait for another editor's decision.")
    ] = False,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Promote a serving version, or an experiment run, behind an alias: preflight, optional
    approval, then the alias repoint. Exits 1 when the promotion is rejected."""
    with connect_api(api, token) as client:
        version = target
        if ":" in target:
            version = register_run(client, workspace, target)
            out.print(f"run {target} is serving version {version}")
        body = {
            "version": version,
            "alias": alias,
            "reason": reason,
            "thresholds": _thresholds(threshold or []),
            "require_approval": approval,
        }
        view = promote_version(client, workspace, body)
    show_promotion(view)
    if view["state"] == "awaiting_approval":
        out.print(f"  waiting for another editor: qmachina promotion decide {alias} --approve")
    if view["state"] == "rejected":
        raise typer.Exit(code=1)


def rollback(
    alias: Annotated[str, typer.Argument(help="The serving alias.")],
    reason: ReasonOption,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Point the alias back at the version it named before its latest activation."""
    with connect_api(api, token) as client:
        result = call_api(
            client,
            "POST",
            f"{ALIASES_PATH}/{alias}/rollback",
            params={"workspace": workspace},
            json={"reason": reason},
        )
    out.print(f"serving alias {alias} now names {result.get('version_id', result)}")
