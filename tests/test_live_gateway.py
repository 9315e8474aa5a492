"""The local Live gateway against the official ``databento.Live`` client, unmodified.

The tape for most tests is two small synthetic MBO files written here with ``databento_dbn``
(ESH4 and ESM4, interleaved in time); expected records are computed from what was written, not
from the gateway. The recorded live session and the real ES file come from the shared samples.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import databento
import databento_dbn
import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from databento.common.error import BentoError, BentoWarning
from databento_dbn.metadata import MappingInterval
from typer.testing import CliRunner

from qmachina.gateway_cli import app as cli_app
from qmachina.gateway_cli import build_gateway
from qmachina.live.gateway import GatewayThread, LiveGateway
from qmachina.live.gateway_book import MBO_RECORD_DTYPE
from qmachina.live.gateway_faults import Fault, FaultKind, FaultSpecError, parse_fault
from qmachina.live.gateway_protocol import (
    HEARTBEAT,
    ProtocolError,
    cram_response,
    parse_control_line,
    parse_subscription,
    system_record,
    with_ts_out,
)
from qmachina.live.gateway_tape import load_tape
from tests.reference_book import ReferenceBook

KEY = "db-" + "k" * 24 + "tests"
DATASET = "GLBX.MDP3"
T0 = 1_703_548_800_000_000_000  # 2023-12-26 00:00 UTC
SPACING_NS = 50_000_000  # one record per instrument every 50 ms of tape time
COUNT = 400  # records per instrument: 20 s of tape
ESH4, ESM4 = 1001, 1002
SECOND = 1_000_000_000
F_LAST, F_SNAPSHOT = 128, 32


# ------------------------------------------------------------------------------ test tape


@dataclass
class _Interval:
    start_date: date
    end_date: date
    symbol: str


@dataclass
class _Mapping:
    raw_symbol: str
    intervals: Sequence[MappingInterval]


def _flow(instrument_id: int, count: int, seed: int, offset_ns: int) -> npt.NDArray[np.void]:
    """Valid MBO flow: Adds, partial and full Cancels, Modifies and Trades around a mid."""
    rng = np.random.default_rng(seed)
    tick = 250_000_000
    mid = (4800 + instrument_id % 10) * 1_000_000_000
    recs = np.zeros(count, dtype=MBO_RECORD_DTYPE)
    orders: dict[int, tuple[int, int, int]] = {}  # id -> (side, price, size)
    next_id = instrument_id * 1_000_000
    for i in range(count):
        roll = rng.random()
        side, price, size, oid, action = ord("N"), mid, 1, 0, ord("T")
        if len(orders) < 6 or roll < 0.45:
            next_id += 1
            oid, action = next_id, ord("A")
            side = ord("B") if rng.random() < 0.5 else ord("A")
            away = int(rng.integers(1, 6)) * tick
            price = mid - away if side == ord("B") else mid + away
            size = int(rng.integers(1, 10))
            orders[oid] = (side, price, size)
        elif roll < 0.65:
            oid = int(rng.choice(list(orders)))
            side, price, resting = orders[oid]
            action = ord("C")
            size = resting if rng.random() < 0.5 else int(rng.integers(1, resting + 1))
            if size >= resting:
                del orders[oid]
            else:
                orders[oid] = (side, price, resting - size)
        elif roll < 0.9:
            oid = int(rng.choice(list(orders)))
            side, price, size = orders[oid]
            action = ord("M")
            if rng.random() < 0.5:
                price += tick if side == ord("A") else -tick
            size = max(1, size + int(rng.integers(-2, 3)))
            orders[oid] = (side, price, size)
        ts_recv = T0 + i * SPACING_NS + offset_ns
        recs[i] = (
            MBO_RECORD_DTYPE.itemsize // 4,
            0xA0,
            1,
            instrument_id,
            ts_recv - 20_000,
            oid,
            price,
            size,
            F_LAST,
            0,
            action,
            side,
            ts_recv,
            20_000,
            i + 1,
        )
    return recs


def _write(path: Path, records: npt.NDArray[np.void], symbol: str) -> None:
    iid = str(int(records["instrument_id"][0]))
    metadata = databento_dbn.Metadata(
        dataset=DATASET,
        start=int(records["ts_recv"][0]),
        stype_in=databento_dbn.SType.from_str("raw_symbol"),
        stype_out=databento_dbn.SType.from_str("instrument_id"),
        schema=databento_dbn.Schema.from_str("mbo"),
        symbols=[symbol],
        partial=[],
        not_found=[],
        mappings=[_Mapping(symbol, [_Interval(date(2023, 12, 26), date(2023, 12, 27), iid)])],
        end=int(records["ts_recv"][-1]) + 1,
        version=3,
    )
    data = bytes(metadata.encode()) + records.tobytes()
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


@dataclass
class Flow:
    """The synthetic tape: the files and, per raw symbol, the records written."""

    paths: list[Path]
    records: dict[str, npt.NDArray[np.void]]

    def raw(self, symbol: str) -> list[bytes]:
        return [r.tobytes() for r in self.records[symbol]]


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Flow:
    root = tmp_path_factory.mktemp("gateway")
    front = _flow(ESH4, COUNT, seed=1, offset_ns=0)
    back = _flow(ESM4, COUNT, seed=2, offset_ns=SPACING_NS // 2)
    paths = [root / "esh4.mbo.dbn.zst", root / "esm4.mbo.dbn"]
    _write(paths[0], front, "ESH4")
    _write(paths[1], back, "ESM4")
    return Flow(paths, {"ESH4": front, "ESM4": back})


# ---------------------------------------------------------------------------- the client


@dataclass
class Received:
    """What one client got: every record with its arrival time, and the raw stream."""

    records: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    stream: io.BytesIO = field(default_factory=io.BytesIO)

    def add(self, record: Any) -> None:
        self.times.append(time.monotonic())
        self.records.append(record)

    def mbo(self) -> list[bytes]:
        return [bytes(r) for r in self.records if isinstance(r, databento_dbn.MBOMsg)]

    def of(self, kind: type) -> list[Any]:
        return [r for r in self.records if isinstance(r, kind)]

    def mappings(self) -> list[tuple[str, int, str]]:
        return [
            (m.stype_in_symbol, m.instrument_id, m.stype_out_symbol)
            for m in self.of(databento_dbn.SymbolMappingMsg)
        ]


def connect(port: int, key: str = KEY, **options: Any) -> tuple[databento.Live, Received]:
    client = databento.Live(key=key, gateway="127.0.0.1", port=port, **options)
    got = Received()
    client.add_callback(got.add)
    client.add_stream(got.stream)
    return client, got


def run_to_close(
    port: int, schema: str, symbols: Any, timeout: float = 10, **subscription: Any
) -> Received:
    """Subscribe, start and wait until the gateway closes the session."""
    client, got = connect(port)
    client.subscribe(DATASET, schema, symbols, **subscription)
    client.start()
    client.block_for_close(timeout=timeout)
    return got


def gateway(flow: Flow, **options: Any) -> GatewayThread:
    options.setdefault("keys", [KEY])
    return GatewayThread(LiveGateway.from_files(flow.paths, **options))


def mbo_array(raw: list[bytes]) -> npt.NDArray[np.void]:
    return np.frombuffer(b"".join(raw), dtype=MBO_RECORD_DTYPE)


def reference_book(records: npt.NDArray[np.void]) -> ReferenceBook:
    book = ReferenceBook()
    for action, side, price, size, oid, flags in zip(
        *(records[f].tolist() for f in ("action", "side", "price", "size", "order_id", "flags")),
        strict=True,
    ):
        book.apply(action, side, price, size, oid, flags)
    return book


# ----------------------------------------------------------------------- tape and client


def test_tape_holds_the_files_records_in_time_order(flow: Flow) -> None:
    tape = load_tape(flow.paths)
    assert tape.dataset == DATASET
    assert len(tape) == 2 * COUNT
    assert tape.record_size == 56
    assert dict(tape.raw_symbols) == {"ESH4": ESH4, "ESM4": ESM4}
    assert (np.diff(tape.ts_index.astype(np.int64)) > 0).all()
    # Interleaved: ESH4, ESM4, ESH4, ... each exactly as written.
    assert tape.records(range(0, 2 * COUNT, 2)) == flow.raw("ESH4")
    assert tape.records(range(1, 2 * COUNT, 2)) == flow.raw("ESM4")


def test_official_client_receives_the_live_tape(flow: Flow) -> None:
    with gateway(flow, speed=40.0, close_at_end=True) as gw:
        got = run_to_close(gw.port, "mbo", ["ESH4"])
        expected = gw.tape_records("mbo", "ESH4")
    assert expected == flow.raw("ESH4")
    received = got.mbo()
    # Live from where the session started: a contiguous run up to the end of the tape.
    assert 0 < len(received) <= COUNT
    assert received == expected[-len(received) :]
    assert got.mappings() == [("ESH4", ESH4, "ESH4")]
    acks = [m.msg for m in got.of(databento_dbn.SystemMsg) if not m.is_heartbeat()]
    assert acks == ["Subscription request 0 for mbo data succeeded"]
    store = databento.DBNStore.from_bytes(got.stream.getvalue())
    assert store.metadata.dataset == DATASET
    assert store.metadata.schema is None
    assert len(store.to_ndarray(schema="mbo")) == len(received)


def test_subscription_by_instrument_id_and_parent_symbol(flow: Flow) -> None:
    with gateway(flow, speed=math.inf, close_at_end=True) as gw:
        by_id = run_to_close(gw.port, "mbo", [ESM4], stype_in="instrument_id", start=0)
        parent = run_to_close(gw.port, "mbo", "ES.FUT", stype_in="parent", start=0)
    assert by_id.mbo() == flow.raw("ESM4")
    assert by_id.mappings() == [(str(ESM4), ESM4, "ESM4")]
    both = [
        bytes(r)
        for r in sorted(np.concatenate(list(flow.records.values())), key=lambda r: r["ts_recv"])
    ]
    assert parent.mbo() == both
    assert sorted(parent.mappings()) == [("ES.FUT", ESH4, "ESH4"), ("ES.FUT", ESM4, "ESM4")]


def test_zstd_and_ts_out_sessions(flow: Flow) -> None:
    with gateway(flow, speed=math.inf, close_at_end=True) as gw:
        client, got = connect(gw.port, compression=databento_dbn.Compression.ZSTD, ts_out=True)
        client.subscribe(DATASET, "mbo", "ESH4", start=0)
        client.start()
        client.block_for_close(timeout=10)
    received = got.mbo()
    # ts_out appends 8 bytes and grows the length field by two words.
    assert [bytes([r[0] - 2]) + r[1:-8] for r in received] == flow.raw("ESH4")
    assert all(r.ts_out > 0 for r in got.of(databento_dbn.MBOMsg))


def test_ts_out_stamps_the_send_clock_given(flow: Flow) -> None:
    stamps = iter(range(T0 + 1, T0 + 1_000_000))
    with gateway(flow, speed=math.inf, close_at_end=True, send_clock=lambda: next(stamps)) as gw:
        client, got = connect(gw.port, ts_out=True)
        client.subscribe(DATASET, "mbo", "ESH4", start=0)
        client.start()
        client.block_for_close(timeout=10)
    sent = [r.ts_out for r in got.of(databento_dbn.MBOMsg)]
    # One stamp per send, read when it goes out: non-decreasing, from the clock given.
    assert len(sent) == COUNT
    assert sent == sorted(sent)
    assert T0 < sent[0] <= sent[-1] < T0 + 1_000_000


def test_recorded_live_session_replays_and_decodes(sample_dir: Path) -> None:
    path = sample_dir / "live_test_data.live.dbn.zst"
    source = databento.DBNStore.from_bytes(path.read_bytes())
    market = [r for r in source if not isinstance(r, databento_dbn.SymbolMappingMsg)]
    expected = [bytes(r) for r in sorted(market, key=lambda r: r.ts_index)]  # stable
    schemas = [
        "mbo",
        "mbp-1",
        "mbp-10",
        "trades",
        "ohlcv-1s",
        "ohlcv-1m",
        "statistics",
        "definition",
    ]
    gw = LiveGateway.from_files([path], keys=[KEY], speed=math.inf, close_at_end=True)
    with GatewayThread(gw):
        client, got = connect(gw.port)
        for schema in schemas:
            client.subscribe(DATASET, schema, "ESZ4", start=0)
        client.start()
        client.block_for_close(timeout=10)
    data = [
        r
        for r in got.records
        if not isinstance(r, databento_dbn.SymbolMappingMsg | databento_dbn.SystemMsg)
    ]
    assert [bytes(r) for r in data] == expected
    assert len(expected) == 26
    assert {m[1:] for m in got.mappings()} == {(183748, "ESZ4")}
    finished = {
        m.msg
        for m in got.of(databento_dbn.SystemMsg)
        if m.code == databento_dbn.SystemCode.REPLAY_COMPLETED
    }
    assert finished == {f"Finished {s} replay" for s in schemas}
    with warnings.catch_warnings():
        warnings.simplefilter("error", BentoWarning)
        store = databento.DBNStore.from_bytes(got.stream.getvalue())
        counts = {schema: len(store.to_ndarray(schema=schema)) for schema in schemas}
    assert counts == {
        "mbo": 5, "mbp-1": 2, "mbp-10": 2, "trades": 2, "ohlcv-1s": 2, "ohlcv-1m": 2,
        "statistics": 9, "definition": 2,
    }  # fmt: skip


# -------------------------------------------------------------------- replay and snapshot


def test_start_replays_exactly_the_records_since_start(flow: Flow) -> None:
    # Just after the ts_event of ESM4's record 100 and before its ts_recv: replay filters on
    # ts_event, so that record is not replayed.
    start = T0 + 100 * SPACING_NS + SPACING_NS // 2 - 20_000 + 1
    with gateway(flow, speed=40.0, start_at=T0 + 10 * SECOND, close_at_end=True) as gw:
        got = run_to_close(gw.port, "mbo", "ESM4", start=start)
    since = flow.records["ESM4"][flow.records["ESM4"]["ts_event"] >= start]
    assert 0 < len(since) < COUNT
    assert got.mbo() == [r.tobytes() for r in since]
    # The history (records before the session started, which is after the clock's start) is
    # replayed first, then "replay completed" (stamped with the tape time at catching up).
    done = [
        r
        for r in got.records
        if isinstance(r, databento_dbn.SystemMsg) and r.msg == "Finished mbo replay"
    ]
    assert len(done) == 1
    cut = got.records.index(done[0])
    replayed = [r.ts_recv for r in got.records[:cut] if isinstance(r, databento_dbn.MBOMsg)]
    assert T0 + 10 * SECOND - SPACING_NS <= max(replayed) <= done[0].ts_event


def test_snapshot_of_the_real_es_book(sample_dir: Path) -> None:
    path = sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst"
    tape = load_tape([path])
    whole = reference_book(mbo_array(tape.records(range(len(tape)))))
    # The clock starts after the last record: the whole file is history, the book is final.
    gw = LiveGateway(tape, keys=[KEY], start_at=tape.end_ns + 1, close_at_end=True)
    with GatewayThread(gw):
        got = run_to_close(gw.port, "mbo", "ESH4", snapshot=True)
    snap = mbo_array(got.mbo())
    assert snap["action"][0] == ord("R")
    assert (snap["flags"] & F_SNAPSHOT).all()
    assert np.flatnonzero(snap["flags"] & F_LAST).tolist() == [len(snap) - 1]
    book = reference_book(snap)
    assert len(book.orders) == 11_217  # as FACTS.md records for this file
    assert book.levels(0)[0][0] == 4_810_000_000_000
    assert book.levels(1)[0][0] == 4_810_250_000_000
    assert book.levels(0) == whole.levels(0)
    assert book.levels(1) == whole.levels(1)


def test_snapshot_then_live_rebuilds_the_book(sample_dir: Path) -> None:
    path = sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst"
    tape = load_tape([path])
    whole = reference_book(mbo_array(tape.records(range(len(tape)))))
    # 30 minutes of tape remain when the clock starts; at 3000x they take 0.6 s.
    gw = LiveGateway(
        tape, keys=[KEY], speed=3000.0, start_at=tape.end_ns - 1800 * SECOND, close_at_end=True
    )
    with GatewayThread(gw):
        got = run_to_close(gw.port, "mbo", "ESH4", snapshot=True)
        expected = gw.tape_records("mbo", "ESH4")
    received = got.mbo()
    flags = mbo_array(received)["flags"]
    n_snap = int(np.argmax(flags & F_LAST)) + 1
    assert (flags[:n_snap] & F_SNAPSHOT).all()
    assert not (flags[n_snap:] & F_SNAPSHOT).any()
    live = received[n_snap:]
    assert live
    assert live == expected[-len(live) :]
    # Snapshot at an arbitrary point plus the live records gives the final book exactly.
    book = reference_book(mbo_array(received))
    assert book.levels(0) == whole.levels(0)
    assert book.levels(1) == whole.levels(1)


# --------------------------------------------------------------------------------- faults


@pytest.mark.parametrize("kind", ["reset", "close", "error"])
def test_connection_fault_after_a_record_count(flow: Flow, kind: str) -> None:
    fault = (
        parse_fault(f"{kind}@100,msg=boom, and more", T0)
        if kind == "error"
        else parse_fault(f"{kind}@100", T0)
    )
    with gateway(flow, speed=math.inf, faults=[fault]) as gw:
        client, got = connect(gw.port)
        client.subscribe(DATASET, "mbo", "ESH4", start=0)
        client.start()
        if kind == "close":
            client.block_for_close(timeout=10)  # a clean close is no error
        else:
            match = "reset" if kind == "reset" else "boom, and more"
            with pytest.raises(BentoError, match=match):
                client.block_for_close(timeout=10)
    received = got.mbo()
    if kind == "reset":
        assert len(received) <= 100  # in-flight data may be lost on a reset
    else:
        assert len(received) == 100
    assert received == flow.raw("ESH4")[: len(received)]
    errors = [e.err for e in got.of(databento_dbn.ErrorMsg)]
    assert errors == (["boom, and more"] if kind == "error" else [])


def test_clients_own_reconnect_policy_recovers_from_a_reset(flow: Flow) -> None:
    gaps: list[tuple[Any, Any]] = []
    with gateway(
        flow, speed=math.inf, faults=[parse_fault("reset@100", T0)], close_at_end=True
    ) as gw:
        client, got = connect(gw.port, reconnect_policy="reconnect")
        client.add_reconnect_callback(lambda start, end: gaps.append((start, end)))
        client.subscribe(DATASET, "mbo", "ESH4", start=0)
        client.start()
        client.block_for_close(timeout=10)  # reconnected, then closed cleanly at the end
    assert len(gaps) == 1
    # It resubscribed without start=, so what the market did meanwhile is lost (FACTS.md).
    assert got.mbo() == flow.raw("ESH4")[: len(got.mbo())]
    assert len(got.mbo()) <= 100
    assert len(got.of(databento_dbn.SymbolMappingMsg)) == 2  # one per session


def test_close_at_a_tape_time_hits_the_connected_session(flow: Flow) -> None:
    at = T0 + 10 * SECOND  # one second of wall time after the gateway starts, at 10x
    with gateway(flow, speed=10.0, faults=[Fault(FaultKind.CLOSE, at_ns=at)]) as gw:
        started = time.monotonic()
        got = run_to_close(gw.port, "mbo", "ESH4", start=0)
        elapsed = time.monotonic() - started
    records = flow.records["ESH4"]
    assert got.mbo() == [r.tobytes() for r in records[records["ts_recv"] < at]]
    assert 0.8 < elapsed < 5


def test_stall_sends_nothing_not_even_heartbeats(flow: Flow) -> None:
    stall = Fault(FaultKind.STALL, after_records=100, seconds=0.6)
    with gateway(flow, speed=math.inf, faults=[stall], heartbeat_s=0.05) as gw:
        client, got = connect(gw.port)
        client.subscribe(DATASET, "mbo", "ESH4", start=0)
        client.start()
        time.sleep(1.2)
        client.stop()
        client.block_for_close(timeout=5)
    assert got.mbo() == flow.raw("ESH4")  # nothing lost, only late
    kinds = [type(r).__name__ for r in got.records]
    hundredth = [i for i, r in enumerate(got.records) if isinstance(r, databento_dbn.MBOMsg)][99]
    gap = got.times[hundredth + 1] - got.times[hundredth]
    assert gap >= 0.5, kinds[hundredth : hundredth + 3]
    # Outside the stall heartbeats keep coming while the tape is quiet.
    beats = [
        t
        for r, t in zip(got.records, got.times, strict=True)
        if isinstance(r, databento_dbn.SystemMsg) and r.is_heartbeat()
    ]
    assert len(beats) >= 3
    assert max(np.diff(beats)) < 0.3
    assert min(beats) > got.times[hundredth] + 0.5


def test_down_refuses_connections_then_accepts_again(flow: Flow) -> None:
    down = Fault(FaultKind.DOWN, after_records=50, seconds=0.8)
    with gateway(flow, speed=math.inf, faults=[down], close_at_end=True) as gw:
        client, got = connect(gw.port)
        client.subscribe(DATASET, "mbo", "ESH4", start=0)
        client.start()
        with pytest.raises(BentoError):
            client.block_for_close(timeout=10)
        went_down = time.monotonic()
        refusals: list[str] = []
        again: Received | None = None
        while again is None and time.monotonic() < went_down + 5:
            try:
                again = run_to_close(gw.port, "mbo", "ESH4", start=0)
            except BentoError as exc:
                refusals.append(str(exc))
                time.sleep(0.05)
        back_after = time.monotonic() - went_down
    assert again is not None
    assert refusals
    # Refused (nothing listens), not reset (something listens and drops the connection).
    assert all(f"[Errno {errno.ECONNREFUSED}]" in message for message in refusals)
    assert 0.6 < back_after < 3
    assert len(got.mbo()) <= 50
    assert again.mbo() == flow.raw("ESH4")


def test_contract_roll_switches_the_continuous_symbol(flow: Flow) -> None:
    roll_at = T0 + 12 * SECOND
    roll = parse_fault("roll@2023-12-26T00:00:12Z,ES.c.0=ESM4", T0)
    assert roll.at_ns == roll_at
    options: dict[str, Any] = {"continuous": {"ES.c.0": "ESH4"}, "faults": [roll]}
    with gateway(flow, speed=20.0, start_at=T0 + 10 * SECOND, close_at_end=True, **options) as gw:
        live = run_to_close(gw.port, "mbo", "ES.c.0", stype_in="continuous")
        replay = run_to_close(gw.port, "mbo", "ES.c.0", stype_in="continuous", start=0)
        expected = gw.tape_records("mbo", "ES.c.0", stype_in="continuous")
    front, back = flow.records["ESH4"], flow.records["ESM4"]
    rolled = [r.tobytes() for r in front[front["ts_recv"] < roll_at]]
    rolled += [r.tobytes() for r in back[back["ts_recv"] >= roll_at]]
    assert expected == rolled
    assert replay.mbo() == rolled
    received = live.mbo()
    assert received
    assert received == rolled[-len(received) :]
    for got in (live, replay):
        assert got.mappings() == [("ES.c.0", ESH4, "ESH4"), ("ES.c.0", ESM4, "ESM4")]
        # The new mapping comes between the last old-contract and the first new-contract record.
        order = [
            ("map", r.instrument_id)
            if isinstance(r, databento_dbn.SymbolMappingMsg)
            else ("mbo", r.instrument_id)
            for r in got.records
            if isinstance(r, databento_dbn.SymbolMappingMsg | databento_dbn.MBOMsg)
        ]
        switch = order.index(("map", ESM4))
        assert all(iid == ESH4 for _, iid in order[1:switch])
        assert all(iid == ESM4 for _, iid in order[switch:])
        assert ("mbo", ESH4) in order[:switch]
        assert ("mbo", ESM4) in order[switch:]


def test_market_keeps_moving_while_a_client_is_away(flow: Flow) -> None:
    with gateway(flow, speed=20.0, close_at_end=True) as gw:
        first, got = connect(gw.port)
        first.subscribe(DATASET, "mbo", "ESH4")
        first.start()
        time.sleep(0.15)
        first.stop()
        first.block_for_close(timeout=5)
        time.sleep(0.2)  # four seconds of tape pass with nobody connected
        later = run_to_close(gw.port, "mbo", "ESH4")
        last = got.of(databento_dbn.MBOMsg)[-1]
        caught_up = run_to_close(gw.port, "mbo", "ESH4", start=last.ts_event + 1)
    tape = flow.raw("ESH4")
    seen, resumed = got.mbo(), later.mbo()
    assert seen
    assert resumed
    gap = tape.index(resumed[0]) - tape.index(seen[-1]) - 1
    assert gap >= 40  # 2 s or more of tape missed by a plain resubscription
    assert caught_up.mbo() == tape[tape.index(seen[-1]) + 1 :]  # start= recovers them


# ---------------------------------------------------------------------------- protocol


def test_bad_key_and_unknown_dataset_are_refused(flow: Flow) -> None:
    with gateway(flow) as gw:
        client, _ = connect(gw.port, key="db-" + "x" * 24 + "tests")
        with pytest.raises(BentoError, match="Authentication failed"):
            client.subscribe(DATASET, "mbo", "ESH4")
        client, _ = connect(gw.port)
        with pytest.raises(BentoError, match=r"Unknown dataset XNAS\.ITCH"):
            client.subscribe("XNAS.ITCH", "mbo", "NVDA")


def test_protocol_lines_and_fault_specs() -> None:
    assert cram_response("abc", KEY) == hashlib.sha256(f"abc|{KEY}".encode()).hexdigest() + "-tests"
    request = parse_subscription(
        parse_control_line(
            b"schema=mbo|stype_in=continuous|symbols=ES.c.0,NQ.c.0|start=2023-12-26T00:00:01Z|snapshot=0|id=3|is_last=1\n"
        )
    )
    assert request.symbols == ("ES.c.0", "NQ.c.0")
    assert request.start == T0 + SECOND
    assert request.request_id == 3
    assert request.stype_in == "continuous"
    with pytest.raises(ProtocolError, match="snapshot"):
        parse_subscription({"schema": "mbo", "symbols": "ESH4", "start": "1", "snapshot": "1"})
    with pytest.raises(ProtocolError, match="unknown schema"):
        parse_subscription({"schema": "mbo-7", "symbols": "ESH4"})
    assert parse_fault("stall@+1.5s,for=2", T0) == Fault(
        FaultKind.STALL, at_ns=T0 + 1_500_000_000, seconds=2.0
    )
    assert parse_fault("down@ns5,for=0.5", T0) == Fault(FaultKind.DOWN, at_ns=5, seconds=0.5)
    assert parse_fault("reset@0", T0).after_records == 0
    for bad in ("reset", "explode@5", "stall@5", "roll@5,ES.c.0=ESM4", "close@soon", "error@5,x=1"):
        with pytest.raises(FaultSpecError):
            parse_fault(bad, T0)


def _with_ts_out_reference(records: bytes, ts_out: int) -> bytes:
    """ts_out one record at a time: grow the length byte by two words, append the stamp."""
    out, pos, stamp = bytearray(), 0, ts_out.to_bytes(8, "little")
    while pos < len(records):
        length = records[pos] * 4
        out += bytes([records[pos] + 2]) + records[pos + 1 : pos + length] + stamp
        pos += length
    return bytes(out)


def test_ts_out_stamps_every_record_as_the_reference_does(flow: Flow) -> None:
    rng = np.random.default_rng(3)
    mbo = flow.raw("ESH4")[:200]
    heartbeat = system_record(3, T0, "Heartbeat", HEARTBEAT)
    mixed = b"".join(mbo[i] if i < len(mbo) else heartbeat for i in rng.integers(0, 260, 300))
    stamp = T0 + 123_456_789
    for records in (b"".join(mbo), mixed, b""):
        assert with_ts_out(records, stamp) == _with_ts_out_reference(records, stamp)
    with pytest.raises(ValueError, match="torn record at byte 56"):
        with_ts_out(mbo[0] + mbo[1][:20], stamp)


def test_command_options_build_the_gateway(flow: Flow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABENTO_API_KEY", KEY)  # the key comes from the environment
    gw = build_gateway(
        flow.paths,
        keys=[],
        keys_file=None,
        host="127.0.0.1",
        port=0,
        speed="max",
        start_at="+10s",
        fault_specs=["close@60"],
        continuous=["ES.c.0=ESH4"],
        symbols=[],
        heartbeat=None,
        close_at_end=True,
    )
    assert gw.clock.origin_ns == T0 + 10 * SECOND
    assert math.isinf(gw.clock.speed)
    with GatewayThread(gw):
        got = run_to_close(gw.port, "mbo", "ES.c.0", stype_in="continuous", start=0)
    assert got.mbo() == flow.raw("ESH4")[:60]


def test_command_reports_bad_options(flow: Flow) -> None:
    runner = CliRunner()
    data = ["--data", str(flow.paths[0]), "--key", KEY]
    result = runner.invoke(cli_app, [*data, "--fault", "explode@5"])
    assert result.exit_code == 2
    assert "unknown fault kind 'explode'" in result.stderr
    result = runner.invoke(cli_app, [*data, "--speed", "fast"])
    assert result.exit_code == 2
    assert "--speed 'fast'" in result.stderr
    result = runner.invoke(cli_app, ["--data", str(flow.paths[0]), "--key", "db-short-secret"])
    assert result.exit_code == 2
    assert "not a Databento API key" in result.stderr
    assert "db-short-secret" not in result.stderr + result.stdout
