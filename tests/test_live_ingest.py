"""Live ingestion into bronze against the local gateway and the official client, unmodified.

The tape: two synthetic MBO instruments (ESH4, ESM4) written here with ``databento_dbn``,
interleaved in time, three records per ``ts_event`` so the checkpoint's count matters. What
bronze must hold is the gateway's own ``tape_records`` for the subscription: byte for byte, no
gap, no duplicate, whatever faults hit the connection.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import databento
import databento_dbn
import numpy as np
import pytest
from pydantic import SecretStr

from engine.replay import replay_files
from qmachina.live.bronze import (
    NS_PER_DAY,
    Bronze,
    BronzeCorruptError,
    BronzeError,
    BronzeLockedError,
    BronzeMismatchError,
    BronzeStream,
    TornRecord,
    read_bronze_file,
)
from qmachina.live.checkpoint import Checkpoint, CheckpointTracker, ReplayFilter
from qmachina.live.gateway import GatewayThread, LiveGateway
from qmachina.live.gateway_faults import Fault, FaultKind
from qmachina.live.gateway_protocol import HEARTBEAT
from qmachina.live.gateway_tape import load_tape
from qmachina.live.ingest import (
    IngestSummary,
    LiveAuthenticationError,
    LiveConnectionError,
    LiveDatasetError,
    LiveIngestor,
    LiveTarget,
    ReconnectPolicy,
    heartbeat_for,
)
from qmachina.live.ingest_events import (
    Connected,
    Disconnected,
    DisconnectReason,
    GatewayError,
    LiveEvent,
    Progress,
    Reconnecting,
    SymbolMapped,
)
from qmachina.live.record_block import RecordBlock
from qmachina.live.rolls import (
    CalendarRollPolicy,
    CalendarTracker,
    Contract,
    ContractRoll,
    ContractTracker,
)
from tests.conftest import REPO_ROOT
from tests.live_ingest_child import KEY_VARIABLE
from tests.live_tapes import (
    BURST,
    COUNT,
    DATASET,
    ESH4,
    ESM4,
    STEP_NS,
    T0,
    write_two_contract_tape,
)

KEY = "db-" + "k" * 24 + "tests"
SECOND = 1_000_000_000
ESH4_REAL = 17077  # in the shared ES file
FAST = ReconnectPolicy(initial_seconds=0.02, multiplier=2.0, max_seconds=0.2, jitter=0.25)
WATCHDOG_S = 0.3
HEARTBEAT_S = 0.05


# ------------------------------------------------------------------------------- the tape


@pytest.fixture(scope="module")
def tape_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_two_contract_tape(tmp_path_factory.mktemp("tape"))


def gateway(paths: list[Path], **options: Any) -> LiveGateway:
    options.setdefault("keys", [KEY])
    options.setdefault("heartbeat_s", HEARTBEAT_S)
    return LiveGateway.from_files(paths, symbols={"ESH4": ESH4, "ESM4": ESM4}, **options)


def target(port: int, symbols: Sequence[str] = ("ESH4", "ESM4"), **options: Any) -> LiveTarget:
    options.setdefault("key", SecretStr(KEY))
    return LiveTarget(
        host="127.0.0.1", port=port, dataset=DATASET, symbols=tuple(symbols), **options
    )


def bronze_records(bronze: Bronze) -> list[bytes]:
    """Every record in the session's files, in order."""
    records: list[bytes] = []
    for path in bronze.files():
        records += read_bronze_file(path)[1].records()
    return records


def reference_checkpoint(records: Sequence[bytes]) -> dict[int, tuple[int, int]]:
    """The checkpoint rule, one record at a time: last ts_event and its trailing run."""
    state: dict[int, tuple[int, int]] = {}
    for record in records:
        iid = int.from_bytes(record[4:8], "little")
        ts = int.from_bytes(record[8:16], "little")
        last = state.get(iid)
        state[iid] = (ts, last[1] + 1) if last is not None and last[0] == ts else (ts, 1)
    return state


@dataclass
class Run:
    """One ingestor run in a thread, with everything it reported."""

    summary: IngestSummary | None = None
    events: list[LiveEvent] = field(default_factory=list)
    error: BaseException | None = None

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def ingest_until(
    ingestor_of: Callable[[Callable[[LiveEvent], None]], LiveIngestor],
    count: int,
    timeout: float = 20.0,
) -> Run:
    """Run an ingestor until it has written ``count`` records (or ``timeout``), then stop it."""
    run = Run()
    ingestor = ingestor_of(run.events.append)
    stop = threading.Event()

    def work() -> None:
        try:
            run.summary = ingestor.run(stop)
        except BaseException as exc:
            run.error = exc

    thread = threading.Thread(target=work, name="ingestor")
    thread.start()
    deadline = time.monotonic() + timeout
    while ingestor.written < count and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    if run.error is not None:
        raise run.error
    return run


# ------------------------------------------------------------------------------ clean run


def test_clean_run_writes_the_tape_byte_for_byte(tape_files: list[Path], tmp_path: Path) -> None:
    with GatewayThread(gateway(tape_files, speed=4.0)) as gw:
        expected = gw.tape_records("mbo", ["ESH4", "ESM4"], start=T0)
        with Bronze.open(tmp_path, "clean") as bronze:
            run = ingest_until(
                lambda on: LiveIngestor(
                    target(gw.port),
                    bronze,
                    policy=FAST,
                    watchdog_seconds=WATCHDOG_S,
                    on_event=on,
                    session_start=T0,
                ),
                len(expected),
            )
            got = bronze_records(bronze)
            checkpoint = bronze.checkpoint
            files = bronze.files()
    assert len(expected) == 2 * COUNT
    assert got == expected
    summary = run.summary
    assert summary is not None
    assert (summary.connections, summary.duplicates, summary.written) == (1, 0, 2 * COUNT)
    assert summary.disconnects == {}
    assert dict(checkpoint.instruments) == reference_checkpoint(expected)
    assert checkpoint.instruments[ESH4][1] == BURST
    assert [e.start for e in run.of(Connected)] == [T0]
    mapped = sorted((e.stype_in_symbol, e.instrument_id) for e in run.of(SymbolMapped))
    assert mapped == [("ESH4", ESH4), ("ESM4", ESM4)]
    progress = run.of(Progress)
    assert progress[-1].written == 2 * COUNT
    assert progress[-1].lag_ns is not None
    assert progress[-1].lag_ns > 0
    # One file for the day: a DBN file that databento and the engine read as they are.
    assert [p.name for p in files] == ["20231226.mbo.dbn"]
    store = databento.DBNStore.from_file(files[0])
    assert (store.metadata.dataset, str(store.schema), store.metadata.start) == (DATASET, "mbo", T0)
    assert len(store.to_ndarray()) == 2 * COUNT
    events = np.concatenate(list(replay_files(files, instrument_id=ESM4)))
    assert len(events) == COUNT


def test_real_es_flow_through_faults(sample_dir: Path, tmp_path: Path) -> None:
    # The shared ES file (DBN v1) from its busiest minutes (the Sunday open, 23:00 UTC): one
    # minute of history replayed, then a minute of live flow in one second of wall time, with
    # a reset and a close on tape time on the way.
    tape = load_tape([sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst"])
    live_from = tape.start_ns + 1381 * 60 * SECOND
    faults = [
        Fault(FaultKind.RESET, at_ns=live_from + 20 * SECOND),
        Fault(FaultKind.CLOSE, at_ns=live_from + 40 * SECOND),
    ]
    gw_options: dict[str, Any] = {"speed": 60.0, "start_at": live_from, "faults": faults}
    es = LiveGateway(tape, keys=[KEY], heartbeat_s=HEARTBEAT_S, **gw_options)
    session_start = live_from - 60 * SECOND
    with GatewayThread(es) as gw:
        expected = gw.tape_records("mbo", "ESH4", start=session_start)
        # The tape goes on for another hour; the test takes the first live minute.
        minute = tape.position_before(live_from + 60 * SECOND)
        with Bronze.open(tmp_path, "es") as bronze:
            run = ingest_until(
                lambda on: LiveIngestor(
                    target(gw.port, ["ESH4"]),
                    bronze,
                    policy=FAST,
                    watchdog_seconds=WATCHDOG_S,
                    on_event=on,
                    session_start=session_start,
                ),
                minute - tape.position_before(session_start),
            )
            got = bronze_records(bronze)
            files = bronze.files()
    assert len(got) > 8000
    assert got == expected[: len(got)]
    summary = run.summary
    assert summary is not None
    assert summary.disconnects == {DisconnectReason.RESET: 1, DisconnectReason.CLOSED: 1}
    # Bronze is the gateway's tape: its records and its DBN version (v1), not the client's v3.
    assert read_bronze_file(files[0])[0].version == 1
    events = np.concatenate(list(replay_files(files, instrument_id=ESH4_REAL)))
    assert len(events) == len(got)


# ----------------------------------------------------------------------------- the faults


def _disconnect_reason(kind: FaultKind) -> DisconnectReason:
    return {
        FaultKind.RESET: DisconnectReason.RESET,
        FaultKind.DOWN: DisconnectReason.RESET,  # the gateway drops every session with a RST
        FaultKind.CLOSE: DisconnectReason.CLOSED,
        FaultKind.STALL: DisconnectReason.WATCHDOG,
        FaultKind.ERROR: DisconnectReason.ERROR,
    }[kind]


def _fault(kind: FaultKind, *, at_ns: int | None = None, after: int | None = None) -> Fault:
    seconds = {FaultKind.STALL: 1.0, FaultKind.DOWN: 0.3}.get(kind, 0.0)
    message = "scheduled trouble"
    return Fault(kind, at_ns=at_ns, after_records=after, seconds=seconds, message=message)


@pytest.mark.parametrize(
    "kind",
    [FaultKind.RESET, FaultKind.CLOSE, FaultKind.STALL, FaultKind.ERROR, FaultKind.DOWN],
)
def test_fault_campaign_loses_and_repeats_nothing(
    tape_files: list[Path], tmp_path: Path, kind: FaultKind
) -> None:
    # Three faults at seeded random record counts; the tape is all history (as fast as the
    # gateway goes), so every reconnection replays from the checkpoint.
    rng = random.Random(f"campaign-{kind}")
    counts = sorted(rng.sample(range(100, 2000), 3))
    faults = [_fault(kind, after=n) for n in counts]
    with GatewayThread(gateway(tape_files, speed=math.inf, faults=faults)) as gw:
        expected = gw.tape_records("mbo", ["ESH4", "ESM4"], start=T0)
        with Bronze.open(tmp_path, "campaign") as bronze:
            run = ingest_until(
                lambda on: LiveIngestor(
                    target(gw.port),
                    bronze,
                    policy=FAST,
                    watchdog_seconds=WATCHDOG_S,
                    on_event=on,
                    session_start=T0,
                    seed=7,
                ),
                len(expected),
            )
            got = bronze_records(bronze)
    assert got == expected
    summary = run.summary
    assert summary is not None
    assert summary.disconnects == {_disconnect_reason(kind): 3}
    assert summary.connections == 4
    # Each replay sent at least the last record taken again; all of it was dropped.
    assert summary.duplicates >= 3
    assert summary.received == summary.written + summary.duplicates
    attempts = [e.attempt for e in run.of(Connected)]
    if kind is FaultKind.DOWN:
        refused = f"[Errno {errno.ECONNREFUSED}]"
        assert [e for e in run.of(Reconnecting) if refused in e.detail]
        assert attempts[0] == 0
        assert min(attempts[1:]) >= 2  # the first attempts found the gateway down
    else:
        assert attempts == [0, 1, 1, 1]
        # (attempts while the gateway was down were refused, and retried)
    if kind is FaultKind.ERROR:
        assert [e.message for e in run.of(GatewayError)] == ["scheduled trouble"] * 3
    # Every reconnection resumed from the checkpoint (minus the margin, not before T0).
    starts = [e.start for e in run.of(Connected)]
    assert starts[0] == T0
    assert starts == sorted(starts)


@pytest.mark.parametrize("seed", [1, 2])
def test_timed_faults_while_the_market_moves(
    tape_files: list[Path], tmp_path: Path, seed: int
) -> None:
    # Real time: what happens while the ingestor is away (a down gateway, a stall, a backoff)
    # is only recovered by the replay. Every kind once, in a seeded random order and time.
    rng = random.Random(seed)
    kinds = [FaultKind.RESET, FaultKind.CLOSE, FaultKind.STALL, FaultKind.ERROR, FaultKind.DOWN]
    rng.shuffle(kinds)
    # 0.85 s of tape apart (wall time at speed 1): each fault finds a connected session.
    times = [T0 + int((0.3 + 0.85 * i + rng.uniform(0, 0.1)) * SECOND) for i in range(5)]
    faults = [_fault(k, at_ns=t) for k, t in zip(kinds, times, strict=True)]
    with GatewayThread(gateway(tape_files, speed=1.0, faults=faults)) as gw:
        expected = gw.tape_records("mbo", ["ESH4", "ESM4"], start=T0)
        with Bronze.open(tmp_path, "timed") as bronze:
            run = ingest_until(
                lambda on: LiveIngestor(
                    target(gw.port),
                    bronze,
                    policy=FAST,
                    watchdog_seconds=WATCHDOG_S,
                    on_event=on,
                    session_start=T0,
                    seed=seed,
                ),
                len(expected),
            )
            got = bronze_records(bronze)
    assert got == expected
    summary = run.summary
    assert summary is not None
    assert summary.disconnects == {
        DisconnectReason.RESET: 2,
        DisconnectReason.CLOSED: 1,
        DisconnectReason.WATCHDOG: 1,
        DisconnectReason.ERROR: 1,
    }
    assert summary.connections == 6


# --------------------------------------------------------------------------------- crash


def test_crash_then_resume_from_the_files(tape_files: list[Path], tmp_path: Path) -> None:
    with GatewayThread(gateway(tape_files, speed=1.0)) as gw:
        expected = gw.tape_records("mbo", ["ESH4", "ESM4"], start=T0)
        command = [sys.executable, "-m", "tests.live_ingest_child", str(gw.port), str(tmp_path)]
        command += ["crash", str(T0), "ESH4", "ESM4"]
        child = subprocess.Popen(
            command, cwd=REPO_ROOT, env={**os.environ, KEY_VARIABLE: KEY}, stderr=subprocess.PIPE
        )
        day_file = tmp_path / "crash" / "20231226.mbo.dbn"
        deadline = time.monotonic() + 20
        try:
            # Kill it once it has a good part of the tape, while the market is still moving.
            while time.monotonic() < deadline and child.poll() is None:
                if day_file.exists() and day_file.stat().st_size > 800 * 56:
                    break
                time.sleep(0.01)
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stderr is not None:
                child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        killed_at = read_bronze_file(day_file)[1].records()
        assert 800 <= len(killed_at) < len(expected)
        assert killed_at == expected[: len(killed_at)]  # a prefix, nothing torn so far
        # A crash in the middle of a write leaves part of a record behind.
        size = day_file.stat().st_size
        with day_file.open("ab") as fh:
            fh.write(expected[len(killed_at)][:30])

        with Bronze.open(tmp_path, "crash") as bronze:
            assert bronze.truncated == (TornRecord(day_file, size, 30),)
            assert day_file.stat().st_size == size
            checkpoint = bronze.checkpoint
            assert checkpoint.records == len(killed_at)
            assert dict(checkpoint.instruments) == reference_checkpoint(killed_at)
            assert checkpoint.session_start == T0
            run = ingest_until(
                lambda on: LiveIngestor(
                    target(gw.port),
                    bronze,
                    policy=FAST,
                    watchdog_seconds=WATCHDOG_S,
                    on_event=on,
                    session_start=T0,
                ),
                len(expected) - len(killed_at),
            )
            got = bronze_records(bronze)
    assert got == expected
    assert [e.start for e in run.of(Connected)] == [checkpoint.resume_start(SECOND)]
    summary = run.summary
    assert summary is not None
    assert summary.duplicates >= 1


def test_stop_mid_stream_then_resume(tape_files: list[Path], tmp_path: Path) -> None:
    with GatewayThread(gateway(tape_files, speed=4.0)) as gw:
        expected = gw.tape_records("mbo", ["ESH4", "ESM4"], start=T0)

        def ingestor(bronze: Bronze) -> Callable[[Callable[[LiveEvent], None]], LiveIngestor]:
            return lambda on: LiveIngestor(
                target(gw.port),
                bronze,
                policy=FAST,
                watchdog_seconds=WATCHDOG_S,
                on_event=on,
                session_start=T0,
            )

        with Bronze.open(tmp_path, "stop") as bronze:
            first = ingest_until(ingestor(bronze), 1000)
            stopped_at = bronze_records(bronze)
        with Bronze.open(tmp_path, "stop") as bronze:
            assert bronze.truncated == ()
            second = ingest_until(ingestor(bronze), len(expected) - len(stopped_at))
            got = bronze_records(bronze)
    assert first.summary is not None
    assert 1000 <= len(stopped_at) == first.summary.written < len(expected)
    assert stopped_at == expected[: len(stopped_at)]
    assert [e.reason for e in first.events if isinstance(e, Disconnected)] == [
        DisconnectReason.STOPPED
    ]
    assert got == expected
    assert second.summary is not None
    assert second.summary.disconnects == {}


def test_a_failing_callback_stops_the_ingestor(tape_files: list[Path], tmp_path: Path) -> None:
    def on_event(event: LiveEvent) -> None:
        if isinstance(event, Progress) and event.written:
            raise RuntimeError("the caller gave up")

    with GatewayThread(gateway(tape_files, speed=math.inf)) as gw:
        with Bronze.open(tmp_path, "callback") as bronze:
            ingestor = LiveIngestor(target(gw.port), bronze, on_event=on_event, session_start=T0)
            with pytest.raises(RuntimeError, match="the caller gave up"):
                ingestor.run()
            written = bronze_records(bronze)  # synced on the way out
        assert written == gw.tape_records("mbo", ["ESH4", "ESM4"], start=T0)[: len(written)]
        assert written


# --------------------------------------------------------------------------- contract roll


def test_contract_roll_is_reported_once(tape_files: list[Path], tmp_path: Path) -> None:
    roll_at = T0 + 2 * SECOND
    faults = [
        Fault(FaultKind.ROLL, at_ns=roll_at, symbol="ES.c.0", to="ESM4"),
        # After the roll: the replay starts before it, so the old contract is announced again.
        Fault(FaultKind.RESET, at_ns=roll_at + SECOND // 2),
    ]
    tracker = ContractTracker(["ES.c.0"])
    rolls: list[ContractRoll] = []

    def on_event(event: LiveEvent) -> None:
        if isinstance(event, SymbolMapped) and (roll := tracker.observe(event)) is not None:
            rolls.append(roll)

    options: dict[str, Any] = {"continuous": {"ES.c.0": "ESH4"}, "faults": faults}
    with GatewayThread(gateway(tape_files, speed=2.0, **options)) as gw:
        expected = gw.tape_records("mbo", "ES.c.0", stype_in="continuous", start=T0)
        with Bronze.open(tmp_path, "roll") as bronze:

            def ingestor(on: Callable[[LiveEvent], None]) -> LiveIngestor:
                def both(event: LiveEvent) -> None:
                    on(event)
                    on_event(event)

                return LiveIngestor(
                    target(gw.port, ["ES.c.0"], stype_in="continuous"),
                    bronze,
                    policy=FAST,
                    watchdog_seconds=WATCHDOG_S,
                    on_event=both,
                    session_start=T0,
                )

            run = ingest_until(ingestor, len(expected))
            got = bronze_records(bronze)
    assert got == expected
    summary = run.summary
    assert summary is not None
    assert summary.disconnects == {DisconnectReason.RESET: 1}
    mapped = [e.instrument_id for e in run.of(SymbolMapped)]
    assert mapped == [ESH4, ESM4, ESH4, ESM4]  # the second connection restates the history
    assert len(rolls) == 1
    roll = rolls[0]
    assert (roll.symbol, roll.from_contract, roll.to_contract) == (
        "ES.c.0",
        Contract(ESH4, "ESH4"),
        Contract(ESM4, "ESM4"),
    )
    assert tracker.active("ES.c.0") == Contract(ESM4, "ESM4")
    # The old contract up to the roll, the new one after it.
    iids = [int.from_bytes(r[4:8], "little") for r in got]
    switch = iids.index(ESM4)
    assert set(iids[:switch]) == {ESH4}
    assert set(iids[switch:]) == {ESM4}
    first_new = int.from_bytes(got[switch][8:16], "little")
    assert roll_at - STEP_NS <= first_new


# ------------------------------------------------------------------------- refused sessions


def test_bad_key_or_dataset_raises_at_once(tape_files: list[Path], tmp_path: Path) -> None:
    bad_key = "db-" + "x" * 24 + "tests"
    # Should the ingestor retry instead of raising, the stop ends the test, not a hang.
    stop = threading.Event()
    timer = threading.Timer(3.0, stop.set)
    timer.start()
    with GatewayThread(gateway(tape_files)) as gw, Bronze.open(tmp_path, "refused") as bronze:
        events: list[LiveEvent] = []
        started = time.monotonic()
        with pytest.raises(LiveAuthenticationError, match="Authentication failed") as refused:
            LiveIngestor(
                target(gw.port, key=SecretStr(bad_key)), bronze, on_event=events.append
            ).run(stop)
        assert time.monotonic() - started < 2
        assert bad_key not in str(refused.value)
        assert refused.value.__cause__ is None
        assert not [e for e in events if isinstance(e, Reconnecting)]
        unknown = LiveTarget(
            host="127.0.0.1",
            port=gw.port,
            dataset="XNAS.ITCH",
            symbols=("NVDA",),
            key=SecretStr(KEY),
        )
        with pytest.raises(LiveDatasetError, match=r"Unknown dataset XNAS\.ITCH"):
            LiveIngestor(unknown, bronze).run(stop)
        assert bronze.files() == []
    timer.cancel()
    assert bad_key not in repr(target(1, key=SecretStr(bad_key)))


def test_unreachable_gateway_gives_up_after_max_attempts(tmp_path: Path) -> None:
    events: list[LiveEvent] = []
    policy = ReconnectPolicy(initial_seconds=0.01, max_seconds=0.05, max_attempts=3)
    with Bronze.open(tmp_path, "nowhere") as bronze:
        # Port 1 on localhost: nothing listens, so each attempt is refused at once.
        ingestor = LiveIngestor(target(1), bronze, policy=policy, on_event=events.append)
        with pytest.raises(LiveConnectionError, match="gave up after 3"):
            ingestor.run()
    assert [e.attempt for e in events if isinstance(e, Reconnecting)] == [1, 2, 3]


# -------------------------------------------------------------------------------- backoff


def test_backoff_grows_is_bounded_and_jittered() -> None:
    exact = ReconnectPolicy(initial_seconds=0.2, multiplier=2.0, max_seconds=3.0, jitter=0.0)
    rng = random.Random(1)
    assert [exact.delay(n, rng) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0]
    assert exact.delay(10_000, rng) == 3.0  # no overflow however long the outage
    jittered = ReconnectPolicy(initial_seconds=0.2, multiplier=2.0, max_seconds=3.0, jitter=0.25)
    for n in range(1, 12):
        base = min(0.2 * 2 ** (n - 1), 3.0)
        delays = [jittered.delay(n, rng) for _ in range(200)]
        assert all(0.75 * base <= d <= min(1.25 * base, 3.0) for d in delays)
        if 1.25 * base < 3.0:
            assert len(set(delays)) > 150  # spread, not one value
    means = [float(np.mean([jittered.delay(n, rng) for _ in range(200)])) for n in (1, 2, 3, 4)]
    assert means == sorted(means)
    for bad in (
        {"initial_seconds": 5.0, "max_seconds": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"max_attempts": -1},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each message names its own field
            ReconnectPolicy(**bad)


def test_the_heartbeat_asked_for_fits_under_the_watchdog() -> None:
    assert [heartbeat_for(w) for w in (5.5, 10.0, 11.0, 45.0, 600.0, 10_000.0)] == [
        5,
        5,
        5,
        22,
        300,
        1800,
    ]
    assert all(heartbeat_for(w) < w for w in (5.01, 6.0, 9.99, 10.0, 3601.0))
    for too_short in (0.5, 2.0, 5.0):
        with pytest.raises(ValueError, match=r"watchdog_seconds must exceed 5 s"):
            heartbeat_for(too_short)


# ------------------------------------------------------- checkpoint and dedup vs reference


def _stream(rng: random.Random, offsets: dict[int, int], n: int) -> list[bytes]:
    """Records in receive order: one clock that never goes back, each instrument's ts_event is
    that clock plus the instrument's own offset (its skew), often repeated."""
    clock = T0 + 1_000
    records: list[bytes] = []
    for i in range(n):
        iid = rng.choice(list(offsets))
        clock += rng.choice([0, 0, 1, 7])
        record = bytearray(56)
        record[0], record[1] = 14, 0xA0
        record[4:8] = iid.to_bytes(4, "little")
        record[8:16] = (clock + offsets[iid]).to_bytes(8, "little")
        record[16:24] = i.to_bytes(8, "little")  # order id: every record distinct
        records.append(bytes(record))
    return records


def _blocks(records: Sequence[bytes], rng: random.Random) -> list[RecordBlock]:
    """``records`` cut into up to six blocks at random places."""
    if len(records) < 2:
        return [RecordBlock.from_records(records)]
    cuts = sorted(rng.sample(range(1, len(records)), min(5, len(records) - 1)))
    bounds = [0, *cuts, len(records)]
    return [RecordBlock.from_records(records[a:b]) for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("skew", [0, 40])
def test_checkpoint_and_replay_filter_match_the_reference(seed: int, skew: int) -> None:
    rng = random.Random(seed)
    offsets = {7: 0, 8: -skew, 9: skew // 2}
    stream = _stream(rng, offsets, 400)
    taken = rng.randrange(0, len(stream) + 1)
    tracker = CheckpointTracker()
    for block in _blocks(stream[:taken], rng):
        tracker.advance(block)
    checkpoint = tracker.checkpoint()
    assert dict(checkpoint.instruments) == reference_checkpoint(stream[:taken])
    assert checkpoint.records == taken
    # A replay from the resume start, in arbitrary blocks, filtered, is exactly what was
    # missed. Instruments not seen yet may have earlier ts_events: the margin covers the skew.
    start = checkpoint.resume_start(margin_ns=skew)
    replay = [r for r in stream if start is None or int.from_bytes(r[8:16], "little") >= start]
    replay_filter = ReplayFilter(checkpoint)
    kept: list[bytes] = []
    dropped = 0
    for block in _blocks(replay, rng):
        out, n = replay_filter.apply(block)
        kept += out.records()
        dropped += n
    assert kept == stream[taken:]
    assert dropped == len(replay) - len(stream) + taken
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint


def test_resume_start_keeps_to_the_session() -> None:
    checkpoint = Checkpoint({1: (T0 + 50, 2), 2: (T0 + 80, 1)}, 3, session_start=T0 + 10)
    assert checkpoint.resume_start() == T0 + 50
    assert checkpoint.resume_start(margin_ns=30) == T0 + 20
    assert checkpoint.resume_start(margin_ns=SECOND) == T0 + 10  # never before the session
    assert Checkpoint(session_start=T0).resume_start(margin_ns=SECOND) == T0


def test_record_block_reads_mixed_sizes() -> None:
    mbo = _stream(random.Random(3), {5: 0}, 3)
    heartbeat = bytes(databento_dbn.SystemMsg(ts_event=T0, msg="Heartbeat", code=HEARTBEAT))
    block = RecordBlock.from_records([mbo[0], heartbeat, mbo[1], mbo[2]])
    assert block.record_size is None
    assert block.control_mask().tolist() == [False, True, False, False]
    market = block.select(~block.control_mask())
    assert market.records() == mbo
    assert market.record_size == 56
    assert market.instrument_id.tolist() == [5, 5, 5]


# ---------------------------------------------------------------------------------- bronze


def _stream_of(start: int) -> BronzeStream:
    return BronzeStream(DATASET, "mbo", 3, start, "raw_symbol", ("ESH4",))


def _at(ts: int, iid: int = ESH4, order: int = 0) -> bytes:
    record = bytearray(56)
    record[0], record[1] = 14, 0xA0
    record[4:8] = iid.to_bytes(4, "little")
    record[8:16] = ts.to_bytes(8, "little")
    record[16:24] = order.to_bytes(8, "little")
    record[36], record[38], record[39] = 128, ord("A"), ord("B")  # flags, action, side
    record[40:48] = (ts + 10).to_bytes(8, "little")  # ts_recv
    return bytes(record)


def test_bronze_splits_utc_days_and_reopens(tmp_path: Path) -> None:
    midnight = T0 + NS_PER_DAY
    first = [_at(midnight - 300 + i, order=i) for i in range(3)]
    second = [_at(midnight + i, order=10 + i) for i in range(3)]
    with Bronze.open(tmp_path, "days") as bronze:
        bronze.begin(_stream_of(T0 - 5))
        bronze.append(first[:2])
        bronze.append([first[2], *second[:2]])
    with Bronze.open(tmp_path, "days") as bronze:
        assert bronze.records == 5
        assert bronze.stream == _stream_of(T0 - 5)
        bronze.begin(_stream_of(T0 - 5))
        bronze.append(second[2:])
        files = bronze.files()
        assert dict(bronze.checkpoint.instruments) == {ESH4: (midnight + 2, 1)}
    assert [p.name for p in files] == ["20231226.mbo.dbn", "20231227.mbo.dbn"]
    (meta_a, block_a), (meta_b, block_b) = (read_bronze_file(p) for p in files)
    assert block_a.records() == first
    assert block_b.records() == second
    # The files tile time, so the engine orders and reads them.
    assert (meta_a.start, meta_a.end) == (T0 - 5, midnight)
    assert (meta_b.start, meta_b.end) == (midnight, midnight + NS_PER_DAY)
    events = np.concatenate(list(replay_files(files)))
    assert events["ts_event"].tolist() == [
        int.from_bytes(r[8:16], "little") for r in first + second
    ]


def test_bronze_recovery_truncates_only_a_torn_tail(tmp_path: Path) -> None:
    records = [_at(T0 + i, order=i) for i in range(10)]

    def fresh(name: str) -> Path:
        with Bronze.open(tmp_path, name) as bronze:
            bronze.begin(_stream_of(T0))
            bronze.append(records)
            (path,) = bronze.files()
        return path

    # Half a record, or a zero-filled tail: cut off; the checkpoint is what remains.
    for name, tail in (("half", _at(T0 + 99)[:40]), ("zeros", bytes(100))):
        path = fresh(name)
        size = path.stat().st_size
        with path.open("ab") as fh:
            fh.write(tail)
        with Bronze.open(tmp_path, name) as bronze:
            assert bronze.truncated == (TornRecord(path, size, len(tail)),)
            assert bronze.checkpoint.instruments == {ESH4: (T0 + 9, 1)}
            bronze.append([_at(T0 + 10, order=10)])
        assert read_bronze_file(path)[1].records() == [*records, _at(T0 + 10, order=10)]
    # A file whose header never got written whole holds nothing: removed.
    path = fresh("header")
    path.write_bytes(path.read_bytes()[:20])
    with Bronze.open(tmp_path, "header") as bronze:
        assert bronze.checkpoint == Checkpoint()
        assert bronze.files() == []
    # A bad length byte with whole records after it is damage, not a torn write.
    path = fresh("damaged")
    data = bytearray(path.read_bytes())
    data[len(data) - 5 * 56] = 0
    path.write_bytes(bytes(data))
    with pytest.raises(BronzeCorruptError, match="bad record at byte"):
        Bronze.open(tmp_path, "damaged")


def test_bronze_syncs_in_the_background_and_reports_a_failed_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        synced.append(threading.current_thread().name)
        release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr("qmachina.live.bronze.os.fsync", slow_fsync)
    with Bronze.open(tmp_path, "bg") as bronze:
        bronze.begin(_stream_of(T0))
        bronze.append([_at(T0)])
        bronze.sync(background=True)  # the file and the new directory entry
        bronze.append([_at(T0 + 1, order=1)])  # appends go on while it runs
        bronze.sync(background=True)  # skipped: the first one still runs
        release.set()
        bronze.sync()  # waits for it, then syncs here
        assert synced == ["bronze-sync", "bronze-sync", "MainThread"]

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr("qmachina.live.bronze.os.fsync", failing_fsync)
        bronze.sync(background=True)
        # Once that fsync has failed (not before: a running one makes the next call a no-op),
        # the next call raises its error.
        for thread in threading.enumerate():
            if thread.name == "bronze-sync":
                thread.join()
        with pytest.raises(BronzeError, match=r"fsync failed: .*I/O error"):
            bronze.sync(background=True)
        monkeypatch.setattr("qmachina.live.bronze.os.fsync", real_fsync)
    assert bronze_records(bronze) == [_at(T0), _at(T0 + 1, order=1)]


def test_bronze_refuses_a_second_writer_and_another_stream(tmp_path: Path) -> None:
    with Bronze.open(tmp_path, "one") as bronze:
        with pytest.raises(BronzeLockedError):
            Bronze.open(tmp_path, "one")
        bronze.begin(_stream_of(T0))
        bronze.append([_at(T0)])
    with Bronze.open(tmp_path, "one") as bronze:
        other = BronzeStream(DATASET, "mbo", 3, T0, "raw_symbol", ("ESM4",))
        with pytest.raises(BronzeMismatchError, match="ESM4"):
            bronze.begin(other)


# ----------------------------------------------------------------------------------- rolls


def test_contract_tracker_reports_forward_rolls_only() -> None:
    tracker = ContractTracker(["ES.c.0"])

    def see(iid: int, symbol: str = "ES.c.0", ts: int = 0) -> ContractRoll | None:
        return tracker.observe(SymbolMapped(iid, symbol, f"C{iid}", ts))

    assert see(1) is None  # the first mapping sets the contract
    assert see(1) is None
    assert see(9, symbol="NQ.c.0") is None  # not subscribed
    assert see(2, ts=5) == ContractRoll("ES.c.0", Contract(1, "C1"), Contract(2, "C2"), 5)
    assert see(1) is None  # history restated after a reconnection
    assert see(2) is None
    assert see(3, ts=9) == ContractRoll("ES.c.0", Contract(2, "C2"), Contract(3, "C3"), 9)
    assert tracker.active("ES.c.0") == Contract(3, "C3")
    assert tracker.active("NQ.c.0") is None
    assert [c.instrument_id for c in tracker.contracts("ES.c.0")] == [1, 2, 3]


def test_calendar_roll_policy_picks_the_symbol_by_time() -> None:
    policy = CalendarRollPolicy([(300, "ESU4"), (100, "ESH4"), (200, "ESM4")])
    assert policy.active(99) is None
    assert [policy.active(t) for t in (100, 199, 200, 300, 10**18)] == [
        "ESH4",
        "ESH4",
        "ESM4",
        "ESU4",
        "ESU4",
    ]
    assert policy.next_roll(150) == (200, "ESM4")
    assert policy.next_roll(300) is None
    with pytest.raises(ValueError, match="two entries"):
        CalendarRollPolicy([(1, "A"), (1, "B")])


def test_calendar_tracker_assigns_then_rolls_in_market_time() -> None:
    schedule = [(100, "ESH4"), (200, "ESM4"), (300, "ESU4")]
    tracker = CalendarTracker("ES", CalendarRollPolicy(schedule))
    for iid, symbol in ((1, "ESH4"), (2, "ESM4")):
        tracker.observe(SymbolMapped(iid, symbol, symbol, 0))
    assert tracker.advance(99) == []  # before the schedule starts
    (first,) = tracker.advance(150)
    assert (first.symbol, first.from_contract, first.to_contract, first.ts_event) == (
        "ES",
        None,
        Contract(1, "ESH4"),
        100,
    )
    assert first.reason == "calendar ES: ESH4 from 1970-01-01T00:00:00+00:00"
    assert tracker.advance(199) == []
    (roll,) = tracker.advance(250)
    assert (roll.from_contract, roll.to_contract, roll.ts_event) == (
        Contract(1, "ESH4"),
        Contract(2, "ESM4"),
        200,
    )
    assert tracker.advance(400) == []  # ESU4's mapping is not known yet: the roll waits
    assert tracker.active == Contract(2, "ESM4")
    tracker.observe(SymbolMapped(3, "ESU4", "ESU4", 0))
    assert [(r.from_contract, r.to_contract, r.ts_event) for r in tracker.advance(400)] == [
        (Contract(2, "ESM4"), Contract(3, "ESU4"), 300)
    ]


def test_a_calendar_tracker_started_late_reports_what_an_early_one_did() -> None:
    """A retried ingestion resumes past a roll: it reports the same steps (same times, same
    contracts), which the store recognizes, whenever it first sees the market."""
    schedule = [(100, "ESH4"), (200, "ESM4")]
    early = CalendarTracker("ES", CalendarRollPolicy(schedule))
    late = CalendarTracker("ES", CalendarRollPolicy(schedule))
    for tracker in (early, late):
        tracker.observe(SymbolMapped(1, "ESH4", "ESH4", 0))
        tracker.observe(SymbolMapped(2, "ESM4", "ESM4", 0))
    seen_early = tracker_rolls(early, [120, 180, 260])
    assert tracker_rolls(late, [260]) == seen_early
    assert [(r.from_contract, r.to_contract) for r in seen_early] == [
        (None, Contract(1, "ESH4")),
        (Contract(1, "ESH4"), Contract(2, "ESM4")),
    ]


def tracker_rolls(tracker: CalendarTracker, times: list[int]) -> list[ContractRoll]:
    return [roll for market_ns in times for roll in tracker.advance(market_ns)]
