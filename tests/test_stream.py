"""``WS /v1/stream`` for real: the app served by uvicorn over a SQLite store and a Temporal dev
server, read by a real WebSocket client (``websockets``) that decodes every frame with pyarrow
from the documented framing.

The versions stream a two-minute ES session (17:00-17:02, 1,200 bins of 100 ms) of the sample
file: the derivative signal with a short robust-z window (the scorer's trailing history slides
over most of the session) and the EMA ensemble (rescored over the whole history). Parity: every
streamed silver field, gold output and signal score equals, value for value (NaN for NaN), what
the offline path (silver built into a lake, batch gold, the signal over the whole frame)
computes for the same snapshot; with ``start=`` too.

Live sources (``source=live:<session>``) read bronze the tests write themselves with
:class:`~qmachina.live.bronze.Bronze` from the sample's records (re-timed so that bins start
just before 17:00 Chicago and, for one tape, cross a UTC midnight), appending while the stream
runs; parity there is with the replay path over the same bronze files: every frame equal,
byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import shutil
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import pyarrow as pa
import pytest
import zstandard
from fastapi.routing import iter_route_contexts
from typer.testing import CliRunner
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from api.app import create_app
from api.routes.stream import StreamRuntime
from engine.events import F_SNAPSHOT
from engine.gold.runtime import GoldFrame, run_gold
from engine.replay import replay_files
from engine.signals.builtin import load_builtin_signals
from engine.signals.registry import SignalInputs, get_signal
from engine.silver_frame import SilverFrame
from qmachina.auth import mint_token
from qmachina.cli import app as cli
from qmachina.experiment_run import silver_frame_of
from qmachina.live.bronze import Bronze, BronzeMismatchError, BronzeStream
from qmachina.live.bronze_tail import BronzeTail, FollowWait, mbo_events
from qmachina.live.gateway_book import MBO_RECORD_DTYPE
from qmachina.live.gateway_protocol import with_ts_out
from qmachina.live.record_block import RecordBlock
from qmachina.serving import wire
from qmachina.serving.live_source import (
    Contract,
    LiveSessionSource,
    LiveSourceError,
    SessionRoll,
)
from qmachina.serving.snapshot import DatasetFile, ServingSnapshot, snapshot_from_spec
from qmachina.serving.stream_pipeline import (
    ServingComputation,
    StreamEnd,
    StreamHub,
    StreamPipeline,
    StreamSource,
    StreamStart,
    Subscription,
    resolved_pipeline,
    source_events,
)
from qmachina.settings import Settings, load_settings
from qmachina.specs.pipeline import CaptureSpec, default_configs_root, resolve_pipeline
from qmachina.store import governance, live_sessions
from qmachina.store import serving_registry as registry
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from qmachina.store.models import ContractRollEvent
from tests.live_server import BackgroundLoop, start_dev_server
from tests.test_api_access import permissions_of

SESSION = "session: {start: '2023-12-25T17:00', end: '2023-12-25T17:02'}"
SESSION_BINS = 1200
DERIVATIVE = "serving/stream_derivative.yaml"
EMA = "serving/stream_ema.yaml"
HEADER = struct.Struct("<4sBBHqq")
GRID_UPDATE, GOLD_UPDATE = 1, 2
SERVER_SEND_BUFFER = 32 * 1024
FAST = "100000"
"""A replay speed at which the session streams as fast as it computes."""


def stream_configs(root: Path) -> Path:
    """The shipped configs plus the two-minute ES pipeline and two serving specs over it."""
    configs = root / "configs"
    shutil.copytree(default_configs_root(), configs)
    pipeline = (configs / "pipelines" / "es_default.yaml").read_text()
    (configs / "pipelines" / "es_stream.yaml").write_text(
        pipeline.replace("name: es_default", "name: es_stream").replace(
            "  raw_symbol: ESH4\n", f"  raw_symbol: ESH4\n  {SESSION}\n"
        )
    )
    derivative = (configs / "serving" / "derivative_baseline.yaml").read_text()
    (configs / DERIVATIVE).write_text(
        derivative.replace("model_id: derivative_baseline", "model_id: stream_derivative")
        .replace("pipelines/es_default.yaml", "pipelines/es_stream.yaml")
        .replace("z_window: 600", "z_window: 120")
        .replace("z_min_periods: 60", "z_min_periods: 20")
        .replace(
            "    - {field: score, role: signal}",
            "    - {field: vp_bias, role: force}\n"
            "    - {field: rollup_d1_z, role: force}\n"
            "    - {field: score, role: signal}",
        )
    )
    ema = (configs / "serving" / "ema_ensemble_baseline.yaml").read_text()
    (configs / EMA).write_text(
        ema.replace("model_id: ema_ensemble_baseline", "model_id: stream_ema")
        .replace("pipelines/es_default.yaml", "pipelines/es_stream.yaml")
        .replace(
            "    - {field: score, role: signal}",
            "    - {field: score, role: signal}\n    - {field: flow_score, role: force}",
        )
    )
    return configs


class StreamApi(BackgroundLoop):
    """A store with workspaces, a Temporal dev server (the lifespan connects a client) and the
    app, its stream hub replaying from the sample directory."""

    def __init__(self, data_dir: Path, sample_dir: Path) -> None:
        self.data_dir = data_dir
        self.sample_dir = sample_dir
        self.configs = stream_configs(data_dir)
        self.store_url = default_sqlite_url(data_dir)
        super().__init__("stream-api")

    async def start(self) -> None:
        await bootstrap_store(self.store_url)
        env = await self.resources.enter_async_context(await start_dev_server())
        self.temporal_address = env.client.service_client.config.target_host
        engine = create_store_engine(self.store_url)
        self.resources.push_async_callback(engine.dispose)
        self.sessions = session_factory(engine)
        self.app = create_app(self.settings())
        self.bronze_root = self.settings().lake_dir.resolve() / "bronze" / "live"
        hub = StreamHub(
            data_root=self.sample_dir,
            bronze_root=self.bronze_root,
            live_poll_seconds=0.02,
            roll_poll_seconds=0.1,
        )
        self.runtime = StreamRuntime(hub, reauthorize_seconds=0.2)
        self.app.state.stream_runtime = self.runtime
        self.base_url = await self.serve(self.app, send_buffer=SERVER_SEND_BUFFER)
        self.ws_url = self.base_url.replace("http://", "ws://")

    def settings(self) -> Settings:
        return load_settings(
            data_dir=self.data_dir,
            database_url=self.store_url,
            temporal_address=self.temporal_address,
            configs_dir=self.configs,
            sample_data_dir=self.sample_dir,
        )

    def token(self, subject: str, **kwargs: Any) -> str:
        return mint_token(self.settings(), subject, **kwargs)

    def snapshot(self, spec: str) -> ServingSnapshot:
        return snapshot_from_spec(spec, configs_root=self.configs, data_root=self.sample_dir)

    def desk(self, slug: str, members: dict[str, str], **quotas: int | None) -> str:
        """A workspace owned by olivia with these members and quotas; its id."""

        async def create() -> str:
            async with self.sessions.begin() as session:
                workspace = await governance.create_owned_workspace(session, slug, slug, "olivia")
                for subject, role in members.items():
                    await governance.set_member_role(session, workspace.id, subject, role)
                if quotas:
                    await governance.set_quotas(session, workspace.id, quotas)
                return workspace.id

        return self.run(create())

    def register(self, workspace_id: str, snapshot: ServingSnapshot, alias: str) -> str:
        """The snapshot registered in the workspace, ``alias`` pointing at it; its id."""

        async def register() -> str:
            async with self.sessions.begin() as session:
                registration = await registry.register_version(
                    session, workspace_id, snapshot, actor="olivia"
                )
                await registry.repoint_alias(
                    session, workspace_id, alias, registration.version.version_id, "olivia", "test"
                )
                return registration.version.version_id

        return self.run(register())

    def remove_member(self, workspace_id: str, subject: str) -> None:
        async def remove() -> None:
            async with self.sessions.begin() as session:
                await governance.remove_member(session, workspace_id, subject)

        self.run(remove())

    def hub_state(self) -> list[tuple[str, int, bool]]:
        """(version id, subscribers, thread alive) of every pipeline, read on the app's loop."""

        async def read() -> list[tuple[str, int, bool]]:
            return [
                (key[0], len(p.subscribers), p.running)
                for key, p in self.runtime.hub.pipelines.items()
            ]

        return self.run(read())

    def connect(
        self,
        query: dict[str, str],
        *,
        token: str | None = None,
        header: bool = True,
        receive_buffer: int | None = None,
    ) -> ClientConnection:
        """A client of ``/v1/stream?query``, its token in the header (or the query)."""
        if token is not None and not header:
            query = {**query, "access_token": token}
        headers = {"Authorization": f"Bearer {token}"} if token and header else None
        url = f"{self.ws_url}/v1/stream?{urlencode(query)}"
        sock = None
        if receive_buffer is not None:  # a client that reads nothing fills its window fast
            host, port = self.ws_url.removeprefix("ws://").split(":")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.connect((host, int(port)))
        return connect(
            url,
            additional_headers=headers,
            max_size=None,
            max_queue=4 if receive_buffer is not None else 16,
            open_timeout=30,
            sock=sock,
        )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Iterator[StreamApi]:
    live = StreamApi(tmp_path_factory.mktemp("stream-api"), sample_dir)
    try:
        live.run(live.start())
        yield live
    finally:
        live.close()


@dataclass
class World:
    desk: str
    derivative: ServingSnapshot
    ema: ServingSnapshot
    derivative_id: str
    ema_id: str


@pytest.fixture(scope="module")
def world(api: StreamApi) -> World:
    desk = api.desk("desk", {"vera": "viewer", "eddie": "editor"})
    derivative, ema = api.snapshot(DERIVATIVE), api.snapshot(EMA)
    return World(
        desk,
        derivative,
        ema,
        api.register(desk, derivative, "live"),
        api.register(desk, ema, "trend"),
    )


# ------------------------------------------------------------------------------ the client


@dataclass(frozen=True)
class DataFrame:
    type: int
    bin_seq: int
    first_tick: int
    batch: pa.RecordBatch


@dataclass
class Received:
    """Everything one client read, in order, and how the socket closed."""

    config: dict[str, Any]
    frames: list[DataFrame] = field(default_factory=list)
    control: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""

    def of_type(self, kind: int) -> list[DataFrame]:
        return [f for f in self.frames if f.type == kind]


def decode(data: bytes) -> DataFrame:
    """A frame read as the README documents it: the 24-byte header, then an Arrow IPC stream."""
    magic, version, kind, reserved, bin_seq, first_tick = HEADER.unpack_from(data)
    assert (magic, version, reserved) == (b"QMST", 1, 0)
    table = pa.ipc.open_stream(pa.py_buffer(data[HEADER.size :])).read_all()
    (batch,) = table.to_batches()
    assert batch.num_rows == 1
    return DataFrame(kind, bin_seq, first_tick, batch)


def read_stream(ws: ClientConnection, timeout: float = 60.0) -> Received:
    """Read until the server closes: the runtime_config, the frames, the control messages."""
    first = ws.recv(timeout=timeout)
    assert isinstance(first, str), "the first message is the runtime_config text"
    received = Received(json.loads(first))
    raw: list[bytes] = []
    try:
        while True:
            message = ws.recv(timeout=timeout)
            if isinstance(message, bytes):
                raw.append(message)
            else:
                received.control.append(json.loads(message))
    except ConnectionClosed as closed:
        received.close_code, received.close_reason = close_frame(closed)
    received.frames = [decode(data) for data in raw]
    return received


def refusal(ws: ClientConnection) -> tuple[int, str]:
    """The close code and reason of a refused stream (nothing is sent before it)."""
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    return close_frame(closed.value)


def close_frame(closed: ConnectionClosed) -> tuple[int, str]:
    """The code and reason of the close frame the server sent."""
    if closed.rcvd is None:
        pytest.fail(f"the connection ended without a close frame: {closed}")
    return closed.rcvd.code, closed.rcvd.reason


@pytest.fixture(scope="module")
def streamed(api: StreamApi, world: World) -> dict[str, Received]:
    """Each version streamed once, whole, at full speed, by one client that reads everything;
    and the derivative from 17:01:30."""
    token = api.token("vera")
    out = {}
    for name, query in {
        "derivative": {"serving": "live", "workspace": "desk", "speed": FAST},
        "ema": {"serving": "trend", "workspace": "desk", "speed": FAST},
        "derivative_late": {
            "serving": world.derivative_id[:12],
            "workspace": "desk",
            "speed": FAST,
            "start": "2023-12-25T17:01:30",
        },
    }.items():
        with api.connect(query, token=token) as ws:
            out[name] = read_stream(ws)
    return out


# --------------------------------------------------------------------------- the contract


def test_route_declares_one_permission() -> None:
    """The WebSocket route declares its need like every HTTP route (the access tests' route
    enumeration sees HTTP routes only)."""
    app = create_app(load_settings(data_dir=Path("/nonexistent-qmachina-data")))
    websockets = [route for route in iter_route_contexts(app.routes) if route.methods is None]
    assert [route.path for route in websockets] == ["/v1/stream"]
    assert [repr(p) for p in permissions_of(websockets[0].dependant)] == [
        "StreamPermission('can_read' on workspace)"
    ]


def test_runtime_config_then_grid_and_gold_updates(
    streamed: dict[str, Received], world: World
) -> None:
    received = streamed["derivative"]
    config = received.config
    assert config["type"] == "runtime_config"
    assert config["schema_versions"] == {
        "stream": "qmachina.stream/1",
        "wire": 1,
        "silver": "qmachina.silver/1",
        "gold": "qmachina.gold-stream/1",
    }
    assert config["serving"]["version_id"] == world.derivative_id
    assert config["serving"]["alias"] == "live"
    assert config["serving"]["model_id"] == "stream_derivative"
    assert config["instrument"]["symbol"] == "ESH4"
    assert config["instrument"]["tick_size"] == "0.25"
    assert config["grid"] == {
        "n_absolute_ticks": 256,
        "grid_radius_ticks": 40,
        "max_window_ticks": 81,
        "bin_width_ms": 100,
        "bin_clock": "ts_event",
    }
    assert config["bin_width_ms"] == 100
    assert config["gold_outputs"] == [
        {"field": "composite", "role": "force", "kind": "grid"},
        {"field": "flow_state", "role": "state", "kind": "grid"},
        {"field": "vp_bias", "role": "force", "kind": "series"},
        {"field": "rollup_d1_z", "role": "force", "kind": "grid"},
        {"field": "score", "role": "signal", "kind": "signal"},
    ]
    assert [f["field"] for f in config["silver_fields"]] == [
        "window_first_tick",
        "bid_depth",
        "ask_depth",
        "add_mass_v",
        "pull_mass_v",
    ]
    assert config["signal"]["name"] == "derivative"
    assert config["signal"]["params"]["z_window"] == 120
    assert config["source"]["speed"] == float(FAST)
    assert config["frames"] == {
        "header_bytes": 24,
        "magic": "QMST",
        "types": {"grid_update": 1, "gold_update": 2},
    }

    # One grid_update then one gold_update per bin, every bin of the session, in order.
    assert [f.type for f in received.frames] == [GRID_UPDATE, GOLD_UPDATE] * SESSION_BINS
    grids, golds = received.of_type(GRID_UPDATE), received.of_type(GOLD_UPDATE)
    assert [f.bin_seq for f in grids] == list(range(SESSION_BINS))
    assert [f.bin_seq for f in golds] == list(range(SESSION_BINS))
    silver_schema, gold_schema = grids[0].batch.schema, golds[0].batch.schema
    assert all(f.batch.schema.equals(silver_schema) for f in grids)
    assert all(f.batch.schema.equals(gold_schema) for f in golds)
    assert set(silver_schema.names).isdisjoint(gold_schema.names)
    assert silver_schema.names == config["grid_update_fields"]
    assert gold_schema.names == [f["field"] for f in config["gold_outputs"]]
    assert silver_schema.metadata[b"qmachina.schema_version"] == b"qmachina.silver/1"
    assert gold_schema.metadata[b"qmachina.schema_version"] == b"qmachina.gold-stream/1"
    assert gold_schema.metadata[b"qmachina.version_id"] == world.derivative_id.encode()
    for grid, gold in zip(grids, golds, strict=True):
        assert grid.first_tick == gold.first_tick == grid.batch["window_first_tick"][0].as_py()
        window = grid.batch["window_ticks"][0].as_py()
        assert len(grid.batch["bid_depth"][0]) == len(gold.batch["composite"][0]) == window

    assert received.control == [
        {
            "type": "stream_end",
            "reason": "replay finished",
            "bins": SESSION_BINS,
            "dropped_frames": 0,
            "error": None,
        }
    ]
    assert (received.close_code, received.close_reason) == (1000, "replay finished")


# ------------------------------------------------------------------------------ parity


@dataclass(frozen=True)
class Offline:
    frame: SilverFrame
    gold: GoldFrame
    score: np.ndarray


def offline(api: StreamApi, snapshot: ServingSnapshot, lake: Path) -> Offline:
    """What the offline path computes for the snapshot: its pipeline's silver built into a lake
    and read back, batch gold over the whole frame, the signal over the whole frame."""
    pipeline = resolve_pipeline(
        api.configs / "pipelines" / "es_stream.yaml", api.configs, api.sample_dir
    )
    assert pipeline.pipeline_hash == snapshot.content.pipeline.pipeline_hash
    frame = silver_frame_of(pipeline, lake)
    gold = run_gold(snapshot.content.gold.spec.graph(), frame)
    load_builtin_signals()
    signal = snapshot.content.signal
    score = get_signal(signal.name).score(
        SignalInputs(frame=frame, gold=gold.outputs), signal.params
    )
    return Offline(frame, gold, score)


def assert_parity(received: Received, expected: Offline, first_bin: int = 0) -> int:
    """Every streamed value equals the offline one; the number of finite scores compared."""
    frame, gold = expected.frame, expected.gold
    grids, golds = received.of_type(GRID_UPDATE), received.of_type(GOLD_UPDATE)
    assert [f.bin_seq for f in grids] == list(range(first_bin, frame.n_bins))
    assert [f.bin_seq for f in golds] == list(range(first_bin, frame.n_bins))
    finite = 0
    for grid, streamed_gold in zip(grids, golds, strict=True):
        b = grid.bin_seq
        row = frame.table.slice(b, 1)
        for name in grid.batch.schema.names:
            assert grid.batch[name].equals(row[name].combine_chunks()), (b, name)
        first = row["window_first_tick"][0].as_py() - frame.first_tick
        count = row["window_ticks"][0].as_py()
        for name in streamed_gold.batch.schema.names:
            column = streamed_gold.batch[name]
            if name == "score":
                value = np.array([column[0].as_py()])
                assert np.array_equal(value, expected.score[b : b + 1], equal_nan=True), (b, name)
                finite += int(np.isfinite(value[0]))
            elif gold.kinds[name] == "grid":
                values = column[0].values.to_numpy(zero_copy_only=False)
                cells = gold.outputs[name][b, first : first + count]
                assert np.array_equal(values, cells, equal_nan=True), (b, name)
            else:
                value = np.array([column[0].as_py()])
                assert np.array_equal(value, gold.outputs[name][b : b + 1], equal_nan=True)
    return finite


def test_parity_with_the_offline_path(
    api: StreamApi,
    world: World,
    streamed: dict[str, Received],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    lake = tmp_path_factory.mktemp("lake")
    derivative = offline(api, world.derivative, lake)
    assert derivative.frame.n_bins == SESSION_BINS
    # A robust-z window of 120 bins: the scorer's trailing 123 bins slide over the session.
    assert assert_parity(streamed["derivative"], derivative) > 1000
    ema = offline(api, world.ema, lake)
    assert assert_parity(streamed["ema"], ema) == SESSION_BINS

    # From 17:01:30 (bin 900): nothing earlier is streamed, and what is streamed is computed from
    # the session's start, so it still equals the offline values bin for bin.
    late = streamed["derivative_late"]
    assert late.config["source"]["start_ns"] == int(derivative.frame.bin_start_ns[900])
    assert assert_parity(late, derivative, first_bin=900) > 250
    assert late.control[-1]["bins"] == SESSION_BINS


def test_access_token_in_the_query(api: StreamApi, world: World) -> None:
    """Browsers cannot set headers on a WebSocket: the token may come as ``access_token``."""
    query = {"serving": "trend", "workspace": "desk", "speed": FAST, "start": "17:01:59"}
    query["start"] = "2023-12-25T17:01:59"
    with api.connect(query, token=api.token("vera"), header=False) as ws:
        received = read_stream(ws)
    assert received.config["serving"]["alias"] == "trend"
    assert [f.bin_seq for f in received.of_type(GOLD_UPDATE)] == list(range(1190, SESSION_BINS))
    assert received.close_code == 1000


# ---------------------------------------------------------------------------- refusals


def test_refusals_close_with_a_code_and_a_reason(api: StreamApi, world: World) -> None:
    vera = api.token("vera")
    stranger = api.token("sam")
    cases = [
        # (query, token, code, words in the reason)
        ({"serving": "live", "workspace": "desk"}, None, 4401, "no bearer token"),
        ({"serving": "live", "workspace": "desk"}, "not-a-jwt", 4401, "not a JWT"),
        (
            {"serving": "nope", "workspace": "desk"},
            vera,
            4404,
            "no serving alias or version 'nope'",
        ),
        ({"serving": "deadbeefdead", "workspace": "desk"}, vera, 4404, "'deadbeefdead'"),
        ({"serving": "live", "workspace": "nowhere"}, vera, 4404, "workspace 'nowhere' not found"),
        # A workspace the caller cannot read is answered exactly like one that does not exist.
        ({"serving": "live", "workspace": "desk"}, stranger, 4404, "workspace 'desk' not found"),
        ({"workspace": "desk"}, vera, 4400, "serving= is required"),
        ({"serving": "live", "workspace": "desk", "speed": "0"}, vera, 4400, "speed"),
        ({"serving": "live", "workspace": "desk", "speed": "fast"}, vera, 4400, "speed"),
        ({"serving": "live", "workspace": "desk", "start": "noon"}, vera, 4400, "ISO-8601"),
    ]
    for query, token, code, words in cases:
        with api.connect(query, token=token) as ws:
            got = refusal(ws)
        assert got[0] == code, (query, got)
        assert words in got[1], (query, got)
    expired = api.token("vera", ttl_seconds=60, now=time.time() - 3600)
    with api.connect({"serving": "live", "workspace": "desk"}, token=expired) as ws:
        assert refusal(ws) == (4401, "the token has expired")
    assert api.hub_state() == []  # no refusal started a pipeline


def test_a_changed_dataset_file_fails_the_stream(api: StreamApi) -> None:
    """A version whose lineage recorded other bytes for its dataset file than the file now
    holds is not streamed: 1011, naming the file."""
    genuine = api.snapshot(DERIVATIVE)
    lineage = genuine.lineage
    (recorded,) = lineage.dataset_files
    forged = DatasetFile(name=recorded.name, sha256="0" * 64, size_bytes=recorded.size_bytes)
    other = ServingSnapshot.of(
        genuine.content, lineage.model_copy(update={"dataset_files": (forged,)})
    )
    desk = api.desk("forged", {"vera": "viewer"})
    api.register(desk, other, "live")
    with api.connect({"serving": "live", "workspace": "forged"}, token=api.token("vera")) as ws:
        code, reason = refusal(ws)
    assert code == 1011
    assert f"dataset file {recorded.name} changed since serving version" in reason


# ----------------------------------------------------------------------- sharing and quotas


def wait_until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.02)


def test_two_clients_share_one_pipeline(api: StreamApi, world: World) -> None:
    started = api.runtime.hub.pipelines_started
    query = {"serving": "live", "workspace": "desk", "speed": "1"}
    with api.connect(query, token=api.token("vera")) as first:
        config = json.loads(first.recv(timeout=30))
        # The other client names the version by id, not alias: the same version, one pipeline.
        other = {**query, "serving": world.derivative_id}
        with api.connect(other, token=api.token("eddie")) as second:
            assert json.loads(second.recv(timeout=30))["serving"] == {
                **config["serving"],
                "alias": None,
            }
            assert api.hub_state() == [(world.derivative_id, 2, True)]
            assert api.runtime.hub.pipelines_started == started + 1
            # Both receive the same bins, as the pipeline produces them.
            a, b = first.recv(timeout=30), second.recv(timeout=30)
            assert isinstance(a, bytes)
            assert isinstance(b, bytes)
            assert decode(a).type == decode(b).type == GRID_UPDATE
        wait_until(lambda: api.hub_state() == [(world.derivative_id, 1, True)])
    # The last client left: the pipeline is stopped and forgotten.
    wait_until(lambda: api.hub_state() == [])
    wait_until(lambda: not any(t.name.startswith("serving-stream-") for t in threading.enumerate()))


def test_stream_quota(api: StreamApi, world: World) -> None:
    desk = api.desk("tight", {"vera": "viewer"}, max_streams=1)
    api.register(desk, world.derivative, "live")
    query = {"serving": "live", "workspace": "tight", "speed": "1"}
    with api.connect(query, token=api.token("vera")) as first:
        assert json.loads(first.recv(timeout=30))["type"] == "runtime_config"
        assert streams_in_use(api, "tight") == 1
        with api.connect(query, token=api.token("olivia")) as second:
            code, reason = refusal(second)
        assert code == 4429
        assert reason == "workspace 'tight' is at its max_streams quota: limit 1, current use 1"
        # Another workspace's streams do not count against this one.
        with api.connect(
            {"serving": "live", "workspace": "desk", "speed": "1"}, token=api.token("vera")
        ) as elsewhere:
            assert json.loads(elsewhere.recv(timeout=30))["type"] == "runtime_config"
    wait_until(lambda: streams_in_use(api, "tight") == 0)
    with api.connect(query, token=api.token("olivia")) as again:
        assert json.loads(again.recv(timeout=30))["type"] == "runtime_config"


def streams_in_use(api: StreamApi, slug: str) -> int:
    """``max_streams``' current use, as the workspace API reports it."""
    response = httpx.get(
        f"{api.base_url}/v1/workspaces/{slug}",
        headers={"Authorization": f"Bearer {api.token('vera')}"},
        timeout=30,
    )
    response.raise_for_status()
    current: int = response.json()["quotas"]["max_streams"]["current"]
    return current


# ------------------------------------------------------------------------------ slow clients


def test_a_full_queue_drops_its_oldest_frames(world: World, sample_dir: Path) -> None:
    segment = StreamStart(kinds={}, source=wire.SourceInfo("live", 1.0, None, None, None, ()))

    async def run() -> tuple[list[bytes | StreamStart | StreamEnd], int, int]:
        hub = StreamHub(data_root=sample_dir, queue_frames=4)
        # A pipeline that is never started: frames are offered by hand.
        pipeline = StreamPipeline(hub, world.ema, StreamSource(), asyncio.get_running_loop())
        queue = Subscription(pipeline, max_frames=4)
        for index in range(10):
            queue.offer(bytes([index]))
            if index == 2:  # a new live segment starts: what says so is never dropped
                queue.offer_start(segment)
        queue.end(StreamEnd(bins=5))
        return [await queue.next() for _ in range(6)], queue.dropped, hub.dropped_frames

    items, dropped, total = asyncio.run(run())
    assert items == [segment, b"\x06", b"\x07", b"\x08", b"\x09", StreamEnd(bins=5)]
    assert dropped == total == 6


def test_frames_decode_with_the_wire_helper() -> None:
    values = pa.array([1.5, float("nan"), 2.5])
    batch = pa.record_batch([values, values], names=["x", "y"]).slice(1, 1)  # a sliced row
    data = wire.encode_frame(wire.FrameType.GOLD_UPDATE, 7, -3, batch)
    frame = wire.decode_frame(data)
    assert (frame.type, frame.bin_seq, frame.first_tick) == (GOLD_UPDATE, 7, -3)
    assert frame.batch.schema.equals(batch.schema)
    assert np.isnan(frame.batch["x"].to_numpy()).tolist() == [True]  # NaN stays NaN, not null
    assert frame.batch["x"].null_count == 0
    assert decode(data).batch.schema.equals(batch.schema)
    with pytest.raises(wire.WireError, match="wire version 1"):
        wire.decode_frame(b"XXXX" + data[4:])
    with pytest.raises(wire.WireError, match="at least 24 bytes"):
        wire.decode_frame(data[:10])


def test_a_slow_client_drops_frames_and_blocks_nobody(api: StreamApi, world: World) -> None:
    """One client reads nothing while the other reads as frames come: the reader gets every
    frame to the end of the session before the slow one has read a byte (a pipeline waiting on
    the slow socket would never finish it), and the slow one loses the oldest and is told how
    many. How fast the pipeline goes is the benchmark's business, not this test's."""
    hub = api.runtime.hub
    queue, hub.queue_frames = hub.queue_frames, 64
    dropped_before = hub.dropped_frames
    query = {"serving": "live", "workspace": "desk", "speed": "25", "start": "2023-12-25T17:01:30"}
    try:
        slow = api.connect(query, token=api.token("eddie"), receive_buffer=4096)
        with api.connect(query, token=api.token("vera")) as reader:
            fast = read_stream(reader)
        time.sleep(0.5)  # let the slow client's queue drain into its socket as far as it can
        with slow:
            lagging = read_stream(slow)
    finally:
        hub.queue_frames = queue
    bins = SESSION_BINS - 900
    assert [f.bin_seq for f in fast.of_type(GOLD_UPDATE)] == list(range(900, SESSION_BINS))
    assert fast.control[-1]["dropped_frames"] == 0
    assert fast.close_code == 1000

    dropped = lagging.control[-1]["dropped_frames"]
    assert dropped > 0
    assert len(lagging.frames) + dropped == 2 * bins
    statuses = [m["dropped_frames"] for m in lagging.control if m["type"] == "stream_status"]
    assert statuses == sorted(statuses)
    assert statuses[-1] == dropped
    # Drop-oldest: what the slow client did get ends with the session's last bins.
    assert lagging.frames[-1].bin_seq == SESSION_BINS - 1
    assert lagging.close_code == 1000
    assert hub.dropped_frames - dropped_before == dropped


# -------------------------------------------------------------------- access while streaming


def test_losing_access_or_the_token_ends_the_stream(api: StreamApi, world: World) -> None:
    desk = api.desk("brief", {"rita": "viewer"})
    api.register(desk, world.ema, "trend")
    query = {"serving": "trend", "workspace": "brief", "speed": "1"}
    with api.connect(query, token=api.token("rita")) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "runtime_config"
        api.remove_member(desk, "rita")
        code, reason = drain_until_closed(ws)
    assert (code, reason) == (4404, "workspace 'brief' is no longer readable")

    soon = api.token("vera", ttl_seconds=60, now=time.time() - 57)  # expires in 3 s
    with api.connect({"serving": "trend", "workspace": "desk", "speed": "1"}, token=soon) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "runtime_config"
        assert drain_until_closed(ws) == (4401, "the token has expired")


def drain_until_closed(ws: ClientConnection) -> tuple[int, str]:
    try:
        while True:
            ws.recv(timeout=30)
    except ConnectionClosed as closed:
        return close_frame(closed)


def test_with_no_session_nor_start_the_opening_snapshot_is_not_waited_through() -> None:
    """The sample's snapshot is stamped 00:00 and its market opens at 22:00: the snapshot comes
    at once, and pacing starts at the first record after it (at speed 1, nothing else is due
    before the stop)."""
    pipeline = resolve_pipeline(default_configs_root() / "pipelines/es_default.yaml")
    assert pipeline.session is None
    stop = threading.Event()
    events = source_events(pipeline, StreamSource(speed=1.0), stop)
    opening = next(events)
    assert len(opening) > 0
    assert bool(np.all(opening["flags"] & F_SNAPSHOT))
    first_paced = next(events)
    assert not first_paced["flags"][0] & F_SNAPSHOT
    gap_ns = int(first_paced["ts_recv"][0]) - int(opening["ts_recv"][-1])
    assert gap_ns > 3600 * 10**9  # hours of market time that were not waited through
    stop.set()


def test_the_stream_command_prints_the_config_then_each_bin(
    api: StreamApi, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    desk = api.desk("terminal", {"vera": "viewer"})
    version_id = api.register(desk, world.derivative, "on-screen")
    monkeypatch.setenv("QMACHINA_DATA_DIR", str(api.data_dir))
    common = ["--api", api.base_url, "--token", api.token("vera"), "--workspace", "terminal"]
    shown = CliRunner().invoke(
        cli, ["stream", "on-screen", "--bins", "3", "--speed", "1000", *common]
    )
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"serving on-screen (version {version_id[:12]}")
    assert [line.split(":")[0] for line in lines[1:4]] == ["bin 0", "bin 1", "bin 2"]
    assert lines[-1] == f"3 bins of version {version_id}"
    refused = CliRunner().invoke(cli, ["stream", "nowhere", "--bins", "1", *common])
    assert refused.exit_code == 2
    assert "4404" in refused.stderr
    bad_start = CliRunner().invoke(
        cli, ["stream", "on-screen", "--start", "half past five", "--bins", "1", *common]
    )
    assert bad_start.exit_code == 2
    assert "4400" in bad_start.stderr
    assert "start must be an ISO-8601 time" in bad_start.stderr


# ------------------------------------------------------------------------------ live sources

ESH4_ID = 17077
OTHER_ID = 99  # the contract a roll moves to: the same records under another instrument id
SECOND = 1_000_000_000
OPEN_NS = 1_703_545_200 * SECOND  # 2023-12-25 23:00 UTC: 17:00 in Chicago, the session open
DAY_NS = 86_400 * SECOND
RECORD = MBO_RECORD_DTYPE.itemsize


@functools.cache
def sample_records(sample_dir: Path) -> np.ndarray:
    """The raw MBO records of the sample ESH4 file (DBN v1)."""
    path = sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst"
    with path.open("rb") as fh:
        raw = zstandard.ZstdDecompressor().stream_reader(fh).read()
    header = 8 + int.from_bytes(raw[4:8], "little")
    return np.frombuffer(raw[header:], dtype=MBO_RECORD_DTYPE)


def live_tape(sample_dir: Path, seconds: int, shift_ns: int = 0) -> np.ndarray:
    """The sample's opening snapshot and its first ``seconds`` of the session, as a gateway
    would send them: the hour of pre-open trickle before 17:00 moved to 16:59:59 (so bins start
    right before the open instead of an hour earlier), everything shifted by ``shift_ns``."""
    records = sample_records(sample_dir)
    tape = records[: int(np.searchsorted(records["ts_recv"], OPEN_NS + seconds * SECOND))].copy()
    market = (tape["flags"] & F_SNAPSHOT) == 0
    for name in ("ts_event", "ts_recv"):
        tape[name][market] = np.maximum(tape[name][market], OPEN_NS - SECOND)
        tape[name] += np.uint64(shift_ns)
    return tape


def rolled_tape(tape: np.ndarray, roll_ns: int, shift_ns: int) -> np.ndarray:
    """``tape`` again as another contract's: its instrument id changed, its times shifted by
    ``shift_ns`` and its snapshot stamped at the roll."""
    other = tape.copy()
    other["instrument_id"] = OTHER_ID
    snapshot = (other["flags"] & F_SNAPSHOT) != 0
    for name in ("ts_event", "ts_recv"):
        other[name] += np.uint64(shift_ns)
        other[name][snapshot] = roll_ns
    return other


def block_of(records: np.ndarray) -> RecordBlock:
    offsets = np.arange(0, len(records) * RECORD + 1, RECORD, dtype=np.int64)
    return RecordBlock.from_bytes(records.tobytes(), offsets, RECORD)


def open_bronze(
    root: Path,
    session_id: str,
    tape: np.ndarray,
    *,
    stype_in: str = "raw_symbol",
    symbols: tuple[str, ...],
    ts_out: bool = False,
) -> Bronze:
    """A session's bronze, begun as an ingestor begins it for a subscription that started
    with the tape's first record (a snapshot stamped the day before, by ts_event)."""
    bronze = Bronze.open(root, session_id)
    start = int(tape["ts_event"].min())
    bronze.begin(
        BronzeStream("GLBX.MDP3", "mbo", 1, start, stype_in, symbols=symbols, ts_out=ts_out)
    )
    return bronze


def replayed_frames(
    snapshot: ServingSnapshot, files: list[Path], instrument_id: int, *, finish: bool = False
) -> list[bytes]:
    """The frames the replay path computes from bronze files for one instrument, with the
    pipeline a live source runs (no session window): every bin the records close (and, with
    ``finish``, the bin still open at their end)."""
    pipeline = resolved_pipeline(snapshot, Path("/nonexistent")).model_copy(
        update={"session": None}
    )
    computation = ServingComputation(snapshot, pipeline)
    bins = [
        produced
        for events in replay_files(files, instrument_id=instrument_id)
        for produced in computation.feed(events)
    ]
    if finish:
        bins += computation.finish()
    frames = [computation.frames(*produced) for produced in bins]
    return [data for f in frames for data in (f.grid_update, f.gold_update)]


def content(message: str | bytes) -> Any:
    """What a message says: a control message's JSON, a frame's header and values (NaN as
    ``"NaN"``). Not its bytes: the Arrow IPC of a one-bin slice depends on the silver batch it
    was cut from, which depends on how the events were batched."""
    if isinstance(message, str):
        return json.loads(message)
    frame = wire.decode_frame(message)

    def values(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return "NaN"
        if isinstance(value, list):
            return [values(v) for v in value]
        if isinstance(value, dict):
            return {k: values(v) for k, v in value.items()}
        return value

    schema = frame.batch.schema
    header = (frame.type, frame.bin_seq, frame.first_tick, schema, schema.metadata)
    return (*header, values(frame.batch.to_pylist()))


def contents(messages: Sequence[str | bytes]) -> list[Any]:
    return [content(m) for m in messages]


def day_files(root: Path, session_id: str) -> list[Path]:
    return sorted((root / session_id).glob("*.mbo.dbn"))


def receive(ws: ClientConnection, frames: int, timeout: float = 60.0) -> list[str | bytes]:
    """Messages until ``frames`` binary ones have come (a live stream does not end)."""
    messages: list[str | bytes] = []
    while sum(isinstance(m, bytes) for m in messages) < frames:
        messages.append(ws.recv(timeout=timeout))
    return messages


@contextlib.contextmanager
def unbounded_queues(api: StreamApi) -> Iterator[None]:
    """Queues no test outgrows: a live backlog is computed as fast as it can be, and a client
    busy writing bronze or computing what to expect would lose the oldest frames."""
    hub = api.runtime.hub
    queue, hub.queue_frames = hub.queue_frames, 100_000
    try:
        yield
    finally:
        hub.queue_frames = queue


def live_session(api: StreamApi, workspace_id: str, *rolls: ContractRollEvent) -> str:
    """A live session row in the workspace (and the rolls it recorded); its id."""
    session_id = str(uuid.uuid4())

    async def create() -> None:
        async with api.sessions.begin() as session:
            await live_sessions.create_session(
                session,
                workspace_id,
                session_id=session_id,
                dataset="GLBX.MDP3",
                subscription={"symbols": ["ESH4"], "stype_in": "raw_symbol", "schema": "mbo"},
                created_by="olivia",
                workflow_id=f"live-test-{session_id}",
            )
            for roll in rolls:
                roll.workspace_id, roll.session_id = workspace_id, session_id
                await live_sessions.record_roll(session, roll)

    api.run(create())
    return session_id


def test_a_follow_looks_again_soon_after_records_and_backs_off_while_none_come() -> None:
    idle = FollowWait(0.001, 0.05)
    waits = [idle.seconds() for _ in range(8)]
    assert waits == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05]
    idle.arrived()
    assert idle.seconds() == 0.001
    with pytest.raises(ValueError, match="shortest"):
        FollowWait(0.1, 0.05)


def test_bronze_tail_never_decodes_a_torn_record(tmp_path: Path, sample_dir: Path) -> None:
    tape = live_tape(sample_dir, 2)
    with open_bronze(tmp_path, "torn", tape, symbols=("ESH4",)) as bronze:
        bronze.append(block_of(tape[:-2]))
        bronze.flush()
        tail = BronzeTail(tmp_path / "torn")
        blocks = tail.read()
        assert tail.stream is not None
        assert tail.stream.symbols == ("ESH4",)
        # The snapshot is stamped the day before (by ts_event): two day files, read in order.
        assert len(day_files(tmp_path, "torn")) == len(blocks) == 2
        assert b"".join(b.data for b in blocks) == tape[:-2].tobytes()
        assert tail.read() == []

        record = tape[-2:-1].tobytes()
        path = day_files(tmp_path, "torn")[-1]
        with path.open("ab") as fh:  # a write caught half way
            fh.write(record[:20])
        assert tail.read() == []
        with path.open("ab") as fh:
            fh.write(record[20:])
        (completed,) = tail.read()
        assert completed.data == record
        events = mbo_events(completed, 1, ESH4_ID)
        expected = np.concatenate(list(replay_files(day_files(tmp_path, "torn"))))[-1:]
        assert np.array_equal(events, expected)
        # The next UTC day's file: the tail leaves the finished file for it.
        late = tape[-1:].copy()
        late["ts_event"] += np.uint64(DAY_NS)
        late["ts_recv"] += np.uint64(DAY_NS)
        bronze.append(block_of(late))
        bronze.flush()
        (moved,) = tail.read()
        assert moved.data == late.tobytes()
        assert len(day_files(tmp_path, "torn")) == 3
        tail.close()


def test_a_live_source_streams_the_bronze_as_it_grows(
    api: StreamApi, world: World, sample_dir: Path
) -> None:
    """Bronze written before the stream and appended during it (a record caught half written,
    the next UTC day's file) streams bin by bin, every frame equal to the replay path's over
    the same files; a second client joins the same pipeline."""
    # Shifted so that 30 s into the session it is midnight UTC: the bronze turns a day.
    shift = DAY_NS - (OPEN_NS + 30 * SECOND) % DAY_NS
    tape = live_tape(sample_dir, 60, shift)
    before = int(np.searchsorted(tape["ts_recv"], OPEN_NS + shift + 20 * SECOND))
    session_id = live_session(api, world.desk)
    query = {"serving": "live", "workspace": "desk", "source": f"live:{session_id}"}
    with (
        unbounded_queues(api),
        open_bronze(api.bronze_root, session_id, tape, symbols=("ESH4",)) as bronze,
    ):
        bronze.append(block_of(tape[:before]))
        bronze.flush()
        with api.connect(query, token=api.token("vera")) as ws:
            config = json.loads(ws.recv(timeout=60))
            assert config["type"] == "runtime_config"
            assert config["serving"]["version_id"] == world.derivative_id
            assert config["source"]["kind"] == "live"
            assert config["source"]["session_start_ns"] == int(tape["ts_event"].min())
            assert config["instrument"]["instrument_id"] == ESH4_ID
            assert config["instrument"]["contract"] == "ESH4"
            assert config["live"] == {"session_id": session_id, "segment": 0, "roll": None}
            messages = receive(ws, 100)

            # Another client joins the one pipeline there is for (version, live session).
            with api.connect(query, token=api.token("eddie")) as joining:
                assert json.loads(joining.recv(timeout=60))["live"]["session_id"] == session_id
                assert isinstance(joining.recv(timeout=60), bytes)
                assert api.hub_state() == [(world.derivative_id, 2, True)]
                (key,) = api.runtime.hub.pipelines
                assert key[1] == StreamSource(kind="live", session_id=session_id)

            bronze.flush()
            record = tape[before : before + 1].tobytes()
            path = day_files(api.bronze_root, session_id)[-1]
            with path.open("ab") as fh:  # the ingestor caught half way through a write
                fh.write(record[:30])
            time.sleep(0.2)
            with path.open("ab") as fh:
                fh.write(record[30:])
            for chunk in np.array_split(tape[before + 1 :], 3):
                bronze.append(block_of(chunk))
                bronze.flush()
                time.sleep(0.1)
            files = day_files(api.bronze_root, session_id)
            # The snapshot's day (by ts_event), the session's, and the day after midnight.
            assert [f.name[:8] for f in files] == ["20231224", "20231225", "20231226"]
            expected = replayed_frames(world.derivative, files, ESH4_ID)
            assert len(expected) > 1100  # 16:59:59 to 17:01, in bins of 100 ms
            messages += receive(ws, len(expected) - 100)
        wait_until(lambda: api.hub_state() == [])
    assert [m for m in messages if isinstance(m, str)] == []  # nothing dropped: no status
    assert contents(messages) == contents(expected)


def test_the_stream_command_follows_a_live_session(
    api: StreamApi, world: World, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tape = live_tape(sample_dir, 5)
    session_id = live_session(api, world.desk)
    monkeypatch.setenv("QMACHINA_DATA_DIR", str(api.data_dir))
    common = ["--api", api.base_url, "--token", api.token("vera"), "--workspace", "desk"]
    with open_bronze(api.bronze_root, session_id, tape, symbols=("ESH4",)) as bronze:
        bronze.append(block_of(tape))
        bronze.flush()
        shown = CliRunner().invoke(
            cli, ["stream", "live", "--source", f"live:{session_id}", "--bins", "3", *common]
        )
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"serving live (version {world.derivative_id[:12]}")
    assert [line.split(":")[0] for line in lines[1:4]] == ["bin 0", "bin 1", "bin 2"]
    assert lines[-1] == f"3 bins of version {world.derivative_id}"
    paced = CliRunner().invoke(
        cli, ["stream", "live", "--source", f"live:{session_id}", "--speed", "10", *common]
    )
    assert paced.exit_code == 2
    assert "--speed is for a replay" in paced.stderr
    unknown = CliRunner().invoke(
        cli, ["stream", "live", "--source", f"live:{uuid.uuid4()}", "--bins", "1", *common]
    )
    assert unknown.exit_code == 2
    assert "4404" in unknown.stderr


def test_a_contract_roll_starts_a_new_segment(
    api: StreamApi, world: World, sample_dir: Path
) -> None:
    """The session's roll away from the served contract ends its segment (the open bin closed)
    and starts the next contract's with a new runtime_config, its book built from its own
    first records: the same records as another contract give the same gold, bin for bin."""
    first = live_tape(sample_dir, 20)
    roll_ns = OPEN_NS + 20 * SECOND
    second = rolled_tape(first, roll_ns, 21 * SECOND)
    roll = ContractRollEvent(
        symbol="ES.c.0",
        from_instrument_id=ESH4_ID,
        from_symbol="ESH4",
        to_instrument_id=OTHER_ID,
        to_symbol="ESM4",
        reason="test",
        ts_event=roll_ns,
    )
    session_id = live_session(api, world.desk, roll)
    query = {"serving": "live", "workspace": "desk", "source": f"live:{session_id}"}
    root = api.bronze_root
    with (
        unbounded_queues(api),
        open_bronze(root, session_id, first, stype_in="continuous", symbols=("ES.c.0",)) as bronze,
    ):
        bronze.append(block_of(first))
        bronze.flush()
        with api.connect(query, token=api.token("vera")) as ws:
            config = json.loads(ws.recv(timeout=60))
            assert config["instrument"]["contract"] == "ESH4"
            messages = receive(ws, 10)
            bronze.append(block_of(second))
            bronze.flush()
            files = day_files(root, session_id)
            before = replayed_frames(world.derivative, files, ESH4_ID, finish=True)
            after = replayed_frames(world.derivative, files, OTHER_ID)
            messages += receive(ws, len(before) + len(after) - 10)
    texts = [i for i, m in enumerate(messages) if isinstance(m, str)]
    assert texts == [len(before)]
    rolled = json.loads(messages[len(before)])
    assert rolled["type"] == "runtime_config"
    assert rolled["instrument"]["instrument_id"] == OTHER_ID
    assert rolled["instrument"]["contract"] == "ESM4"
    assert rolled["live"] == {
        "session_id": session_id,
        "segment": 1,
        "roll": {"ts_event": roll_ns, "from_instrument_id": ESH4_ID, "from_contract": "ESH4"},
    }
    assert contents(messages[: len(before)]) == contents(before)
    assert contents(messages[len(before) + 1 :]) == contents(after)
    # The new contract's bins are the old one's, 21 s later: the book started from its own
    # snapshot and first records, nothing of the old contract's carried over.
    assert contents(after[1::2]) == contents(before[1 : len(after) : 2])
    first_new = wire.decode_frame(after[0]).batch
    assert first_new["bin_start_ns"][0].as_py() == roll_ns


def read_until(events: Iterator[np.ndarray], count: int, stop: threading.Event) -> np.ndarray:
    """A live segment's events until ``count`` have come, then ``stop`` (it would follow the
    bronze for ever)."""
    got: list[np.ndarray] = []
    for batch in events:
        got.append(batch)
        if sum(map(len, got)) == count:
            stop.set()
    return np.concatenate(got)


def test_a_roll_seen_in_the_bronze_alone(tmp_path: Path, sample_dir: Path) -> None:
    """A session of one continuous symbol that turns to another instrument has rolled, even
    before (or without) its roll being recorded; the new segment reads from the start."""
    first = live_tape(sample_dir, 5)
    roll_ns = OPEN_NS + 5 * SECOND
    second = rolled_tape(first, roll_ns, 6 * SECOND)
    with open_bronze(tmp_path, "roll", first, stype_in="continuous", symbols=("ES.c.0",)) as bronze:
        bronze.append(block_of(first))
        bronze.append(block_of(second))
    stop = threading.Event()
    capture = CaptureSpec(dataset_files=("unused.dbn",), raw_symbol="ESH4")
    source = LiveSessionSource(tmp_path / "roll", capture, lambda: (), stop, poll_seconds=0.01)
    segments = source.segments()
    old = next(segments)
    assert (old.index, old.contract, old.rolled_from) == (0, Contract(ESH4_ID), None)
    files = day_files(tmp_path, "roll")
    assert np.array_equal(
        np.concatenate(list(old.events)),
        np.concatenate(list(replay_files(files, instrument_id=ESH4_ID))),
    )
    new = next(segments)
    assert (new.index, new.contract, new.rolled_from) == (1, Contract(OTHER_ID), Contract(ESH4_ID))
    assert new.roll_ts_ns == roll_ns
    expected = np.concatenate(list(replay_files(files, instrument_id=OTHER_ID)))
    assert np.array_equal(read_until(new.events, len(expected), stop), expected)
    assert next(segments, None) is None

    # A version of the contract rolled to starts on it: the contract before it is history.
    later = CaptureSpec(dataset_files=("unused.dbn",), raw_symbol="ESM4")
    roll = SessionRoll("ES.c.0", ESH4_ID, "ESH4", OTHER_ID, "ESM4", roll_ns)
    stop = threading.Event()
    segments = LiveSessionSource(tmp_path / "roll", later, lambda: (roll,), stop).segments()
    only = next(segments)
    assert (only.contract, only.rolled_from) == (Contract(OTHER_ID, "ESM4"), None)
    assert np.array_equal(read_until(only.events, len(expected), stop), expected)
    assert next(segments, None) is None


def test_a_calendar_session_follows_its_recorded_rolls(tmp_path: Path, sample_dir: Path) -> None:
    """A calendar session subscribes to raw symbols: its first contract, recorded as a roll
    with no ``from``, places the version's raw symbol, and the scheduled roll moves the stream
    to the next contract, whose book starts from the session's first record."""
    first = live_tape(sample_dir, 5)
    roll_ns = OPEN_NS + 5 * SECOND
    second = rolled_tape(first, roll_ns, 6 * SECOND)
    symbols = ("ESH4", "ESM4")
    with open_bronze(tmp_path, "cal", first, stype_in="raw_symbol", symbols=symbols) as bronze:
        bronze.append(block_of(first))
        bronze.append(block_of(second))
    rolls = (
        SessionRoll("ES", None, None, ESH4_ID, "ESH4", OPEN_NS),
        SessionRoll("ES", ESH4_ID, "ESH4", OTHER_ID, "ESM4", roll_ns),
    )
    capture = CaptureSpec(dataset_files=("unused.dbn",), raw_symbol="ESH4")
    stop = threading.Event()
    source = LiveSessionSource(tmp_path / "cal", capture, lambda: rolls, stop, poll_seconds=0.01)
    segments = source.segments()
    old = next(segments)
    assert (old.contract, old.rolled_from) == (Contract(ESH4_ID, "ESH4"), None)
    files = day_files(tmp_path, "cal")
    assert np.array_equal(
        np.concatenate(list(old.events)),
        np.concatenate(list(replay_files(files, instrument_id=ESH4_ID))),
    )
    new = next(segments)
    assert (new.contract, new.rolled_from) == (
        Contract(OTHER_ID, "ESM4"),
        Contract(ESH4_ID, "ESH4"),
    )
    assert new.roll_ts_ns == roll_ns
    expected = np.concatenate(list(replay_files(files, instrument_id=OTHER_ID)))
    assert np.array_equal(read_until(new.events, len(expected), stop), expected)


def test_a_session_with_send_times_feeds_the_same_events(tmp_path: Path, sample_dir: Path) -> None:
    """A ``ts_out`` subscription's records end with the gateway's send time: bronze says so in
    its header, keeps it across a resume, and the live source reads the same events."""
    tape = live_tape(sample_dir, 2)
    sent = with_ts_out(tape.tobytes(), 1_700_000_000_000_000_000)
    offsets = np.arange(0, len(tape) * (RECORD + 8) + 1, RECORD + 8, dtype=np.int64)
    for name, block, ts_out in (
        ("plain", block_of(tape), False),
        ("sent", RecordBlock.from_bytes(sent, offsets, RECORD + 8), True),
    ):
        with open_bronze(tmp_path, name, tape, symbols=("ESH4",), ts_out=ts_out) as bronze:
            bronze.append(block)
    plain_stream = BronzeStream("GLBX.MDP3", "mbo", 1, 0, "raw_symbol", ("ESH4",))
    with (
        Bronze.open(tmp_path, "sent") as resumed,
        pytest.raises(BronzeMismatchError, match="with the gateway's send time"),
    ):
        resumed.begin(plain_stream)
    expected = np.concatenate(
        list(replay_files(day_files(tmp_path, "plain"), instrument_id=ESH4_ID))
    )
    capture = CaptureSpec(dataset_files=("unused.dbn",), raw_symbol="ESH4")
    for name in ("plain", "sent"):
        stop = threading.Event()
        source = LiveSessionSource(tmp_path / name, capture, lambda: (), stop, poll_seconds=0.01)
        segment = next(source.segments())
        assert np.array_equal(read_until(segment.events, len(expected), stop), expected), name


def test_live_sources_that_cannot_feed_the_version(tmp_path: Path, sample_dir: Path) -> None:
    tape = live_tape(sample_dir, 1)
    capture = CaptureSpec(dataset_files=("unused.dbn",), raw_symbol="ESH4")
    for name, stype_in, symbols, words in [
        ("other", "raw_symbol", ("ESM4",), "subscribes ESM4, not ESH4"),
        ("two", "raw_symbol", ("ESH4", "ESM4"), "which of its instruments is ESH4"),
    ]:
        with open_bronze(tmp_path, name, tape, stype_in=stype_in, symbols=symbols) as bronze:
            bronze.append(block_of(tape))
        source = LiveSessionSource(tmp_path / name, capture, lambda: (), threading.Event())
        with pytest.raises(LiveSourceError, match=words):
            next(source.segments())
    # A roll that names the raw symbol tells its instrument.
    roll = SessionRoll("ES.c.0", ESH4_ID, "ESH4", OTHER_ID, "ESM4", OPEN_NS)
    source = LiveSessionSource(tmp_path / "two", capture, lambda: (roll,), threading.Event())
    assert next(source.segments()).contract == Contract(ESH4_ID, "ESH4")


def test_live_source_refusals(api: StreamApi, world: World) -> None:
    vera = api.token("vera")
    elsewhere = api.desk("elsewhere", {"sam": "viewer"})
    foreign = live_session(api, elsewhere)
    unknown = str(uuid.uuid4())
    live = {"serving": "live", "workspace": "desk"}
    cases = [
        ({**live, "source": f"live:{unknown}"}, 4404, f"no live session {unknown!r}"),
        # Another workspace's session is not one of this workspace's.
        ({**live, "source": f"live:{foreign}"}, 4404, f"no live session {foreign!r}"),
        ({**live, "source": "kafka:es"}, 4400, "source must be replay or live:<session id>"),
        ({**live, "source": "live:"}, 4400, "needs a session id"),
        ({**live, "source": "live:../../etc"}, 4400, "needs a session id"),
        ({**live, "source": f"live:{foreign}", "speed": "10"}, 4400, "speed does not apply"),
    ]
    for query, code, words in cases:
        with api.connect(query, token=vera) as ws:
            got = refusal(ws)
        assert got[0] == code, (query, got)
        assert words in got[1], (query, got)
    assert api.hub_state() == []
