"""Live ingestion sessions for real: the local Databento-compatible gateway serving the ES
sample, a Temporal dev server, a worker running the session workflow and its ingestion activity
with the official client, and the API.

What a session writes to bronze must be the gateway's tape for its subscription, byte for byte:
through faults, reconnects and a killed worker.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from typer.testing import CliRunner

from activities.live import LiveActivities
from activities.sweep import SweepActivities
from api.app import create_app
from qmachina.auth import mint_token
from qmachina.cli import app as cli
from qmachina.live.bronze import read_bronze_file
from qmachina.live.gateway import GatewayThread, LiveGateway
from qmachina.live.gateway_faults import Fault, FaultKind
from qmachina.live.gateway_tape import Tape, load_tape
from qmachina.settings import Settings, load_settings
from qmachina.store import live_sessions
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from qmachina.store.models import AuditEvent, ContractRollEvent
from qmachina.temporal_names import LIVE_TASK_QUEUE, live_workflow_id
from tests.live_server import BackgroundLoop, ok, start_dev_server, until
from tests.live_tapes import ESH4, ESM4, STEP_NS, T0, mbo_flow, write_tape
from tests.ports import free_port
from worker.main import sweep_worker
from workflows.live_session import (
    LiveIngestionSession,
    LiveSessionRequest,
    LiveStatus,
    Reconnect,
    StopRequest,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
REPLAY_DIR = Path(__file__).resolve().parent / "replay"
RECORD_HISTORIES_ENV = "QMACHINA_RECORD_HISTORIES"
KEY = "db-" + "s" * 24 + "tests"
DATASET = "GLBX.MDP3"
SECOND = 1_000_000_000
LIVE_PATH = "/v1/ingestion/live/sessions"
FAST = Reconnect(initial_seconds=0.05, multiplier=2.0, max_seconds=0.5, jitter=0.25)


@pytest.fixture(scope="module")
def tape(sample_dir: Path) -> Tape:
    return load_tape([sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst"])


def bronze_records(root: Path, session_id: str) -> list[bytes]:
    """Every complete record the session's bronze holds, in file order."""
    records: list[bytes] = []
    for path in sorted((root / session_id).glob("*.mbo.dbn")):
        _, block = read_bronze_file(path)
        records += [block.data[block.offsets[i] : block.offsets[i + 1]] for i in range(len(block))]
    return records


class LiveStack(BackgroundLoop):
    """The API and, unless ``with_worker`` is false, an in-process worker holding ``key``."""

    def __init__(self, root: Path, *, key: str = KEY, with_worker: bool = True) -> None:
        self.root = root
        self.store_url = default_sqlite_url(root)
        self.key = key
        self.with_worker = with_worker
        self.gateway_port = 0
        super().__init__("live-stack")

    async def start(self) -> None:
        self.workspace_id = await bootstrap_store(self.store_url, owner="olivia")
        env = await self.resources.enter_async_context(await start_dev_server())
        self.client: Client = env.client
        self.temporal_address = env.client.service_client.config.target_host
        engine = create_store_engine(self.store_url)
        self.resources.push_async_callback(engine.dispose)
        self.sessions = session_factory(engine)
        if self.with_worker:
            await self.start_worker()

    async def start_worker(self) -> None:
        await self.resources.enter_async_context(
            sweep_worker(
                self.client,
                SweepActivities(self.sessions),
                live=LiveActivities(self.client, self.sessions, SecretStr(self.key)),
                task_queue=LIVE_TASK_QUEUE,
                sticky_schedule_to_start=timedelta(seconds=1),
            )
        )

    async def serve_api(self, gateway_port: int) -> None:
        self.gateway_port = gateway_port
        self.base_url = await self.serve(create_app(self.settings()))

    @property
    def bronze_root(self) -> Path:
        return self.root / "lake" / "bronze" / "live"

    def settings(self) -> Settings:
        return load_settings(
            data_dir=self.root,
            database_url=self.store_url,
            temporal_address=self.temporal_address,
            databento_live_gateway="127.0.0.1",
            databento_live_port=self.gateway_port or 13000,
        )

    def http(self, subject: str) -> httpx.Client:
        token = mint_token(self.settings(), subject)
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            params={"workspace": "default"},
            timeout=30.0,
        )

    def request(self, session_id: str, **changes: Any) -> LiveSessionRequest:
        values: dict[str, Any] = {
            "workspace_id": self.workspace_id,
            "session_id": session_id,
            "created_by": "olivia",
            "dataset": DATASET,
            "symbols": ["ESH4"],
            "bronze_root": str(self.bronze_root),
            "gateway_host": "127.0.0.1",
            "gateway_port": self.gateway_port,
            "reconnect": FAST,
            "watchdog_seconds": 6.0,
            "report_every_seconds": 0.5,
            "heartbeat_timeout_seconds": 3.0,
        }
        return LiveSessionRequest(**(values | changes))

    def start_session(
        self, request: LiveSessionRequest
    ) -> WorkflowHandle[LiveIngestionSession, LiveStatus]:
        async def start() -> WorkflowHandle[LiveIngestionSession, LiveStatus]:
            async with self.sessions.begin() as session:
                await live_sessions.create_session(
                    session,
                    self.workspace_id,
                    session_id=request.session_id,
                    dataset=request.dataset,
                    subscription={"symbols": request.symbols, "stype_in": request.stype_in},
                    created_by="olivia",
                    workflow_id=live_workflow_id(self.workspace_id, request.session_id),
                )
            return await self.client.start_workflow(
                LiveIngestionSession.run,
                request,
                id=live_workflow_id(self.workspace_id, request.session_id),
                task_queue=LIVE_TASK_QUEUE,
            )

        return self.run(start())


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / SECOND, tz=UTC).isoformat()


# ------------------------------------------------------------ start, reconnect, resume, stop


def test_a_session_started_faulted_resumed_and_stopped_through_the_api(
    tape: Tape, tmp_path: Path
) -> None:
    """The seed's first validation scenario: start, a reset mid-stream, reconnection with
    replay from the checkpoint, stop; bronze is the tape, byte for byte."""
    start_at = tape.end_ns - 600 * SECOND  # ten minutes of flow, at 200x: three seconds
    faults = [Fault(FaultKind.RESET, after_records=1500)]
    gateway = LiveGateway(tape, keys=[KEY], speed=200.0, start_at=start_at, faults=faults)
    stack = LiveStack(tmp_path)
    try:
        stack.run(stack.start())
        with GatewayThread(gateway) as gw:
            stack.run(stack.serve_api(gw.port))
            with stack.http("olivia") as olivia:
                expected = gw.tape_records("mbo", "ESH4", start=start_at)
                body: dict[str, Any] = {
                    "dataset": DATASET,
                    "symbols": ["ESH4"],
                    "start": iso(start_at),
                    "watchdog_seconds": 6.0,
                    "report_every_seconds": 0.5,
                }
                too_short = olivia.post(LIVE_PATH, json=body | {"watchdog_seconds": 5})
                assert too_short.status_code == 422, too_short.text
                assert "watchdog_seconds" in too_short.text
                started = ok(olivia.post(LIVE_PATH, json=body), 201)
                sid = started["id"]
                assert started["state"] in ("starting", "running")

                def caught_up() -> dict[str, Any] | None:
                    view = ok(olivia.get(f"{LIVE_PATH}/{sid}"))
                    assert view["state"] == "running", view
                    return view if view["records_written"] >= len(expected) else None

                running = until(caught_up)
                ok(olivia.post(f"{LIVE_PATH}/{sid}/stop", json={"reason": "end of test"}), 202)

                def stopped() -> dict[str, Any] | None:
                    view = ok(olivia.get(f"{LIVE_PATH}/{sid}"))
                    return view if view["state"] == "stopped" else None

                final = until(stopped)
                again = ok(olivia.post(f"{LIVE_PATH}/{sid}/stop", json={}), 202)
        history = stack.run(
            stack.client.get_workflow_handle(
                live_workflow_id(stack.workspace_id, sid)
            ).fetch_history()
        )
        audits = stack.run(_audit_actions(stack))
    finally:
        stack.close()

    assert running["connection"] == "connected"
    assert running["reconnects"] >= 1
    assert "reset" in running["last_error"]
    assert (final["stopped_by"], final["connection"]) == ("olivia", "closed")
    assert again["state"] == "stopped"  # a stop after the end changes nothing
    assert final["records_written"] == len(expected)
    assert bronze_records(stack.bronze_root, sid) == expected
    assert audits == ["live_session.start", "live_session.stop", "live_session.stop"]
    if os.environ.get(RECORD_HISTORIES_ENV) == "1":
        (REPLAY_DIR / "live_session_stopped.json").write_text(history.to_json())


async def _audit_actions(stack: LiveStack) -> list[str]:
    async with stack.sessions() as session:
        rows = await session.scalars(
            sa.select(AuditEvent.action)
            .where(AuditEvent.action.like("live_session.%"))
            .order_by(AuditEvent.created_at)
        )
    return list(rows)


# ---------------------------------------------------------------------- a killed worker


def test_every_fault_and_a_killed_worker_lose_and_repeat_nothing(
    tape: Tape, tmp_path: Path
) -> None:
    """The fault campaign at the session level: every kind of gateway fault, each at a seeded
    random point, and the worker SIGKILLed mid-stream. The gateway opens once the worker's
    ingestion runs (a cold worker takes a while to start): fifteen minutes of flow at 30x."""
    start_at = tape.end_ns - 900 * SECOND
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    faults = [
        Fault(FaultKind.RESET, after_records=rng.randrange(200, 1500)),
        Fault(FaultKind.CLOSE, after_records=rng.randrange(200, 1500)),
        Fault(FaultKind.ERROR, after_records=rng.randrange(200, 1500), message="trouble"),
        # Longer than the session's watchdog (6 s): the silence itself is the fault.
        Fault(FaultKind.STALL, after_records=rng.randrange(200, 1500), seconds=7.0),
        Fault(FaultKind.DOWN, at_ns=start_at + rng.randrange(60, 840) * SECOND, seconds=2.0),
    ]
    assert {fault.kind for fault in faults} == set(FaultKind) - {FaultKind.ROLL}
    port = free_port()
    stack = LiveStack(tmp_path, with_worker=False)
    stack.gateway_port = port
    log = (tmp_path / "worker.log").open("w")
    process: subprocess.Popen[bytes] | None = None
    try:
        stack.run(stack.start())
        worker = process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.main",
                "--address",
                stack.temporal_address,
                "--task-queue",
                LIVE_TASK_QUEUE,
                "--database-url",
                stack.store_url,
                "--sticky-schedule-to-start-seconds",
                "1",
                "--no-tracking",
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DATABENTO_API_KEY": KEY},
        )
        session_id = str(uuid.uuid4())
        handle = stack.start_session(stack.request(session_id, start=start_at))

        def ingesting() -> bool:
            assert worker.poll() is None, log_text(tmp_path)
            status: LiveStatus = stack.run(handle.query(LiveIngestionSession.status))
            return status.report.reported_at is not None

        until(ingesting, timeout=180)
        gateway = LiveGateway(
            tape, keys=[KEY], port=port, speed=30.0, start_at=start_at, faults=faults
        )
        with GatewayThread(gateway) as gw:
            expected = gw.tape_records("mbo", "ESH4", start=start_at)
            try:
                until(lambda: len(bronze_records(stack.bronze_root, session_id)) >= 2000)
            finally:
                worker.send_signal(signal.SIGKILL)
                worker.wait()
            at_kill = len(bronze_records(stack.bronze_root, session_id))
            stack.run(stack.start_worker())
            until(
                lambda: len(bronze_records(stack.bronze_root, session_id)) >= len(expected),
                timeout=120,
            )
            stack.run(handle.signal(LiveIngestionSession.stop, StopRequest("olivia", "test")))
            status = stack.run(handle.result())
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        log.close()
        stack.close()
    assert 2000 <= at_kill < len(expected), f"seed {seed}"
    assert status.state == "stopped", f"seed {seed}"
    assert bronze_records(stack.bronze_root, session_id) == expected, f"seed {seed}"
    assert [gateway.fired(index) for index in range(len(faults))] == [True] * len(faults), seed


def log_text(root: Path) -> str:
    return (root / "worker.log").read_text()


# ---------------------------------------------------------------------- a refused key


def test_a_refused_key_fails_the_session_without_retrying(tape: Tape, tmp_path: Path) -> None:
    gateway = LiveGateway(tape, keys=[KEY], speed=1.0, start_at=tape.end_ns - 60 * SECOND)
    stack = LiveStack(tmp_path, key="db-" + "w" * 24 + "wrong")
    try:
        stack.run(stack.start())
        with GatewayThread(gateway) as gw:
            stack.gateway_port = gw.port
            handle = stack.start_session(stack.request(str(uuid.uuid4())))
            began = time.monotonic()
            status = stack.run(handle.result(), timeout=60)
            took = time.monotonic() - began
            history = stack.run(handle.fetch_history())
    finally:
        stack.close()
    assert status.state == "failed"
    assert "LiveAuthenticationError" in status.error
    assert "auth" in status.error.lower()
    assert KEY not in status.error  # no key in messages
    assert "wrong" not in status.error
    started = EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    assert sum(1 for e in history.events if e.event_type == started) == 1  # one attempt only
    assert took < 30


# ---------------------------------------------------------------------- the CLI


def test_the_live_commands_start_show_and_stop_a_session(
    tape: Tape, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = LiveGateway(tape, keys=[KEY], speed=math.inf, start_at=tape.end_ns - SECOND)
    stack = LiveStack(tmp_path)
    try:
        stack.run(stack.start())
        with GatewayThread(gateway) as gw:
            stack.run(stack.serve_api(gw.port))
            monkeypatch.setenv("QMACHINA_DATA_DIR", str(stack.root))
            runner = CliRunner()
            common = ["--api", stack.base_url, "--token", mint_token(stack.settings(), "olivia")]
            started = runner.invoke(
                cli, ["live", "start", "ESH4", "--watchdog-seconds", "6", *common]
            )
            assert started.exit_code == 0, started.output
            sid = started.stdout.split()[2].rstrip(":")
            until(
                lambda: "(connected)" in runner.invoke(cli, ["live", "status", sid, *common]).stdout
            )
            # The tape is over: a quiet market, longer than the watchdog. The gateway's
            # heartbeats (asked for every 5 s) keep the session connected.
            time.sleep(8)
            quiet = runner.invoke(cli, ["live", "status", sid, *common]).stdout
            stopped = runner.invoke(cli, ["live", "stop", sid, "--reason", "done", *common])
            assert stopped.exit_code == 0, stopped.output
            until(
                lambda: ": stopped" in runner.invoke(cli, ["live", "status", sid, *common]).stdout
            )
            listed = runner.invoke(cli, ["live", "list", *common])
            unknown = runner.invoke(cli, ["live", "status", str(uuid.uuid4()), *common])
    finally:
        stack.close()
    assert "(connected)" in quiet
    assert "reconnects 0" in quiet
    assert sid in listed.stdout
    assert unknown.exit_code == 2
    assert "not found" in unknown.stderr


# ---------------------------------------------------------------------- a contract roll


def test_a_roll_is_recorded_once_and_the_session_follows_the_new_contract(
    tmp_path: Path,
) -> None:
    """ES.c.0 moves from ESH4 to ESM4 two seconds into a five-second tape; a reset after it
    makes the replay announce the old contract again, which is not a second roll."""
    paths = [tmp_path / "esh4.mbo.dbn", tmp_path / "esm4.mbo.dbn"]
    write_tape(paths[0], mbo_flow(ESH4, 0, seed=1), "ESH4")
    write_tape(paths[1], mbo_flow(ESM4, STEP_NS // 2, seed=2), "ESM4")
    roll_at = T0 + 2 * SECOND
    faults = [
        Fault(FaultKind.ROLL, at_ns=roll_at, symbol="ES.c.0", to="ESM4"),
        Fault(FaultKind.RESET, at_ns=roll_at + SECOND // 2),
    ]
    gateway = LiveGateway.from_files(
        paths,
        keys=[KEY],
        symbols={"ESH4": ESH4, "ESM4": ESM4},
        speed=2.0,
        continuous={"ES.c.0": "ESH4"},
        faults=faults,
        heartbeat_s=0.2,
    )
    (tmp_path / "stack").mkdir()
    stack = LiveStack(tmp_path / "stack")
    try:
        stack.run(stack.start())
        with GatewayThread(gateway) as gw:
            stack.gateway_port = gw.port
            expected = gw.tape_records("mbo", "ES.c.0", stype_in="continuous", start=T0)
            session_id = str(uuid.uuid4())
            request = stack.request(session_id, symbols=["ES.c.0"], stype_in="continuous", start=T0)
            handle = stack.start_session(request)
            until(lambda: len(bronze_records(stack.bronze_root, session_id)) >= len(expected))
            stack.run(handle.signal(LiveIngestionSession.stop, StopRequest("olivia", "test")))
            status = stack.run(handle.result())
            rolls = stack.run(_rolls(stack, session_id))
    finally:
        stack.close()
    assert bronze_records(stack.bronze_root, session_id) == expected
    assert [(r.symbol, r.from_symbol, r.to_symbol) for r in rolls] == [("ES.c.0", "ESH4", "ESM4")]
    assert (rolls[0].from_instrument_id, rolls[0].to_instrument_id) == (ESH4, ESM4)
    assert status.report.contracts == {"ES.c.0": "ESM4"}
    assert status.report.rolls == 1
    assert status.report.reconnects >= 1


async def _rolls(stack: LiveStack, session_id: str) -> list[ContractRollEvent]:
    async with stack.sessions() as session:
        return await live_sessions.rolls_of(session, stack.workspace_id, session_id)


def test_a_calendar_roll_policy_rolls_by_market_time(tmp_path: Path) -> None:
    """The same two contracts under a calendar, through the API: the session subscribes to
    both raw symbols and ES rolls from ESH4 to ESM4 when the records reach the scheduled time;
    a reset after it replays across that time and records nothing twice."""
    paths = [tmp_path / "esh4.mbo.dbn", tmp_path / "esm4.mbo.dbn"]
    write_tape(paths[0], mbo_flow(ESH4, 0, seed=1), "ESH4")
    write_tape(paths[1], mbo_flow(ESM4, STEP_NS // 2, seed=2), "ESM4")
    roll_at = T0 + 2 * SECOND
    gateway = LiveGateway.from_files(
        paths,
        keys=[KEY],
        symbols={"ESH4": ESH4, "ESM4": ESM4},
        speed=2.0,
        faults=[Fault(FaultKind.RESET, at_ns=roll_at + SECOND // 2)],
        heartbeat_s=0.2,
    )
    calendar = {
        "name": "ES",
        "schedule": [{"at": iso(T0), "symbol": "ESH4"}, {"at": iso(roll_at), "symbol": "ESM4"}],
    }
    body: dict[str, Any] = {
        "dataset": DATASET,
        "symbols": ["ESH4", "ESM4"],
        "start": iso(T0),
        "watchdog_seconds": 6.0,
        "report_every_seconds": 0.5,
        "roll_policy": "calendar",
        "roll_calendar": calendar,
    }
    (tmp_path / "stack").mkdir()
    stack = LiveStack(tmp_path / "stack")
    try:
        stack.run(stack.start())
        with GatewayThread(gateway) as gw:
            stack.run(stack.serve_api(gw.port))
            with stack.http("olivia") as olivia:
                expected = gw.tape_records("mbo", ["ESH4", "ESM4"], start=T0)
                refusals = {
                    "no calendar": body | {"roll_calendar": None},
                    "calendar under mapping": body | {"roll_policy": "mapping"},
                    "not subscribed": body | {"symbols": ["ESH4"]},
                    "continuous": body | {"stype_in": "continuous"},
                }
                refused = {name: olivia.post(LIVE_PATH, json=bad) for name, bad in refusals.items()}
                sid = ok(olivia.post(LIVE_PATH, json=body), 201)["id"]
                until(lambda: len(bronze_records(stack.bronze_root, sid)) >= len(expected))
                until(lambda: ok(olivia.get(f"{LIVE_PATH}/{sid}"))["rolls"][1:])
                ok(olivia.post(f"{LIVE_PATH}/{sid}/stop", json={"reason": "done"}), 202)
                view = until(
                    lambda: (v := ok(olivia.get(f"{LIVE_PATH}/{sid}")))["state"] == "stopped" and v
                )
    finally:
        stack.close()
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refusals, 422)
    assert "needs a roll_calendar" in refused["no calendar"].text
    assert "['ESM4'], which symbols lacks" in refused["not subscribed"].text
    assert bronze_records(stack.bronze_root, sid) == expected
    assert view["roll_policy"] == "calendar"
    assert view["roll_calendar"]["name"] == "ES"
    rolls = [(r["symbol"], r["from_symbol"], r["to_symbol"], r["ts_event"]) for r in view["rolls"]]
    assert rolls == [("ES", None, "ESH4", T0), ("ES", "ESH4", "ESM4", roll_at)]
    assert view["rolls"][1]["from_instrument_id"] == ESH4
    assert view["rolls"][1]["to_instrument_id"] == ESM4
    assert view["rolls"][1]["reason"].startswith("calendar ES: ESM4 from ")
    assert view["contracts"]["ES"] == "ESM4"
    assert view["reconnects"] >= 1
