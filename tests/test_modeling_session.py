"""Create-a-Model sessions for real: a Temporal dev server, a worker running the session, its
sweeps and promotions over a SQLite store, and the API served by uvicorn.

The model is the derivative baseline over the first twenty minutes of the ES sample, swept over
16 points, so a whole session runs in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import sqlalchemy as sa
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory, WorkflowUpdateFailedError
from typer.testing import CliRunner
from websockets.sync.client import connect

from activities.modeling import ModelingActivities
from activities.promotion import PromotionActivities
from activities.sweep import SweepActivities
from api.app import create_app
from qmachina.auth import mint_token
from qmachina.cli import app as cli
from qmachina.serving import wire
from qmachina.settings import Settings, load_settings
from qmachina.specs.pipeline import default_configs_root, default_data_root
from qmachina.store import governance
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from qmachina.store.models import AuditEvent, ExperimentJob, ExperimentRun
from qmachina.temporal_names import MODELING_TASK_QUEUE, modeling_workflow_id
from tests.live_server import BackgroundLoop, ok, start_dev_server, until
from worker.main import sweep_worker
from workflows.modeling_session import (
    Actor,
    ManualCommit,
    ModelingSession,
    SessionRequest,
    SessionStatus,
    StepCommit,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
REPLAY_DIR = Path(__file__).resolve().parent / "replay"
RECORD_HISTORIES_ENV = "QMACHINA_RECORD_HISTORIES"
CONFIGS = default_configs_root()
SESSIONS = "/v1/modeling/sessions"


def _shipped(relative: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONFIGS / relative).read_text())
    return data


def twenty_minute_pipeline() -> dict[str, Any]:
    """The shipped ES pipeline cut to the first twenty minutes after the Globex open."""
    pipeline = _shipped("pipelines/es_default.yaml")
    pipeline["capture"]["session"] = {"start": "2023-12-25T17:00", "end": "2023-12-25T17:20"}
    return pipeline


def serving_section() -> dict[str, Any]:
    serving = _shipped("serving/derivative_baseline.yaml")
    del serving["pipeline"], serving["gold"]
    return serving


EXPERIMENT_SECTION: dict[str, Any] = {
    "name": "es_session_sweep",
    "dataset": {"train_fraction": 0.5},
    "eval": {
        "tp_ticks": [2, 4],
        "sl_ticks": 2,
        "max_hold_bins": 300,
        "warmup_bins": 100,
        "cooldown_bins": [0, 20],
    },
    "sweep": {"threshold": [0.2, 0.5], "signal_params": {"k_ticks": [4, 8]}},
    "parallelism": {"chunk_points": 4, "max_concurrent_chunks": 2},
    "tracking": {"mlflow": False},
}
"""16 points."""


def model_sections() -> dict[str, dict[str, Any]]:
    return {
        "pipeline": twenty_minute_pipeline(),
        "gold": _shipped("gold/vp_default.yaml"),
        "serving": serving_section(),
        "experiment": EXPERIMENT_SECTION,
    }


class ModelingStack(BackgroundLoop):
    """The API and, unless ``with_worker`` is false, an in-process worker on the sessions'
    queue (the dev server is the stack's own)."""

    def __init__(self, root: Path, *, with_worker: bool = True) -> None:
        self.root = root
        self.store_url = default_sqlite_url(root)
        self.with_worker = with_worker
        super().__init__("modeling-stack")

    async def start(self) -> None:
        self.workspace_id = await bootstrap_store(self.store_url, owner="olivia")
        env = await self.resources.enter_async_context(await start_dev_server())
        self.client: Client = env.client
        self.temporal_address = env.client.service_client.config.target_host
        engine = create_store_engine(self.store_url)
        self.resources.push_async_callback(engine.dispose)
        self.sessions = session_factory(engine)
        async with self.sessions.begin() as session:
            await governance.set_member_role(session, self.workspace_id, "eddie", "editor")
            await governance.set_member_role(session, self.workspace_id, "vera", "viewer")
            await governance.create_owned_workspace(session, "elsewhere", "Elsewhere", "sam")
        if self.with_worker:
            await self.start_worker()
        self.base_url = await self.serve(create_app(self.settings()))

    async def start_worker(self) -> None:
        await self.resources.enter_async_context(
            sweep_worker(
                self.client,
                SweepActivities(self.sessions),
                promotions=PromotionActivities(self.sessions),
                modeling=ModelingActivities(self.sessions),
                task_queue=MODELING_TASK_QUEUE,
                sticky_schedule_to_start=timedelta(seconds=1),
            )
        )

    def settings(self) -> Settings:
        return load_settings(
            data_dir=self.root,
            database_url=self.store_url,
            temporal_address=self.temporal_address,
        )

    def http(self, subject: str) -> httpx.Client:
        token = mint_token(self.settings(), subject)
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            params={"workspace": "default"},
            timeout=60.0,
        )

    def history(self, session_id: str) -> WorkflowHistory:
        handle = self.client.get_workflow_handle(
            modeling_workflow_id(self.workspace_id, session_id)
        )
        return self.run(handle.fetch_history())

    def count(self, table: type[Any]) -> int:
        async def count() -> int:
            async with self.sessions() as session:
                found = await session.scalar(sa.select(sa.func.count()).select_from(table))
            return int(found or 0)

        return self.run(count())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelingStack]:
    live = ModelingStack(tmp_path_factory.mktemp("modeling"))
    try:
        live.run(live.start())
        yield live
    finally:
        live.close()


def _update_events(history: WorkflowHistory) -> int:
    accepted = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    return sum(1 for event in history.events if event.event_type == accepted)


# ---------------------------------------------------------------------- the whole way, API only


def test_a_session_goes_from_data_to_a_streaming_alias_through_the_api(
    stack: ModelingStack,
) -> None:
    with stack.http("eddie") as eddie:
        opened = ok(eddie.post(SESSIONS, json={"title": "ES derivative"}), 201)
        sid = opened["id"]
        assert (opened["state"], opened["next_step"]) == ("designing", 1)
        assert [s["status"] for s in opened["steps"]] == ["open"] + ["locked"] * 5

        pipeline = twenty_minute_pipeline()
        silver = ok(eddie.post(f"{SESSIONS}/{sid}/preview/silver", json={"pipeline": pipeline}))
        assert silver["bins_total"] == 20 * 60 * 10  # 100 ms bins over twenty minutes
        assert len(silver["samples"]) == 20
        ok(eddie.post(f"{SESSIONS}/{sid}/steps/1/commit", json={"payload": pipeline}))

        gold = {"from_file": "gold/vp_default.yaml"}
        stats = ok(eddie.post(f"{SESSIONS}/{sid}/preview/gold", json={"gold": gold}))
        assert {"composite", "flow_state"} <= {o["output"] for o in stats["outputs"]}
        ok(eddie.post(f"{SESSIONS}/{sid}/steps/2/commit", json={"payload": gold}))
        ok(eddie.post(f"{SESSIONS}/{sid}/steps/3/commit", json={"payload": serving_section()}))
        designed = ok(
            eddie.post(f"{SESSIONS}/{sid}/steps/4/commit", json={"payload": EXPERIMENT_SECTION})
        )
        assert designed["next_step"] == 5
        # A committed section is kept whole: the shipped gold spec was read in, not referenced.
        assert designed["steps"][1]["payload"]["nodes"]["composite"]["op"] == "div"

        running = ok(eddie.post(f"{SESSIONS}/{sid}/steps/5/commit", json={"payload": {}}))
        assert running["state"] == "executing"

        def analyzed() -> dict[str, Any] | None:
            view = ok(eddie.get(f"{SESSIONS}/{sid}"))
            assert view["state"] in ("executing", "analyzing"), view
            return view if view["state"] == "analyzing" else None

        view = until(analyzed)
        execution = view["execution"]
        assert (execution["state"], execution["points_recorded"]) == ("succeeded", 16)
        assert view["next_step"] == 6

        decision = {"decision": "promote", "alias": "es-session", "reason": "best training PnL"}
        completed = ok(eddie.post(f"{SESSIONS}/{sid}/steps/6/commit", json={"payload": decision}))
        assert completed["state"] == "completed"
        ok(eddie.post(f"{SESSIONS}/{sid}/promote", json={"reason": "ship it"}))

        def promoted() -> dict[str, Any] | None:
            view = ok(eddie.get(f"{SESSIONS}/{sid}"))
            assert view["state"] in ("promoting", "promoted"), view
            return view if view["state"] == "promoted" else None

        done = until(promoted)
        version_id = done["promotion"]["version_id"]
        log = ok(eddie.get(f"{SESSIONS}/{sid}/decisions"))["entries"]

    actions = [(entry["step"], entry["action"]) for entry in log]
    assert actions == [
        (1, "commit"),
        (2, "commit"),
        (3, "commit"),
        (4, "commit"),
        (5, "commit"),
        (5, "execution"),
        (6, "commit"),
        (6, "promote"),
        (6, "promotion"),
    ]
    assert {entry["actor"] for entry in log if entry["action"] != "execution"} - {"qmachina"} == {
        "eddie"
    }

    token = mint_token(stack.settings(), "vera")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as vera:
        alias = ok(vera.get("/v1/serving/aliases/es-session", params={"workspace": "default"}))
        assert alias["version_id"] == version_id
        version = ok(
            vera.get(f"/v1/serving/versions/{version_id}", params={"workspace": "default"})
        )
    lineage = version["snapshot"]["lineage"]
    assert lineage["modeling_session_id"] == sid
    assert lineage["experiment_job_id"] == execution["job_id"]

    query = urlencode({"serving": "es-session", "workspace": "default", "speed": "1000"})
    url = f"{stack.base_url.replace('http://', 'ws://')}/v1/stream?{query}"
    with connect(url, additional_headers=headers, max_size=None) as ws:
        config = json.loads(ws.recv(timeout=60))
        assert config["type"] == "runtime_config"
        assert config["serving"]["version_id"] == version_id
        kinds: set[wire.FrameType] = set()
        while len(kinds) < 2:
            message = ws.recv(timeout=60)
            if isinstance(message, bytes):
                kinds.add(wire.decode_frame(message).type)
    assert kinds == {wire.FrameType.GRID_UPDATE, wire.FrameType.GOLD_UPDATE}

    if os.environ.get(RECORD_HISTORIES_ENV) == "1":
        history = stack.history(sid)
        (REPLAY_DIR / "modeling_session_promoted.json").write_text(history.to_json())


# ---------------------------------------------------------------------- refusals leave no trace


def test_refused_changes_leave_no_trace_in_history_or_store(stack: ModelingStack) -> None:
    with stack.http("eddie") as eddie, stack.http("vera") as vera, stack.http("sam") as sam:
        sid = ok(eddie.post(SESSIONS, json={"title": "refusals"}), 201)["id"]
        ok(
            eddie.post(
                f"{SESSIONS}/{sid}/steps/1/commit", json={"payload": twenty_minute_pipeline()}
            )
        )

        out_of_order = eddie.post(
            f"{SESSIONS}/{sid}/steps/3/commit", json={"payload": serving_section()}
        )
        assert out_of_order.status_code == 409, out_of_order.text
        assert "step 2 (gold) is next" in out_of_order.json()["detail"]

        bad_gold = {"version": 1, "nodes": {"x": {"op": "no_such_op"}}, "outputs": ["x"]}
        invalid = eddie.post(f"{SESSIONS}/{sid}/steps/2/commit", json={"payload": bad_gold})
        assert invalid.status_code == 422, invalid.text
        assert all(i["field"].startswith("payload.") for i in invalid.json()["issues"])

        missing_data = twenty_minute_pipeline()
        missing_data["capture"]["dataset_files"] = ["nowhere.mbo.dbn.zst"]
        reopened_first = eddie.post(f"{SESSIONS}/{sid}/steps/1/reopen", json={"reason": "x"})
        assert reopened_first.status_code == 200  # reopening is a change: it is in the history
        deep = eddie.post(f"{SESSIONS}/{sid}/steps/1/commit", json={"payload": missing_data})
        assert deep.status_code == 422, deep.text
        assert "nowhere.mbo.dbn.zst" in json.dumps(deep.json()["issues"])
        ok(
            eddie.post(
                f"{SESSIONS}/{sid}/steps/1/commit", json={"payload": twenty_minute_pipeline()}
            )
        )
        before = (
            len(stack.history(sid).events),
            stack.count(AuditEvent),
            stack.count(ExperimentJob),
        )

        viewer = vera.post(
            f"{SESSIONS}/{sid}/steps/2/commit", json={"payload": _shipped("gold/vp_default.yaml")}
        )
        assert viewer.status_code == 403, viewer.text
        stranger = sam.post(f"{SESSIONS}/{sid}/steps/2/commit", json={"payload": {}})
        assert stranger.status_code == 404, stranger.text
        early = eddie.post(f"{SESSIONS}/{sid}/promote", json={})
        assert early.status_code == 409, early.text
        assert "only a completed session can be promoted" in early.json()["detail"]
        assert "2 (gold)" in early.json()["detail"]

        # Straight to the workflow, past the API: its validators refuse on their own.
        handle = stack.client.get_workflow_handle_for(
            ModelingSession.run, modeling_workflow_id(stack.workspace_id, sid)
        )
        gold = _shipped("gold/vp_default.yaml")
        for commit, words in (
            (StepCommit(2, gold, Actor("vera", granted=[])), "may not change"),
            (StepCommit(4, EXPERIMENT_SECTION, Actor("eddie", granted=["can_mutate"])), "is next"),
            (
                StepCommit(2, {"nodes": 3}, Actor("eddie", granted=["can_mutate"])),
                "does not validate",
            ),
        ):
            with pytest.raises(WorkflowUpdateFailedError) as refused:
                stack.run(handle.execute_update(ModelingSession.commit, commit))
            assert words in str(refused.value.cause)

        after = (
            len(stack.history(sid).events),
            stack.count(AuditEvent),
            stack.count(ExperimentJob),
        )
    assert after == before


def test_reopening_a_step_invalidates_the_steps_after_it(stack: ModelingStack) -> None:
    with stack.http("eddie") as eddie:
        sid = ok(eddie.post(SESSIONS, json={}), 201)["id"]
        for step, payload in enumerate(
            [twenty_minute_pipeline(), {"from_file": "gold/vp_default.yaml"}, serving_section()],
            start=1,
        ):
            ok(eddie.post(f"{SESSIONS}/{sid}/steps/{step}/commit", json={"payload": payload}))
        reopened = ok(
            eddie.post(f"{SESSIONS}/{sid}/steps/2/reopen", json={"reason": "try another gold"})
        )
        log = ok(eddie.get(f"{SESSIONS}/{sid}/decisions"))["entries"]
    assert [s["status"] for s in reopened["steps"]] == ["committed", "open"] + ["locked"] * 4
    assert reopened["next_step"] == 2
    last = log[-1]
    assert (last["action"], last["step"], last["payload"]["invalidated"]) == ("reopen", 2, [3])


def test_a_manual_model_fills_the_design_steps_or_points_at_its_lines(
    stack: ModelingStack,
) -> None:
    sections = model_sections()
    with stack.http("eddie") as eddie:
        sid = ok(eddie.post(SESSIONS, json={}), 201)["id"]
        broken = json.loads(json.dumps(sections))
        broken["serving"]["scoring"]["threshold"] = -1
        text = yaml.safe_dump(broken, sort_keys=False)
        refused = eddie.post(f"{SESSIONS}/{sid}/manual", json={"yaml": text})
        assert refused.status_code == 422, refused.text
        issue = refused.json()["issues"][0]
        line = text.splitlines()[issue["line"] - 1]
        assert line.strip() == "threshold: -1"
        assert issue["field"] == "yaml.serving.scoring.threshold"

        filled = ok(eddie.post(f"{SESSIONS}/{sid}/manual", json={"yaml": yaml.safe_dump(sections)}))
    assert [s["status"] for s in filled["steps"]] == ["committed"] * 4 + ["open", "locked"]
    assert filled["steps"][3]["payload"]["name"] == "es_session_sweep"


# ---------------------------------------------------------------------- a worker killed in step 5


def test_a_worker_killed_during_the_execution_does_not_stop_the_session(tmp_path: Path) -> None:
    stack = ModelingStack(tmp_path, with_worker=False)
    try:
        stack.run(stack.start())
        session_id = str(uuid.uuid4())
        request = SessionRequest(
            workspace_id=stack.workspace_id,
            session_id=session_id,
            created_by="olivia",
            configs_root=str(CONFIGS),
            data_root=str(default_data_root()),
            lake_root=str(tmp_path / "lake"),
            sessions_root=str(tmp_path / "modeling"),
            archive_root=str(tmp_path / "archive"),
            point_delay_seconds=0.3,
        )
        log = (tmp_path / "worker.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.main",
                "--address",
                stack.temporal_address,
                "--task-queue",
                MODELING_TASK_QUEUE,
                "--database-url",
                stack.store_url,
                "--sticky-schedule-to-start-seconds",
                "1",
                "--no-tracking",
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        editor = Actor("olivia", granted=["can_mutate"])
        try:
            handle = stack.run(
                stack.client.start_workflow(
                    ModelingSession.run,
                    request,
                    id=modeling_workflow_id(stack.workspace_id, session_id),
                    task_queue=MODELING_TASK_QUEUE,
                )
            )
            stack.run(
                handle.execute_update(
                    ModelingSession.commit_manual, ManualCommit(model_sections(), editor)
                ),
                timeout=120,
            )
            stack.run(handle.execute_update(ModelingSession.commit, StepCommit(5, {}, editor)))

            def mid_sweep() -> bool:
                assert process.poll() is None, (tmp_path / "worker.log").read_text()
                return stack.count(ExperimentRun) >= 3

            until(mid_sweep, timeout=240)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            log.close()
        recorded_before_kill = stack.count(ExperimentRun)
        stack.run(stack.start_worker())

        def analyzed() -> SessionStatus | None:
            status: SessionStatus = stack.run(handle.query(ModelingSession.status))
            assert status.state in ("executing", "analyzing"), status
            return status if status.state == "analyzing" else None

        status = until(analyzed)
        runs = stack.count(ExperimentRun)
    finally:
        stack.close()
    assert recorded_before_kill < 16
    assert status.execution is not None
    assert (status.execution.state, status.execution.points_recorded) == ("succeeded", 16)
    assert runs == 16


# ---------------------------------------------------------------------- the CLI


def test_the_model_commands_drive_a_session_through_the_api(
    stack: ModelingStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QMACHINA_DATA_DIR", str(stack.root))
    runner = CliRunner()
    common = ["--api", stack.base_url, "--token", mint_token(stack.settings(), "eddie")]

    opened = runner.invoke(cli, ["model", "new", "--title", "from the shell", *common])
    assert opened.exit_code == 0, opened.output
    first = opened.stdout.splitlines()[0]
    assert first.endswith("'from the shell': designing")
    sid = first.split()[2]

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(twenty_minute_pipeline()))
    committed = runner.invoke(cli, ["model", "commit", sid, "dataset", str(pipeline), *common])
    assert committed.exit_code == 0, committed.output
    assert "1. dataset          committed by eddie" in committed.stdout
    assert "next: step 2 (gold)" in committed.stdout

    serving = "serving/derivative_baseline.yaml"
    skipped = runner.invoke(cli, ["model", "commit", sid, "3", "--from-file", serving, *common])
    assert skipped.exit_code == 2
    assert "step 2 (gold) is next" in skipped.stderr

    gold = runner.invoke(
        cli, ["model", "commit", sid, "gold", "--from-file", "gold/vp_default.yaml", *common]
    )
    assert gold.exit_code == 0, gold.output
    shown = runner.invoke(cli, ["model", "show", sid, *common])
    assert "next: step 3 (signal)" in shown.stdout

    early = runner.invoke(cli, ["model", "promote", sid, *common])
    assert early.exit_code == 2
    assert "only a completed session can be promoted" in early.stderr

    log = runner.invoke(cli, ["model", "decisions", sid, "--json", *common])
    assert log.exit_code == 0, log.output
    entries = [json.loads(line) for line in log.stdout.splitlines()]
    assert [(e["step"], e["action"], e["actor"]) for e in entries] == [
        (1, "commit", "eddie"),
        (2, "commit", "eddie"),
    ]


# ---------------------------------------------------------------------- a long history


def test_a_session_whose_history_grows_continues_as_new_with_its_state(
    stack: ModelingStack, tmp_path: Path
) -> None:
    session_id = str(uuid.uuid4())
    request = SessionRequest(
        workspace_id=stack.workspace_id,
        session_id=session_id,
        created_by="olivia",
        configs_root=str(CONFIGS),
        data_root=str(default_data_root()),
        lake_root=str(tmp_path / "lake"),
        sessions_root=str(tmp_path / "modeling"),
        archive_root=str(tmp_path / "archive"),
        history_events_limit=12,
    )
    editor = Actor("olivia", granted=["can_mutate"])
    started = stack.run(
        stack.client.start_workflow(
            ModelingSession.run,
            request,
            id=modeling_workflow_id(stack.workspace_id, session_id),
            task_queue=MODELING_TASK_QUEUE,
        )
    )
    first_run = started.result_run_id
    # Not pinned to a run: updates and queries reach whichever run is current.
    handle = stack.client.get_workflow_handle_for(ModelingSession.run, started.id)
    payloads = [twenty_minute_pipeline(), _shipped("gold/vp_default.yaml"), serving_section()]
    for step, payload in enumerate(payloads, start=1):
        stack.run(handle.execute_update(ModelingSession.commit, StepCommit(step, payload, editor)))

    def continued() -> str | None:
        run_id: str = stack.run(handle.describe()).run_id
        return run_id if run_id != first_run else None

    until(continued, timeout=60)
    status: SessionStatus = stack.run(handle.query(ModelingSession.status))
    decisions = stack.run(handle.query(ModelingSession.decisions))
    first = stack.run(stack.client.get_workflow_handle(handle.id, run_id=first_run).fetch_history())
    assert first.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    assert [s.status for s in status.steps] == ["committed"] * 3 + ["open", "locked", "locked"]
    assert status.steps[0].payload == twenty_minute_pipeline()
    assert [(d.step, d.action) for d in decisions] == [(1, "commit"), (2, "commit"), (3, "commit")]
    stack.run(
        handle.execute_update(ModelingSession.commit, StepCommit(4, EXPERIMENT_SECTION, editor))
    )
    after: SessionStatus = stack.run(handle.query(ModelingSession.status))
    assert after.next_step == 5
