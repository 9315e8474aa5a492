"""The Promotion workflow for real: a Temporal dev server, a worker running its activities over a
SQLite store, and a serving version registered from the shipped serving spec over a copy of the
sample data (so a test can change a file under it)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError
from typer.testing import CliRunner

from activities.promotion import PromotionActivities
from activities.sweep import SweepActivities
from api.app import create_app
from qmachina.auth import mint_token
from qmachina.cli import app as cli
from qmachina.experiment_run import metric_at
from qmachina.serving.snapshot import ServingSnapshot, snapshot_from_spec
from qmachina.settings import Settings, load_settings
from qmachina.specs.pipeline import default_configs_root, default_data_root
from qmachina.store import governance
from qmachina.store import serving_registry as registry
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from qmachina.store.models import AuditEvent, ServingVersion
from qmachina.temporal_names import PROMOTION_TASK_QUEUE, promotion_workflow_id
from tests.live_server import BackgroundLoop, start_dev_server
from worker.main import sweep_worker
from workflows.promotion import Decision, Promotion, PromotionRequest, PromotionStatus

SERVING_SPEC = "serving/derivative_baseline.yaml"
REPLAY_DIR = Path(__file__).resolve().parent / "replay"
RECORD_HISTORIES_ENV = "QMACHINA_RECORD_HISTORIES"


class PromotionStack(BackgroundLoop):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_root = root / "data"
        shutil.copytree(default_data_root(), self.data_root)
        self.store_url = default_sqlite_url(root)
        self.task_queue = PROMOTION_TASK_QUEUE  # the API's: this dev server is the test's own
        super().__init__("promotion-stack")

    async def start(self) -> None:
        self.workspace_id = await bootstrap_store(self.store_url, owner="olivia")
        env = await self.resources.enter_async_context(await start_dev_server())
        self.temporal_address = env.client.service_client.config.target_host
        self.client: Client = env.client
        engine = create_store_engine(self.store_url)
        self.resources.push_async_callback(engine.dispose)
        self.sessions = session_factory(engine)
        snapshot = snapshot_from_spec(
            SERVING_SPEC, configs_root=default_configs_root(), data_root=self.data_root
        )
        async with self.sessions.begin() as session:
            registration = await registry.register_version(
                session, self.workspace_id, snapshot, actor="olivia"
            )
        self.version_id = registration.version.version_id
        await self.resources.enter_async_context(
            sweep_worker(
                env.client,
                SweepActivities(self.sessions),
                promotions=PromotionActivities(self.sessions),
                task_queue=self.task_queue,
            )
        )
        async with self.sessions.begin() as session:
            await governance.set_member_role(session, self.workspace_id, "adam", "editor")
        self.base_url = await self.serve(create_app(self.settings()))

    def settings(self) -> Settings:
        return load_settings(
            data_dir=self.root,
            database_url=self.store_url,
            temporal_address=self.temporal_address,
            sample_data_dir=self.data_root,
        )

    def http(self, subject: str) -> httpx.Client:
        token = mint_token(self.settings(), subject)
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            params={"workspace": "default"},
            timeout=30.0,
        )

    def request(self, alias: str, **changes: Any) -> PromotionRequest:
        values: dict[str, Any] = {
            "workspace_id": self.workspace_id,
            "alias": alias,
            "version_id": self.version_id,
            "actor": "olivia",
            "reason": "better test-span hit rate",
            "configs_root": str(default_configs_root()),
            "data_root": str(self.data_root),
        }
        return PromotionRequest(**(values | changes))

    async def promote(self, request: PromotionRequest) -> PromotionStatus:
        return await self.client.execute_workflow(
            Promotion.run, request, id=f"promotion-{uuid.uuid4()}", task_queue=self.task_queue
        )

    async def alias_target(self, alias: str) -> str | None:
        async with self.sessions() as session:
            try:
                return (await registry.get_alias(session, self.workspace_id, alias)).version_id
            except registry.AliasNotFoundError:
                return None

    async def audit_count(self) -> int:
        async with self.sessions() as session:
            count = await session.scalar(sa.select(sa.func.count()).select_from(AuditEvent))
        return int(count or 0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PromotionStack]:
    live = PromotionStack(tmp_path_factory.mktemp("promotion"))
    try:
        live.run(live.start())
        yield live
    finally:
        live.close()


def test_a_version_that_passes_its_preflight_is_put_behind_the_alias(
    stack: PromotionStack,
) -> None:
    status = stack.run(stack.promote(stack.request("es-prod")))
    assert status.state == "promoted", status
    assert status.checks == ["version", "spec", "lineage", "data", "thresholds"]
    assert (status.failures, status.previous_version_id) == ([], None)
    assert stack.run(stack.alias_target("es-prod")) == stack.version_id

    async def history() -> list[tuple[str, str]]:
        async with stack.sessions() as session:
            events = await registry.alias_history(session, stack.workspace_id, "es-prod")
        return [(event.actor, event.to_version_id) for event in events]

    assert stack.run(history()) == [("olivia", stack.version_id)]


def test_a_changed_data_file_rejects_the_promotion_and_writes_nothing(
    stack: PromotionStack,
) -> None:
    [dataset] = snapshot_from_spec(
        SERVING_SPEC, configs_root=default_configs_root(), data_root=stack.data_root
    ).lineage.dataset_files
    path = stack.data_root / dataset.name
    original = path.read_bytes()
    audit_before = stack.run(stack.audit_count())
    path.chmod(0o644)
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        status = stack.run(stack.promote(stack.request("es-tampered")))
    finally:
        path.write_bytes(original)
    assert status.state == "rejected"
    [failure] = status.failures
    assert failure.startswith(f"data: {dataset.name} has sha256 ")
    assert f"registered with {dataset.sha256}" in failure
    assert stack.run(stack.alias_target("es-tampered")) is None
    assert stack.run(stack.audit_count()) == audit_before

    path.unlink()
    try:
        missing = stack.run(stack.promote(stack.request("es-tampered")))
    finally:
        path.write_bytes(original)
    assert missing.failures == [f"data: {dataset.name} is not in {stack.data_root}"]


def test_thresholds_need_the_run_a_version_came_from(stack: PromotionStack) -> None:
    status = stack.run(stack.promote(stack.request("es-gated", thresholds={"test.hit_rate": 0.5})))
    assert status.state == "rejected"
    assert status.failures == [
        "thresholds: the version comes from no experiment run to hold them to"
    ]
    unknown = stack.run(stack.promote(stack.request("es-gated", version_id="f" * 64)))
    assert unknown.state == "rejected"
    assert unknown.checks == ["version"]
    assert unknown.failures[0].startswith("version: ")
    assert stack.run(stack.alias_target("es-gated")) is None


def test_metric_paths_read_numbers_only() -> None:
    metrics = {"test": {"hit_rate": 0.25, "signals": 3, "flag": True}, "train": {}}
    assert metric_at(metrics, "test.hit_rate") == 0.25
    assert metric_at(metrics, "test.signals") == 3.0
    assert metric_at(metrics, "test.flag") is None
    assert metric_at(metrics, "train.hit_rate") is None
    assert metric_at(metrics, "test.hit_rate.x") is None


def _update_events(history_events: Any) -> int:
    return sum(
        1
        for event in history_events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    )


@pytest.mark.parametrize("approve", [True, False])
def test_an_approval_gate_takes_one_decision_from_someone_else(
    stack: PromotionStack, approve: bool
) -> None:
    alias = f"es-gate-{approve}".lower()

    async def scenario() -> tuple[PromotionStatus, str, Any]:
        workflow_id = f"promotion-{uuid.uuid4()}"
        handle = await stack.client.start_workflow(
            Promotion.run,
            stack.request(alias, require_approval=True),
            id=workflow_id,
            task_queue=stack.task_queue,
        )
        while (await handle.query(Promotion.status)).state != "awaiting_approval":
            pass
        with pytest.raises(WorkflowUpdateFailedError):  # the requester approving themself
            await handle.execute_update(Promotion.decide, Decision("olivia", approve=True))
        decided = await handle.execute_update(
            Promotion.decide, Decision("adam", approve=approve, note="checked the lineage")
        )
        assert decided.decision == Decision("adam", approve, "checked the lineage")
        # One decision only: refused by the validator, or by the server once the workflow ended.
        with pytest.raises((WorkflowUpdateFailedError, RPCError)):
            await handle.execute_update(Promotion.decide, Decision("vera", approve=True))
        status = await handle.result()
        history = await handle.fetch_history()
        if os.environ.get(RECORD_HISTORIES_ENV) == "1":
            name = "approved" if approve else "refused"
            (REPLAY_DIR / f"promotion_{name}.json").write_text(history.to_json())
        return status, workflow_id, history

    status, workflow_id, history = stack.run(scenario())
    # Refused decisions never reached the history: one accepted update.
    assert _update_events(history.events) == 1
    if approve:
        assert status.state == "promoted"
        assert stack.run(stack.alias_target(alias)) == stack.version_id

        async def reason() -> str:
            async with stack.sessions() as session:
                [event] = await registry.alias_history(session, stack.workspace_id, alias)
            return event.reason

        assert stack.run(reason()) == (
            f"better test-span hit rate (promotion {workflow_id}, approved by adam)"
        )
    else:
        assert status.state == "rejected"
        assert stack.run(stack.alias_target(alias)) is None


def _until(http: httpx.Client, alias: str, state: str) -> dict[str, Any]:
    for _ in range(200):
        view: dict[str, Any] = http.get(f"/v1/serving/promotions/{alias}").json()
        if view["state"] == state:
            return view
        time.sleep(0.05)
    raise AssertionError(f"promotion of {alias} never reached {state}: {view}")


def test_the_api_promotes_after_someone_else_approves(stack: PromotionStack) -> None:
    body = {
        "version": stack.version_id[:12],
        "alias": "api-prod",
        "reason": "through the API",
        "require_approval": True,
    }
    with stack.http("olivia") as olivia, stack.http("adam") as adam:
        started = olivia.post("/v1/serving/promotions", json=body)
        assert started.status_code == 202, started.text
        assert started.json()["id"] == promotion_workflow_id(stack.workspace_id, "api-prod")
        _until(olivia, "api-prod", "awaiting_approval")
        again = olivia.post("/v1/serving/promotions", json=body)
        assert again.status_code == 409
        assert "is under way" in again.json()["detail"]
        own = olivia.post("/v1/serving/promotions/api-prod/decision", json={"approve": True})
        assert own.status_code == 409
        assert "cannot also approve it" in own.json()["detail"]
        approved = adam.post(
            "/v1/serving/promotions/api-prod/decision", json={"approve": True, "note": "ok"}
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["decision"] == {"approver": "adam", "approve": True, "note": "ok"}
        done = _until(olivia, "api-prod", "promoted")
    assert done["version_id"] == stack.version_id
    assert stack.run(stack.alias_target("api-prod")) == stack.version_id
    with stack.http("olivia") as olivia:
        unknown = olivia.get("/v1/serving/promotions/never")
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "serving alias 'never' has no promotion"


def test_the_cli_promotes_and_reports_a_rejection(
    stack: PromotionStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QMACHINA_DATA_DIR", str(stack.root))
    runner = CliRunner()
    common = ["--api", stack.base_url, "--token", mint_token(stack.settings(), "olivia")]
    promoted = runner.invoke(
        cli, ["promote", stack.version_id[:10], "--alias", "cli-prod", "--reason", "r", *common]
    )
    assert promoted.exit_code == 0, promoted.output
    assert "promoted" in promoted.stdout
    assert stack.run(stack.alias_target("cli-prod")) == stack.version_id
    gated = runner.invoke(
        cli,
        [
            "promote",
            stack.version_id[:10],
            "--alias",
            "cli-gated",
            "--reason",
            "r",
            "--threshold",
            "test.hit_rate=0.5",
            *common,
        ],
    )
    assert gated.exit_code == 1, gated.output
    assert "rejected: thresholds: the version comes from no experiment run" in gated.stdout
    nowhere = runner.invoke(cli, ["rollback", "cli-prod", "--reason", "undo", *common])
    assert nowhere.exit_code == 2
    assert "HTTP 409" in nowhere.stderr
    shown = runner.invoke(cli, ["promotion", "status", "cli-prod", *common])
    assert shown.exit_code == 0, shown.output
    assert "cli-prod -> version" in shown.stdout


async def _store_raw_version(
    stack: PromotionStack, version_id: str, snapshot: dict[str, Any]
) -> None:
    """A version row written past the registry's checks, as an older or newer qMachina, or a
    hand-edited database, might have left it."""
    async with stack.sessions.begin() as session:
        session.add(
            ServingVersion(
                workspace_id=stack.workspace_id,
                version_id=version_id,
                model_id="derivative_baseline",
                source="serving_spec",
                snapshot=snapshot,
                registered_by="elsewhere",
            )
        )


def test_a_snapshot_this_code_cannot_read_is_rejected(stack: PromotionStack) -> None:
    async def stored() -> dict[str, Any]:
        async with stack.sessions() as session:
            version = await registry.get_version(session, stack.workspace_id, stack.version_id)
        return dict(version.snapshot)

    newer = stack.run(stored())
    newer["content"] = {**newer["content"], "schema_2_field": {"added": "later"}}
    stack.run(_store_raw_version(stack, "e" * 64, newer))
    status = stack.run(stack.promote(stack.request("es-newer", version_id="e" * 64)))
    assert status.state == "rejected"
    assert status.checks == ["version", "spec"]
    [failure] = status.failures
    assert failure.startswith("spec: the stored snapshot is not one this code serves")
    assert stack.run(stack.alias_target("es-newer")) is None


def test_a_snapshot_without_its_data_lineage_is_rejected(stack: PromotionStack) -> None:
    snapshot = snapshot_from_spec(
        SERVING_SPEC, configs_root=default_configs_root(), data_root=stack.data_root
    )
    bare = ServingSnapshot.of(
        snapshot.content, snapshot.lineage.model_copy(update={"dataset_files": ()})
    )
    stack.run(_store_raw_version(stack, bare.version_id, bare.stored()))
    status = stack.run(stack.promote(stack.request("es-bare", version_id=bare.version_id)))
    assert status.state == "rejected"
    assert status.failures == ["lineage: no dataset file is recorded"]
    assert stack.run(stack.alias_target("es-bare")) is None
