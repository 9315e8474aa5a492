"""``qmachina serving ...``: serving versions and aliases, through the API.

Like ``qmachina workspace``, every command talks to a running API (``qmachina up``) with a
bearer token (``--token`` / ``QMACHINA_TOKEN``, else one minted for the local user by the dev
issuer), so the API validates, decides who may do what, and audits every change as the token's
subject. An error the API answers (a spec it refuses names every field with its file and line)
is printed as ``error: HTTP <status>: <detail>`` and exits 2. A version may be named by a unique
prefix of its id (8 characters or more) wherever one is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from qmachina.auth.client import StaticBearer
from qmachina.cli_errors import fail, settings_or_fail
from qmachina.specs.pipeline import default_configs_root
from qmachina.sweep_cli import (
    ApiError,
    ApiOption,
    TokenOption,
    WorkspaceOption,
    api_base_url,
    api_client,
    api_request,
    client_auth,
)

SERVING_PATH = "/v1/serving"
SHORT = 12
"""Characters of a version id shown in tables (any unique prefix of 8 or more names it)."""

app = typer.Typer(help="Serving versions and aliases: register, activate, roll back, diff.")
alias_app = typer.Typer(help="Aliases: point them at versions and read their history.")
app.add_typer(alias_app, name="alias")
out = Console(soft_wrap=True, highlight=False)  # ids and paths are copied from here

JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
ReasonOption = Annotated[
    str, typer.Option("--reason", help="Why; recorded in the alias's history and the audit.")
]
AliasArgument = Annotated[str, typer.Argument(help="The alias, e.g. es-vp-prod.")]


def _call(
    api: str | None,
    token: str | None,
    method: str,
    path: str,
    workspace: str,
    params: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """The API's JSON answer in the workspace; an error it answers, or failing to reach it,
    exits 2 with the message."""
    if token:
        auth: httpx.Auth = StaticBearer(token)
    else:
        auth = client_auth(settings_or_fail(), None)
    query = {**(params or {}), "workspace": workspace}
    with api_client(api_base_url(api), auth) as client:
        try:
            return api_request(client, method, SERVING_PATH + path, params=query, **kwargs)
        except ApiError as error:
            raise fail(str(error)) from None


def _short(version_id: str | None) -> str:
    return "-" if version_id is None else version_id[:SHORT]


def _instant(iso: str) -> str:
    return iso[:19].replace("T", " ")


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def spec_reference(file: Path) -> str:
    """``file`` relative to the configs root the API reads (``QMACHINA_CONFIGS_DIR``, else the
    shipped ``configs/``); a file elsewhere cannot be registered and exits 2."""
    if not file.is_file():
        raise fail(f"{file}: file not found")
    configs = (settings_or_fail().configs_dir or default_configs_root()).resolve()
    resolved = file.resolve()
    if not resolved.is_relative_to(configs):
        raise fail(
            f"{file}: a serving spec is registered from the configs root the API reads "
            f"({configs}); put it there (e.g. under serving/) or set QMACHINA_CONFIGS_DIR"
        )
    return resolved.relative_to(configs).as_posix()


def _print_version(version: Mapping[str, Any]) -> None:
    snapshot = version["snapshot"]
    content, lineage = snapshot["content"], snapshot["lineage"]
    pipeline, gold, signal = content["pipeline"], content["gold"], content["signal"]
    out.print(f"serving version [bold]{version['version_id']}[/]")
    out.print(f"  model {version['model_id']}, from {version['source']} {version['spec_file']}")
    out.print(
        f"  registered by {version['registered_by']} at {_instant(version['created_at'])} "
        f"(qmachina {version['code_version']['package']}, "
        f"commit {version['code_version']['git_commit'] or 'unknown'})"
    )
    out.print(f"  aliases: {', '.join(version['aliases']) or '-'}")
    out.print(
        f"  pipeline {pipeline['spec']['name']} {_short(pipeline['pipeline_hash'])}, "
        f"gold {_short(gold['spec_hash'])}"
    )
    out.print(f"  signal {signal['name']} {_value(signal['params'])}")
    scoring = content["scoring"]
    out.print(f"  scoring threshold {scoring['threshold']} ({scoring['side']})")
    if lineage["experiment_job_id"] is not None:
        out.print(
            f"  from experiment job {lineage['experiment_job_id']}, run "
            f"{lineage['run_point_hash']} {_value(lineage['run_point'])}"
        )
    for file in lineage["dataset_files"]:
        out.print(f"  data {file['name']} sha256 {file['sha256']} ({file['size_bytes']:,} bytes)")


def _history_table(alias: Mapping[str, Any]) -> Table:
    table = Table(title=f"history of {alias['name']}", box=box.SIMPLE_HEAD)
    for column in ("#", "at", "kind", "from", "to", "actor", "reason"):
        table.add_column(column, no_wrap=column not in ("reason", "actor"))
    for event in alias["history"]:
        table.add_row(
            str(event["seq"]),
            _instant(event["at"]),
            event["kind"],
            _short(event["from_version_id"]),
            _short(event["to_version_id"]),
            event["actor"],
            event["reason"],
        )
    return table


@app.command("register")
def register(
    file: Annotated[
        Path | None, typer.Argument(help="A ServingSpec YAML under the configs root.")
    ] = None,
    job: Annotated[str | None, typer.Option(help="An experiment job's id (with --run).")] = None,
    run: Annotated[
        str | None, typer.Option(help="The run's point hash, or a unique prefix (with --job).")
    ] = None,
    workspace: WorkspaceOption = "default",
    as_json: JsonOption = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Register a serving version from a serving spec FILE, or from an experiment run (the
    job's serving spec with the run's signal parameters and threshold). The API validates the
    spec as `qmachina config validate` does and registers nothing from an invalid one."""
    if (file is None) == (job is None and run is None):
        raise fail("give either a serving spec FILE, or --job and --run")
    if file is None and (job is None or run is None):
        raise fail("an experiment run is named by both --job and --run")
    body: dict[str, Any] = (
        {"spec": spec_reference(file)} if file is not None else {"job_id": job, "point_hash": run}
    )
    version = _call(api, token, "POST", "/versions", workspace, json=body)
    if as_json:
        out.print_json(json.dumps(version))
        return
    verb = "registered" if version["created"] else "already registered:"
    out.print(f"{verb} serving version [bold]{version['version_id']}[/] ({version['model_id']})")
    out.print(f"  show it: qmachina serving show {version['version_id'][:SHORT]}")


@app.command("versions")
def versions(
    workspace: WorkspaceOption = "default",
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Versions to show.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many newest versions.")] = 0,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """The workspace's serving versions, newest first, with the aliases pointing at each."""
    page = _call(
        api, token, "GET", "/versions", workspace, params={"limit": limit, "offset": offset}
    )
    table = Table(title=f"{page['total']} serving versions in {workspace}", box=box.SIMPLE_HEAD)
    for column in ("version", "model", "source", "registered", "by", "aliases"):
        table.add_column(column, no_wrap=column in ("version", "registered"))
    for version in page["versions"]:
        source = version["spec_file"]
        if version["experiment_job_id"] is not None:
            source = f"run {_short(version['run_point_hash'])} of {version['experiment_job_id']}"
        table.add_row(
            _short(version["version_id"]),
            version["model_id"],
            source,
            _instant(version["created_at"]),
            version["registered_by"],
            ", ".join(version["aliases"]) or "-",
        )
    out.print(table)


@app.command("show")
def show(
    version: Annotated[str, typer.Argument(help="A version id or a unique prefix (8+).")],
    workspace: WorkspaceOption = "default",
    as_json: JsonOption = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """A serving version: what it runs and where it came from (--json: the full snapshot)."""
    found = _call(api, token, "GET", f"/versions/{quote(version, safe='')}", workspace)
    if as_json:
        out.print_json(json.dumps(found))
        return
    _print_version(found)


@alias_app.command("set")
def alias_set(
    alias: AliasArgument,
    version: Annotated[str, typer.Argument(help="A version id or a unique prefix (8+).")],
    reason: ReasonOption,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Point ALIAS at VERSION (creating the alias on first use); audited with your reason."""
    body = {"version_id": version, "reason": reason}
    found = _call(api, token, "PUT", f"/aliases/{quote(alias, safe='')}", workspace, json=body)
    history = found["history"]
    if not found["changed"]:
        out.print(f"{alias} already points at {found['version_id']}; nothing changed")
    elif history[-1]["from_version_id"] is None:
        out.print(f"created alias {alias} -> {found['version_id']} ({found['model_id']})")
    else:
        out.print(
            f"{alias}: {_short(history[-1]['from_version_id'])} -> {found['version_id']} "
            f"({found['model_id']})"
        )


@alias_app.command("show")
def alias_show(
    alias: AliasArgument,
    workspace: WorkspaceOption = "default",
    as_json: JsonOption = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """ALIAS, the version it points at, and its history of repoints."""
    found = _call(api, token, "GET", f"/aliases/{quote(alias, safe='')}", workspace)
    if as_json:
        out.print_json(json.dumps(found))
        return
    out.print(f"alias [bold]{found['name']}[/] -> {found['version_id']} ({found['model_id']})")
    out.print(f"  a rollback returns to: {found['rollback_to'] or 'nothing (no earlier version)'}")
    out.print(_history_table(found))


@alias_app.command("list")
def alias_list(
    workspace: WorkspaceOption = "default", api: ApiOption = None, token: TokenOption = None
) -> None:
    """The workspace's aliases and the version each points at."""
    found = _call(api, token, "GET", "/aliases", workspace)["aliases"]
    table = Table(title=f"{len(found)} aliases in {workspace}", box=box.SIMPLE_HEAD)
    for column in ("alias", "version", "model", "since"):
        table.add_column(column, no_wrap=True)
    for alias in found:
        table.add_row(
            alias["name"],
            _short(alias["version_id"]),
            alias["model_id"],
            _instant(alias["updated_at"]),
        )
    out.print(table)


@app.command("rollback")
def rollback(
    alias: AliasArgument,
    reason: ReasonOption,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Point ALIAS back at the version before its latest activation; audited with your
    reason. Exits 2 when there is none."""
    found = _call(
        api,
        token,
        "POST",
        f"/aliases/{quote(alias, safe='')}/rollback",
        workspace,
        json={"reason": reason},
    )
    last = found["history"][-1]
    out.print(
        f"rolled back {alias}: {_short(last['from_version_id'])} -> {found['version_id']} "
        f"({found['model_id']})"
    )


@app.command("diff")
def diff(
    a: Annotated[str, typer.Argument(help="A version id, a unique prefix, or an alias.")],
    b: Annotated[str, typer.Argument(help="A version id, a unique prefix, or an alias.")],
    workspace: WorkspaceOption = "default",
    as_json: JsonOption = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """What differs between two versions' snapshots, path by path."""
    found = _call(api, token, "GET", "/diff", workspace, params={"a": a, "b": b})
    if as_json:
        out.print_json(json.dumps(found))
        return
    sides = {
        name: f"{side['version_id'][:SHORT]}" + (f" ({side['alias']})" if side["alias"] else "")
        for name, side in (("a", found["a"]), ("b", found["b"]))
    }
    if found["identical"]:
        out.print(f"a {sides['a']} and b {sides['b']} are the same version")
        return
    table = Table(
        title=f"{len(found['changes'])} differences: a {sides['a']}, b {sides['b']}",
        box=box.SIMPLE_HEAD,
    )
    for column in ("path", "change", "a", "b"):
        table.add_column(column, overflow="fold")
    for change in found["changes"]:
        table.add_row(change["path"], change["change"], _value(change["a"]), _value(change["b"]))
    out.print(table)
