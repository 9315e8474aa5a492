"""``qmachina workspace ...``: workspaces, their members, quotas and audit trail, through the API.

Like ``qmachina sweep``, every command talks to a running API (``qmachina up``) with a bearer
token (``--token`` / ``QMACHINA_TOKEN``, else one minted for the local user by the dev issuer),
so the API decides who may do what and audits every change as the token's subject. An error the
API answers is printed as ``error: HTTP <status>: <detail>`` and exits 2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich import box
from rich.console import Console
from rich.filesize import decimal as decimal_size
from rich.table import Table

from qmachina.cli_errors import fail
from qmachina.sweep_cli import (
    ApiError,
    ApiOption,
    TokenOption,
    api_request,
    connect_api,
)

WORKSPACES_PATH = "/v1/workspaces"
UNLIMITED = ("none", "unlimited")
"""What a quota option takes to remove the limit."""
BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)

app = typer.Typer(help="Workspaces: members, quotas and audit trail (through the API).")
out = Console(soft_wrap=True, highlight=False)  # slugs, ids and subjects are copied from here

SlugArgument = Annotated[str, typer.Argument(help="The workspace's slug.")]
QuotaOption = Annotated[
    str | None, typer.Option(metavar="N|none", help="A count; `none` removes the limit.")
]


def _call(api: str | None, token: str | None, method: str, path: str, **kwargs: Any) -> Any:
    """The API's JSON answer (None for 204); an error it answers, or failing to reach it, exits
    2 with the message."""
    with connect_api(api, token) as client:
        try:
            return api_request(client, method, path, **kwargs)
        except ApiError as error:
            raise fail(str(error)) from None


def _path(slug: str, *parts: str) -> str:
    """The workspace's resource path, each segment escaped (subjects may hold ``/`` or ``:``)."""
    return "/".join([WORKSPACES_PATH, *(quote(part, safe="") for part in (slug, *parts))])


def parse_count(option: str, text: str, floor: int) -> int | None:
    """A quota option's value: ``none`` (no limit) or a whole number of at least ``floor``."""
    if text.strip().lower() in UNLIMITED:
        return None
    try:
        value = int(text)
    except ValueError:
        raise fail(f"{option}: {text!r} is neither a whole number nor `none`") from None
    if value < floor:
        raise fail(f"{option}: {value} is less than {floor}")
    return value


def parse_bytes(option: str, text: str) -> int | None:
    """``none``, or a size in bytes: ``1000000``, ``10GB`` (powers of 1000), ``500MiB``
    (powers of 1024), ``1.5TB``."""
    if text.strip().lower() in UNLIMITED:
        return None
    found = SIZE.match(text)
    unit = found.group(2).lower() if found else ""
    if found is None or unit not in BYTE_UNITS:
        raise fail(
            f"{option}: {text!r} is not a size: a number of bytes, optionally with a unit "
            "(KB, MB, GB, TB, KiB, MiB, GiB, TiB), or `none`"
        )
    size = Decimal(found.group(1)) * BYTE_UNITS[unit]
    if size != size.to_integral_value():
        raise fail(f"{option}: {text!r} is not a whole number of bytes")
    return int(size)


def _limit(value: int | None, in_bytes: bool = False) -> str:
    if value is None:
        return "unlimited"
    return f"{value:,} ({decimal_size(value)})" if in_bytes and value >= 1000 else f"{value:,}"


def _instant(iso: str) -> str:
    """An API timestamp to the second, as people read it (``2026-01-31 14:05:09``)."""
    return iso[:19].replace("T", " ")


def quotas_table(quotas: Mapping[str, Any]) -> Table:
    """Each quota's limit and current use, and the bound on a sweep's concurrent chunks."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("quota")
    table.add_column("limit", justify="right")
    table.add_column("current", justify="right")
    for name in ("max_concurrent_jobs", "max_streams", "max_storage_bytes"):
        in_bytes = name == "max_storage_bytes"
        state = quotas[name]
        table.add_row(name, _limit(state["limit"], in_bytes), _limit(state["current"], in_bytes))
    chunks = quotas["max_concurrent_chunks"]
    table.add_row(
        "max_concurrent_chunks", "each sweep's own" if chunks is None else str(chunks), "-"
    )
    return table


@app.command("create")
def create(
    slug: Annotated[
        str, typer.Argument(help="Lowercase letters, digits and `-`, at most 64 characters.")
    ],
    name: Annotated[str | None, typer.Option(help="A display name (default: the slug).")] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Create a workspace; you become its owner."""
    body: dict[str, Any] = {"slug": slug} | ({"name": name} if name else {})
    workspace = _call(api, token, "POST", WORKSPACES_PATH, json=body)
    out.print(
        f"created workspace [bold]{workspace['slug']}[/] ({workspace['name']}), "
        f"id {workspace['id']}; you are its {workspace['role']}"
    )


@app.command("list")
def list_workspaces(api: ApiOption = None, token: TokenOption = None) -> None:
    """The workspaces you can read, with your role in each."""
    found = _call(api, token, "GET", WORKSPACES_PATH)["workspaces"]
    table = Table(title=f"{len(found)} workspaces", box=box.SIMPLE_HEAD)
    for column in ("slug", "name", "role", "id"):
        table.add_column(column, no_wrap=column != "name")
    for workspace in found:
        table.add_row(
            workspace["slug"], workspace["name"], workspace["role"] or "-", workspace["id"]
        )
    out.print(table)


@app.command("show")
def show(
    slug: SlugArgument,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """A workspace, your role in it, and its quotas with their current use."""
    workspace = _call(api, token, "GET", _path(slug))
    if as_json:
        out.print_json(json.dumps(workspace))
        return
    out.print(f"workspace [bold]{workspace['slug']}[/] ({workspace['name']})")
    out.print(f"  id {workspace['id']}, created {_instant(workspace['created_at'])}")
    out.print(f"  your role: {workspace['role'] or '-'}")
    out.print(quotas_table(workspace["quotas"]))


@app.command("members")
def members(slug: SlugArgument, api: ApiOption = None, token: TokenOption = None) -> None:
    """The workspace's members and their roles."""
    found = _call(api, token, "GET", _path(slug, "members"))["members"]
    table = Table(title=f"{len(found)} members of {slug}", box=box.SIMPLE_HEAD)
    for column in ("subject", "role", "since"):
        table.add_column(column, no_wrap=True)
    for member in found:
        table.add_row(member["subject"], member["role"], _instant(member["created_at"]))
    out.print(table)


@app.command("member-set")
def member_set(
    slug: SlugArgument,
    subject: Annotated[str, typer.Argument(help="The member's OIDC subject.")],
    role: Annotated[str, typer.Argument(help="owner, admin, editor or viewer.")],
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Give a subject a role in the workspace, adding them if needed (admins; only owners grant
    or take away the owner role)."""
    member = _call(api, token, "PUT", _path(slug, "members", subject), json={"role": role})
    previous = member["previous"]
    if previous is None:
        out.print(f"added {member['subject']} to {slug} as {member['role']}")
    elif previous == member["role"]:
        out.print(f"{member['subject']} already is {member['role']} in {slug}")
    else:
        out.print(f"{member['subject']} in {slug}: {previous} -> {member['role']}")


@app.command("member-remove")
def member_remove(
    slug: SlugArgument,
    subject: Annotated[str, typer.Argument(help="The member's OIDC subject.")],
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Take a subject out of the workspace (admins; only owners remove an owner)."""
    _call(api, token, "DELETE", _path(slug, "members", subject))
    out.print(f"removed {subject} from {slug}")


@app.command("quotas")
def quotas(
    slug: SlugArgument,
    max_concurrent_jobs: QuotaOption = None,
    max_streams: QuotaOption = None,
    max_storage: Annotated[
        str | None,
        typer.Option(
            metavar="BYTES|none",
            help="Bytes of lake artifacts: 1000000, 10GB, 500MiB; `none` removes the limit.",
        ),
    ] = None,
    max_concurrent_chunks: Annotated[
        str | None,
        typer.Option(
            metavar="N|none",
            help="Chunks of one sweep run at once (at least 1); `none`: each sweep's own.",
        ),
    ] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show the workspace's quotas with their current use; with options, change those named
    (admins) and show the result."""
    changes: dict[str, int | None] = {}
    if max_concurrent_jobs is not None:
        changes["max_concurrent_jobs"] = parse_count(
            "--max-concurrent-jobs", max_concurrent_jobs, 0
        )
    if max_streams is not None:
        changes["max_streams"] = parse_count("--max-streams", max_streams, 0)
    if max_storage is not None:
        changes["max_storage_bytes"] = parse_bytes("--max-storage", max_storage)
    if max_concurrent_chunks is not None:
        changes["max_concurrent_chunks"] = parse_count(
            "--max-concurrent-chunks", max_concurrent_chunks, 1
        )
    if changes:
        found = _call(api, token, "PATCH", _path(slug, "quotas"), json=changes)
        out.print(f"quotas of {slug} set: {', '.join(changes)}")
    else:
        found = _call(api, token, "GET", _path(slug, "quotas"))
    out.print(quotas_table(found))


@app.command("audit")
def audit(
    slug: SlugArgument,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Events to show.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many newest events.")] = 0,
    action: Annotated[
        str | None, typer.Option(help="Only this action, e.g. workspace.member_set.")
    ] = None,
    actor: Annotated[str | None, typer.Option(help="Only this actor's events.")] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """The workspace's audit trail, newest first (admins and owners)."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    params |= {key: value for key, value in (("action", action), ("actor", actor)) if value}
    page = _call(api, token, "GET", _path(slug, "audit"), params=params)
    events = page["events"]
    shown = f"{offset + 1}-{offset + len(events)}" if events else "none"
    table = Table(title=f"audit of {slug}: {shown} of {page['total']}", box=box.SIMPLE_HEAD)
    for column in ("at", "actor", "action", "target", "payload"):
        table.add_column(column, no_wrap=column in ("at", "action"))
    for event in events:
        table.add_row(
            _instant(event["created_at"]),
            event["actor"],
            event["action"],
            event["target"],
            json.dumps(event["payload"], separators=(",", ":")),
        )
    out.print(table)
