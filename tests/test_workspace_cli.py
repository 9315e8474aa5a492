"""``qmachina workspace ...`` against the served API of ``tests/test_api_workspaces.py``: each
command's output, what it changed (read back over HTTP), and the exit code 2 with the API's
problem when it refuses."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner, Result

from qmachina.cli import app
from qmachina.workspace_cli import parse_bytes
from tests.test_api_workspaces import WORKSPACES, WorkspaceApi

runner = CliRunner()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkspaceApi]:
    live = WorkspaceApi(tmp_path_factory.mktemp("workspace-cli"))
    try:
        live.run(live.start())
        yield live
    finally:
        live.close()


def cli(api: WorkspaceApi, subject: str, *args: str) -> Result:
    """``qmachina workspace ARGS`` as ``subject``, on a terminal wide enough for whole rows."""
    return runner.invoke(
        app,
        ["workspace", *args, "--api", api.base_url],
        env={"QMACHINA_TOKEN": api.token(subject), "COLUMNS": "200"},
    )


def limits(api: WorkspaceApi, slug: str) -> tuple[int | None, ...]:
    with api.as_user("carla") as http:
        quotas = http.get(f"{WORKSPACES}/{slug}/quotas").json()
    return (
        quotas["max_concurrent_jobs"]["limit"],
        quotas["max_streams"]["limit"],
        quotas["max_storage_bytes"]["limit"],
        quotas["max_concurrent_chunks"],
    )


def test_create_list_show_and_set_quotas(api: WorkspaceApi) -> None:
    created = cli(api, "carla", "create", "cli-desk", "--name", "CLI desk")
    assert created.exit_code == 0, created.output
    assert "created workspace cli-desk (CLI desk)" in created.stdout
    assert "you are its owner" in created.stdout
    taken = cli(api, "carla", "create", "cli-desk")
    assert taken.exit_code == 2
    assert taken.stderr == "error: HTTP 409: workspace 'cli-desk' already exists\n"
    invalid = cli(api, "carla", "create", "CLI_desk")
    assert invalid.exit_code == 2
    assert invalid.stderr.startswith("error: HTTP 422: invalid request\n  slug: ")

    listed = cli(api, "carla", "list")
    assert listed.exit_code == 0, listed.output
    assert "1 workspaces" in listed.stdout
    assert "cli-desk" in listed.stdout
    assert "owner" in listed.stdout

    set_three = cli(
        api,
        "carla",
        "quotas",
        "cli-desk",
        "--max-concurrent-jobs",
        "3",
        "--max-storage",
        "10GB",
        "--max-concurrent-chunks",
        "2",
    )
    assert set_three.exit_code == 0, set_three.output
    assert limits(api, "cli-desk") == (3, None, 10**10, 2)
    assert cli(api, "carla", "quotas", "cli-desk", "--max-storage", "500MiB").exit_code == 0
    assert cli(api, "carla", "quotas", "cli-desk", "--max-concurrent-jobs", "none").exit_code == 0
    assert limits(api, "cli-desk") == (None, None, 500 * 2**20, 2)

    for option, value, message in (
        ("--max-storage", "10XB", "error: --max-storage: '10XB' is not a size"),
        ("--max-storage", "0.5B", "error: --max-storage: '0.5B' is not a whole number of bytes"),
        ("--max-concurrent-chunks", "0", "error: --max-concurrent-chunks: 0 is less than 1"),
        ("--max-streams", "many", "error: --max-streams: 'many' is neither a whole number"),
    ):
        refused = cli(api, "carla", "quotas", "cli-desk", option, value)
        assert refused.exit_code == 2, (option, value)
        assert refused.stderr.startswith(message), refused.stderr
    assert limits(api, "cli-desk") == (None, None, 500 * 2**20, 2)

    shown = cli(api, "carla", "quotas", "cli-desk")
    assert shown.exit_code == 0, shown.output
    rows = {
        line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines() if "max_" in line
    }
    assert rows["max_concurrent_jobs"] == ["unlimited", "0"]
    assert rows["max_storage_bytes"][:3] == ["524,288,000", "(524.3", "MB)"]
    assert rows["max_concurrent_chunks"] == ["2", "-"]

    detail = cli(api, "carla", "show", "cli-desk")
    assert detail.exit_code == 0, detail.output
    assert "workspace cli-desk (CLI desk)" in detail.stdout
    assert "your role: owner" in detail.stdout
    as_json = json.loads(cli(api, "carla", "show", "cli-desk", "--json").stdout)
    assert as_json["quotas"]["max_concurrent_chunks"] == 2
    hidden = cli(api, "mallory", "show", "cli-desk")
    assert (hidden.exit_code, hidden.stderr) == (
        2,
        "error: HTTP 404: workspace 'cli-desk' not found\n",
    )


def test_members_and_the_audit_trail(api: WorkspaceApi) -> None:
    assert cli(api, "dora", "create", "cli-team").exit_code == 0
    added = cli(api, "dora", "member-set", "cli-team", "bob", "viewer")
    assert added.exit_code == 0, added.output
    assert "added bob to cli-team as viewer" in added.stdout
    changed = cli(api, "dora", "member-set", "cli-team", "bob", "editor")
    assert "bob in cli-team: viewer -> editor" in changed.stdout
    assert "already is editor" in cli(api, "dora", "member-set", "cli-team", "bob", "editor").stdout

    members = cli(api, "bob", "members", "cli-team")
    assert members.exit_code == 0, members.output
    title, *lines = members.stdout.splitlines()
    assert title == "2 members of cli-team"
    rows = [line.split() for line in lines]
    # subject, role, and the date and time it was granted
    assert {row[0]: row[1] for row in rows if len(row) == 4} == {"bob": "editor", "dora": "owner"}

    denied = cli(api, "bob", "audit", "cli-team")
    assert denied.exit_code == 2
    assert denied.stderr.startswith("error: HTTP 403: 'bob' lacks can_read_audit")
    bad_role = cli(api, "dora", "member-set", "cli-team", "bob", "boss")
    assert bad_role.exit_code == 2
    assert bad_role.stderr.startswith("error: HTTP 422: invalid request\n  role: ")
    last = cli(api, "dora", "member-set", "cli-team", "dora", "viewer")
    assert last.exit_code == 2
    assert "HTTP 409: 'dora' is the last owner" in last.stderr

    removed = cli(api, "dora", "member-remove", "cli-team", "bob")
    assert (removed.exit_code, removed.stdout) == (0, "removed bob from cli-team\n")
    gone = cli(api, "dora", "member-remove", "cli-team", "bob")
    assert gone.exit_code == 2
    assert "HTTP 404: 'bob' is not a member" in gone.stderr
    assert cli(api, "bob", "show", "cli-team").exit_code == 2

    trail = cli(api, "dora", "audit", "cli-team")
    assert trail.exit_code == 0, trail.output
    assert "audit of cli-team: 1-4 of 4" in trail.stdout
    actions = [line.split()[3] for line in trail.stdout.splitlines() if "workspace." in line]
    assert actions == [
        "workspace.member_remove",
        "workspace.member_set",
        "workspace.member_set",
        "workspace.create",
    ]
    assert '{"role":"editor","previous":"viewer"}' in trail.stdout
    sets = cli(api, "dora", "audit", "cli-team", "--action", "workspace.member_set", "--limit", "1")
    assert "audit of cli-team: 1-1 of 2" in sets.stdout
    assert "none of 0" in cli(api, "dora", "audit", "cli-team", "--actor", "bob").stdout


def test_an_unreachable_api_is_named() -> None:
    result = runner.invoke(
        app, ["workspace", "list", "--api", "http://127.0.0.1:9", "--token", "t"]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot reach the API at http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000000", 1_000_000),
        ("10GB", 10**10),
        ("10 gb", 10**10),
        ("500MiB", 500 * 2**20),
        ("1.5KB", 1500),
        ("2TiB", 2 * 2**40),
        ("0", 0),
        ("none", None),
    ],
)
def test_sizes_take_decimal_and_binary_units(text: str, size: int | None) -> None:
    assert parse_bytes("--max-storage", text) == size
