"""The serving registry API and ``qmachina serving`` for real: the app served by uvicorn over a
SQLite store, with a configs root of its own (a copy of the shipped one, so a test can add a bad
spec) and tokens of the stack's dev issuer. The tests call it over HTTP and through the CLI as
several users and read the store directly: registration (from a spec and from an experiment
run), immutability, alias history, rollback, audit, diffs, refusals with nothing written, and
workspace isolation. One test runs against OpenFGA (the real openfga-sdk against
``tests/openfga_double.py``) to see the routes keep its tuples in step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from activities.sweep import load_sweep, point_params
from qmachina.auth import mint_token
from qmachina.cli import app as cli_app
from qmachina.experiment_archive import ExperimentArchive
from qmachina.serving.snapshot import ServingSnapshot
from qmachina.store import governance
from qmachina.store import repository as repo
from qmachina.store import serving_registry as registry
from qmachina.store.models import AuditEvent, ServingAlias, ServingAliasEvent, ServingVersion
from tests.live_server import ServedApi
from tests.openfga_double import OpenFgaDouble
from tests.test_serving_registry import DERIVATIVE, EMA, EXPERIMENT, copy_configs
from workflows.experiment_sweep import ExperimentSource

SERVING = "/v1/serving"
runner = CliRunner()


class ServingApi(ServedApi):
    """The served API (no route here starts a workflow), reading specs from
    ``<data_dir>/configs`` and dataset files from ``sample_dir``."""

    def __init__(self, data_dir: Path, sample_dir: Path, openfga: OpenFgaDouble | None = None):
        self.sample_dir = sample_dir
        self.configs = copy_configs(data_dir / "configs")
        super().__init__("serving-api", data_dir, openfga)

    def more_settings(self) -> dict[str, Any]:
        return {"configs_dir": self.configs, "sample_data_dir": self.sample_dir}

    def desk(self, slug: str, members: dict[str, str]) -> str:
        """A workspace owned by olivia with these other members; its id."""

        async def create() -> str:
            async with self.sessions.begin() as session:
                workspace = await governance.create_owned_workspace(session, slug, slug, "olivia")
                for subject, role in members.items():
                    await governance.set_member_role(session, workspace.id, subject, role)
                return workspace.id

        return self.run(create())

    def rows(self, workspace_id: str) -> dict[str, int]:
        """How many registry and audit rows the workspace holds."""

        async def count() -> dict[str, int]:
            counts: dict[str, int] = {}
            async with self.sessions() as session:
                for table in (ServingVersion, ServingAlias, ServingAliasEvent, AuditEvent):
                    found = await session.scalar(
                        sa.select(sa.func.count())
                        .select_from(table)
                        .where(table.workspace_id == workspace_id)
                    )
                    counts[table.__tablename__] = int(found or 0)
            return counts

        return self.run(count())

    def audit(self, workspace_id: str) -> list[tuple[str, str, str, dict[str, Any]]]:
        async def trail() -> list[AuditEvent]:
            async with self.sessions() as session:
                return await repo.audit_trail(session, workspace_id)

        return [(e.actor, e.action, e.target, e.payload) for e in self.run(trail())]

    def cli(self, subject: str, *args: str) -> Result:
        """``qmachina serving ARGS`` as ``subject`` against this API and its configs root."""
        return runner.invoke(
            cli_app,
            ["serving", *args, "--api", self.base_url],
            env={
                "QMACHINA_TOKEN": mint_token(self.settings(), subject),
                "QMACHINA_CONFIGS_DIR": str(self.configs),
                "COLUMNS": "250",
            },
        )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Iterator[ServingApi]:
    live = ServingApi(tmp_path_factory.mktemp("serving-api"), sample_dir)
    try:
        live.run(live.start())
        yield live
    finally:
        live.close()


def register(http: httpx.Client, slug: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(f"{SERVING}/versions", params={"workspace": slug}, json=body)


def conforms(api: ServingApi, response: httpx.Response, path: str) -> None:
    """The response is one the served OpenAPI document declares for the operation (status,
    media type, body schema), as the fuzz test checks them."""
    schema = schemathesis.openapi.from_dict(api.app.openapi())
    schema[path][response.request.method].validate_response(response)


def test_registering_twice_gives_one_version(api: ServingApi) -> None:
    workspace_id = api.desk("reg", {"eddie": "editor", "vera": "viewer"})
    with api.as_user("eddie") as eddie:
        first = register(eddie, "reg", {"spec": DERIVATIVE})
        assert first.status_code == 201, first.text
        version = first.json()
        version_id = version["version_id"]
        assert first.headers["location"] == f"{SERVING}/versions/{version_id}"
        assert (version["created"], version["model_id"], version["spec_file"]) == (
            True,
            "derivative_baseline",
            DERIVATIVE,
        )
        conforms(api, first, f"{SERVING}/versions")
        again = register(eddie, "reg", {"spec": DERIVATIVE})
        assert again.status_code == 200, again.text
        assert (again.json()["version_id"], again.json()["created"]) == (version_id, False)
        assert again.json()["snapshot"] == version["snapshot"]
    assert api.rows(workspace_id)["serving_version"] == 1
    assert [(a, action) for a, action, _, _ in api.audit(workspace_id)] == [
        ("eddie", "serving_version.register")
    ]

    with api.as_user("vera") as vera:
        for ref in (version_id, version_id[:8]):
            shown = vera.get(f"{SERVING}/versions/{ref}", params={"workspace": "reg"})
            assert shown.status_code == 200, shown.text
            assert shown.json()["snapshot"] == version["snapshot"]
        conforms(api, shown, f"{SERVING}/versions/{{version_id}}")
        listed = vera.get(f"{SERVING}/versions", params={"workspace": "reg"}).json()
        assert (listed["total"], [v["version_id"] for v in listed["versions"]]) == (
            1,
            [version_id],
        )
        # A viewer reads but registers nothing.
        refused = register(vera, "reg", {"spec": EMA})
        assert refused.status_code == 403
        assert "lacks can_mutate" in refused.json()["detail"]
    snapshot = version["snapshot"]
    assert snapshot["content"]["signal"]["params"]["k_ticks"] == 10
    assert snapshot["lineage"]["dataset_files"][0]["name"] == "esh4-glbx-mdp3-20231225.mbo.dbn.zst"
    # A client can check that the id is the hash of what it was given.
    assert ServingSnapshot.from_stored(snapshot).version_id == version_id


def test_an_invalid_spec_is_refused_by_the_api_and_the_cli_with_nothing_written(
    api: ServingApi,
) -> None:
    workspace_id = api.desk("bad", {"eddie": "editor"})
    bad = api.configs / "serving" / "bad_stream.yaml"
    text = (api.configs / DERIVATIVE).read_text()
    text = text.replace("k_ticks: 10", "k_ticks: -3").replace(
        "{field: bid_depth, role: depth}", "{field: composite, role: depth}"
    )
    bad.write_text(text)
    lines = text.splitlines()
    before = api.rows(workspace_id)
    with api.as_user("eddie") as eddie:
        refused = register(eddie, "bad", {"spec": "serving/bad_stream.yaml"})
        assert refused.status_code == 422, refused.text
        problem = refused.json()
        assert problem["detail"] == "the serving spec is invalid (2 problems)"
        found = {(i["file"], i["line"], i["field"]) for i in problem["issues"]}
        assert found == {
            (
                "serving/bad_stream.yaml",
                next(n for n, line in enumerate(lines, 1) if "k_ticks" in line),
                "signal.params.k_ticks",
            ),
            (
                "serving/bad_stream.yaml",
                next(
                    n for n, line in enumerate(lines, 1) if "field: composite, role: depth" in line
                ),
                "stream.silver[1].field",
            ),
        }
        for path in ("serving/missing.yaml", "../configs/serving/derivative_baseline.yaml"):
            missing = register(eddie, "bad", {"spec": path})
            assert missing.status_code == 404, path
            assert "not found under the configs root" in missing.json()["detail"]
        both = register(eddie, "bad", {"spec": DERIVATIVE, "job_id": "x", "point_hash": "0" * 64})
        assert both.status_code == 422
    cli = api.cli("eddie", "register", str(bad), "--workspace", "bad")
    assert cli.exit_code == 2, cli.output
    assert cli.stderr.startswith("error: HTTP 422: the serving spec is invalid (2 problems)\n")
    assert "serving/bad_stream.yaml:" in cli.stderr
    assert "signal.params.k_ticks" in cli.stderr
    outside = api.data_dir / "elsewhere.yaml"
    outside.write_text(text)
    elsewhere = api.cli("eddie", "register", str(outside), "--workspace", "bad")
    assert elsewhere.exit_code == 2
    assert "is registered from the configs root the API reads" in elsewhere.stderr
    assert api.rows(workspace_id) == before


def test_aliases_repoint_with_history_roll_back_and_audit(api: ServingApi) -> None:
    workspace_id = api.desk("alias", {"eddie": "editor", "vera": "viewer"})
    with api.as_user("eddie") as eddie:
        v1 = register(eddie, "alias", {"spec": DERIVATIVE}).json()["version_id"]
        v2 = register(eddie, "alias", {"spec": EMA}).json()["version_id"]

        def put(version: str, reason: str) -> httpx.Response:
            return eddie.put(
                f"{SERVING}/aliases/es-vp-prod",
                params={"workspace": "alias"},
                json={"version_id": version, "reason": reason},
            )

        created = put(v1[:10], "first activation")
        assert created.status_code == 200, created.text
        assert (created.json()["version_id"], created.json()["changed"]) == (v1, True)
        assert put(v2, "try the EMA").json()["rollback_to"] == v1
        unchanged = put(v2, "again")
        assert unchanged.json()["changed"] is False
        assert put("0" * 64, "nothing").status_code == 404
        blank = put(v1, "   ")
        assert blank.status_code == 422
        bad_name = eddie.put(
            f"{SERVING}/aliases/Prod!",
            params={"workspace": "alias"},
            json={"version_id": v1, "reason": "x"},
        )
        assert bad_name.status_code == 422
        rolled = eddie.post(
            f"{SERVING}/aliases/es-vp-prod/rollback",
            params={"workspace": "alias"},
            json={"reason": "EMA drifts"},
        )
        assert rolled.status_code == 200, rolled.text
        assert (rolled.json()["version_id"], rolled.json()["rollback_to"]) == (v1, None)
        conforms(api, rolled, f"{SERVING}/aliases/{{alias}}/rollback")
        nowhere = eddie.post(
            f"{SERVING}/aliases/es-vp-prod/rollback",
            params={"workspace": "alias"},
            json={"reason": "once more"},
        )
        assert nowhere.status_code == 409
        assert "nothing to roll back to" in nowhere.json()["detail"]
    with api.as_user("vera") as vera:
        alias = vera.get(f"{SERVING}/aliases/es-vp-prod", params={"workspace": "alias"}).json()
        listed = vera.get(f"{SERVING}/aliases", params={"workspace": "alias"}).json()
        refused = vera.post(
            f"{SERVING}/aliases/es-vp-prod/rollback",
            params={"workspace": "alias"},
            json={"reason": "viewers cannot"},
        )
        versions = vera.get(f"{SERVING}/versions", params={"workspace": "alias"}).json()
    assert refused.status_code == 403
    assert [
        (e["seq"], e["kind"], e["from_version_id"], e["to_version_id"], e["actor"], e["reason"])
        for e in alias["history"]
    ] == [
        (1, "set", None, v1, "eddie", "first activation"),
        (2, "set", v1, v2, "eddie", "try the EMA"),
        (3, "rollback", v2, v1, "eddie", "EMA drifts"),
    ]
    assert [(a["name"], a["version_id"], a["model_id"]) for a in listed["aliases"]] == [
        ("es-vp-prod", v1, "derivative_baseline")
    ]
    assert {v["version_id"]: v["aliases"] for v in versions["versions"]} == {
        v1: ["es-vp-prod"],
        v2: [],
    }
    repoints = [
        (actor, action, payload["from"], payload["to"], payload["reason"])
        for actor, action, target, payload in api.audit(workspace_id)
        if target == "serving_alias:es-vp-prod"
    ]
    assert repoints == [
        ("eddie", "serving_alias.repoint", None, v1, "first activation"),
        ("eddie", "serving_alias.repoint", v1, v2, "try the EMA"),
        ("eddie", "serving_alias.rollback", v2, v1, "EMA drifts"),
    ]
    assert api.rows(workspace_id)["serving_alias_event"] == 3


def test_another_workspace_sees_nothing(api: ServingApi) -> None:
    api.desk("mine", {"eddie": "editor"})
    with api.as_user("eddie") as eddie:
        version_id = register(eddie, "mine", {"spec": DERIVATIVE}).json()["version_id"]
        eddie.put(
            f"{SERVING}/aliases/prod",
            params={"workspace": "mine"},
            json={"version_id": version_id, "reason": "go"},
        )
    rival_id = api.run(_owned(api, "rival", "wendy"))
    with api.as_user("wendy") as wendy:
        for workspace in ("mine", "rival"):
            for path, params in (
                (f"{SERVING}/versions/{version_id}", {}),
                (f"{SERVING}/aliases/prod", {}),
                (f"{SERVING}/diff", {"a": "prod", "b": version_id}),
            ):
                response = wendy.get(path, params={"workspace": workspace, **params})
                assert response.status_code == 404, (workspace, path, response.text)
                assert "not found" in response.json()["detail"]
        hijack = wendy.put(
            f"{SERVING}/aliases/prod",
            params={"workspace": "rival"},
            json={"version_id": version_id, "reason": "point at theirs"},
        )
        assert hijack.status_code == 404
        # The same content registered in the rival workspace is a version of its own.
        own = register(wendy, "rival", {"spec": DERIVATIVE})
        assert (own.status_code, own.json()["version_id"]) == (201, version_id)
        assert own.json()["aliases"] == []
    assert api.rows(rival_id)["serving_version"] == 1


async def _owned(api: ServingApi, slug: str, owner: str) -> str:
    async with api.sessions.begin() as session:
        return (await governance.create_owned_workspace(session, slug, slug, owner)).id


def _record_sweep(api: ServingApi, workspace_id: str) -> tuple[str, list[dict[str, Any]]]:
    """A job of the shipped experiment as the API archives it and the sweep records its runs
    (no sweep runs: the points are recorded as a chunk would); its id and the runs' params."""
    archive = ExperimentArchive(api.data_dir / "specs" / "experiments")
    accepted = archive.accept_file(EXPERIMENT, configs_root=api.configs, data_root=api.sample_dir)
    source = ExperimentSource(
        EXPERIMENT, str(api.configs), str(api.sample_dir), str(api.data_dir / "lake")
    )
    sweep = load_sweep(source)
    points = sweep.points[:3]

    async def record() -> str:
        async with api.sessions.begin() as session:
            job = await repo.create_job(session, workspace_id, "sweep", accepted.spec_hash)
            for index, point in enumerate(points):
                await repo.record_run(
                    session,
                    workspace_id,
                    job.id,
                    point.point_hash,
                    params=point_params(point),
                    metrics={"train": {"total_pnl_ticks": 1.0}},
                    status="failed" if index == 2 else "succeeded",
                    spec_hashes=sweep.spec_hashes,
                )
            return job.id

    job_id = api.run(record())
    return job_id, [point_params(point) | {"point_hash": point.point_hash} for point in points]


def test_a_run_registers_with_its_lineage(api: ServingApi) -> None:
    workspace_id = api.desk("runs", {"eddie": "editor"})
    job_id, runs = _record_sweep(api, workspace_id)
    best, other, failed = runs
    with api.as_user("eddie") as eddie:
        created = register(eddie, "runs", {"job_id": job_id, "point_hash": best["point_hash"][:8]})
        assert created.status_code == 201, created.text
        version = created.json()
        lineage = version["snapshot"]["lineage"]
        assert (version["source"], version["experiment_job_id"], version["run_point_hash"]) == (
            "experiment_run",
            job_id,
            best["point_hash"],
        )
        assert lineage["run_point"]["tp_ticks"] == best["tp_ticks"]
        content = version["snapshot"]["content"]
        assert content["signal"]["params"] == best["signal_params"]
        assert content["scoring"]["threshold"] == best["threshold"]
        again = register(eddie, "runs", {"job_id": job_id, "point_hash": best["point_hash"]})
        assert (again.status_code, again.json()["version_id"]) == (200, version["version_id"])

        refused = register(eddie, "runs", {"job_id": job_id, "point_hash": failed["point_hash"]})
        assert refused.status_code == 409
        assert "only a succeeded run can be registered" in refused.json()["detail"]
        unknown = register(eddie, "runs", {"job_id": job_id, "point_hash": "f" * 64})
        assert unknown.status_code == 404

        spec = register(eddie, "runs", {"spec": DERIVATIVE}).json()["version_id"]
        diff = eddie.get(
            f"{SERVING}/diff", params={"workspace": "runs", "a": spec, "b": version["version_id"]}
        )
        assert diff.status_code == 200, diff.text
        conforms(api, diff, f"{SERVING}/diff")
        paths = {change["path"]: change for change in diff.json()["changes"]}
        assert paths["lineage.source"]["a"] == "serving_spec"
        assert paths["lineage.experiment_job_id"] == {
            "path": "lineage.experiment_job_id",
            "change": "changed",
            "a": None,
            "b": job_id,
        }
        # The first points of the sweep differ from the spec's own threshold (0.6) at 0.4.
        assert paths["content.scoring.threshold"]["a"] == 0.6
        assert paths["content.scoring.threshold"]["b"] == best["threshold"]
        same = eddie.get(
            f"{SERVING}/diff", params={"workspace": "runs", "a": spec[:8], "b": spec}
        ).json()
        assert (same["identical"], same["changes"]) == (True, [])
    # Another point is another version.
    second = api.cli(
        "eddie",
        "register",
        "--job",
        job_id,
        "--run",
        other["point_hash"][:12],
        "--workspace",
        "runs",
    )
    assert second.exit_code == 0, second.output
    assert "registered serving version" in second.stdout
    assert api.rows(workspace_id)["serving_version"] == 3


def test_the_cli_registers_activates_rolls_back_and_diffs(api: ServingApi) -> None:
    api.desk("cli", {"eddie": "editor"})
    first = api.cli("eddie", "register", str(api.configs / DERIVATIVE), "--workspace", "cli")
    assert first.exit_code == 0, first.output
    assert "registered serving version" in first.stdout
    again = api.cli("eddie", "register", str(api.configs / DERIVATIVE), "--workspace", "cli")
    assert "already registered: serving version" in again.stdout
    ema = api.cli("eddie", "register", str(api.configs / EMA), "--workspace", "cli", "--json")
    v2 = json.loads(ema.stdout)["version_id"]
    listed = api.cli("eddie", "versions", "--workspace", "cli")
    assert listed.exit_code == 0, listed.output
    assert "2 serving versions in cli" in listed.stdout
    v1 = next(
        line.split()[0] for line in listed.stdout.splitlines() if "derivative_baseline" in line
    )
    assert len(v1) == 12

    created = api.cli("eddie", "alias", "set", "prod", v1, "--reason", "go", "--workspace", "cli")
    assert created.exit_code == 0, created.output
    assert f"created alias prod -> {v1}" in created.stdout
    moved = api.cli(
        "eddie", "alias", "set", "prod", v2[:8], "--reason", "EMA", "--workspace", "cli"
    )
    assert f"prod: {v1} -> {v2} (ema_ensemble_baseline)" in moved.stdout
    same = api.cli("eddie", "alias", "set", "prod", v2, "--reason", "EMA", "--workspace", "cli")
    assert "already points at" in same.stdout

    shown = api.cli("eddie", "alias", "show", "prod", "--workspace", "cli")
    assert shown.exit_code == 0, shown.output
    assert f"alias prod -> {v2} (ema_ensemble_baseline)" in shown.stdout
    assert f"a rollback returns to: {v1}" in shown.stdout
    history = [line.split() for line in shown.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[3], row[4], row[5], row[6]) for row in history] == [
        ("1", "set", "-", v1, "eddie"),
        ("2", "set", v1, v2[:12], "eddie"),
    ]

    diff = api.cli("eddie", "diff", v1, "prod", "--workspace", "cli")
    assert diff.exit_code == 0, diff.output
    assert "differences: a" in diff.stdout
    assert "content.signal.name" in diff.stdout
    version = api.cli("eddie", "show", v1, "--workspace", "cli")
    assert version.exit_code == 0, version.output
    assert "model derivative_baseline" in version.stdout
    assert "signal derivative" in version.stdout

    rolled = api.cli("eddie", "rollback", "prod", "--reason", "drift", "--workspace", "cli")
    assert rolled.exit_code == 0, rolled.output
    assert f"rolled back prod: {v2[:12]} -> " in rolled.stdout
    nowhere = api.cli("eddie", "rollback", "prod", "--reason", "drift", "--workspace", "cli")
    assert nowhere.exit_code == 2
    assert "HTTP 409" in nowhere.stderr
    unknown = api.cli("eddie", "show", "0123456789ab", "--workspace", "cli")
    assert (unknown.exit_code, "HTTP 404" in unknown.stderr) == (2, True)


def test_openfga_holds_the_tuples_of_versions_and_aliases(tmp_path: Path, sample_dir: Path) -> None:
    with OpenFgaDouble() as openfga:
        live = ServingApi(tmp_path, sample_dir, openfga)
        try:
            live.run(live.start())
            # Through the API, so the OpenFGA server learns the roles.
            with live.as_user("olivia") as olivia:
                workspace_id = olivia.post("/v1/workspaces", json={"slug": "fga"}).json()["id"]
                olivia.put("/v1/workspaces/fga/members/eddie", json={"role": "editor"})
            with live.as_user("eddie") as eddie:
                version_id = register(eddie, "fga", {"spec": DERIVATIVE}).json()["version_id"]
                moved = eddie.put(
                    f"{SERVING}/aliases/prod",
                    params={"workspace": "fga"},
                    json={"version_id": version_id, "reason": "go"},
                )
                assert moved.status_code == 200, moved.text

            async def row_ids() -> tuple[str, str]:
                async with live.sessions() as session:
                    version = await registry.get_version(session, workspace_id, version_id)
                    alias = await registry.get_alias(session, workspace_id, "prod")
                    return version.id, alias.id

            version_row, alias_row = live.run(row_ids())
            held = {
                (t.user, t.relation, t.object) for t in openfga.tuples(live.openfga_ids.store_id)
            }
            assert {
                (f"workspace:{workspace_id}", "workspace", f"serving_version:{version_row}"),
                (f"workspace:{workspace_id}", "workspace", f"serving_alias:{alias_row}"),
            } <= held
        finally:
            live.close()
