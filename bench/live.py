"""Live benchmark: MBO records from the local gateway through ingestion (bronze) into silver bins,
as a rate and as the latency from a record's gateway send time to its silver bin.

    python bench/live.py --json

A seeded synthetic ES flow (``engine.synthetic``, one instrument, a snapshot then live flow at
the generator's ~20k records per second of tape time) is served by the local gateway
(:class:`qmachina.live.gateway.LiveGateway`) in a process of its own; every subscription asks
``start=`` the tape's start. Ingestion is :class:`qmachina.live.ingest.LiveIngestor` (the
official client on its raw record path, with ``ts_out``) in a second process, as the worker
runs it apart from the API. Silver is the serving stream's path in this process:
:class:`qmachina.live.bronze_tail.BronzeTail` follows the session's bronze (once caught up it
sleeps as serving does, :class:`~qmachina.live.bronze_tail.FollowWait`: 1 ms after records
arrived, doubling while none do, up to ``--poll-ms``, by default serving's 50 ms),
:func:`~qmachina.live.bronze_tail.mbo_events` decodes, and :class:`engine.silver.SilverBuilder`
with the shipped ES pipeline's grid is fed with ``feed_promptly(events)`` as
``ServingComputation.feed`` does it. A bin counts as published when that call yields it; gold,
the signal and the wire encoding are not included. The tail and the decoding are those of
:class:`qmachina.serving.live_source.LiveSessionSource`, without its contract-roll handling.
The gateway stamps ``ts_out`` with the wall clock, as Databento's gateways do.

Throughput, with the gateway sending as fast as it can (``speed=max``), one bronze session each:

- ``ingest_events_per_s``: gateway -> bronze alone, from the first record's send time until
  bronze holds every record;
- ``silver_events_per_s``: following that complete bronze into silver alone;
- ``events_per_s``: both at once (gateway -> bronze -> silver), from the first record's send
  time until the last record has been fed to silver (the bins it closed published).

Sent as fast as possible, a record waits behind every record sent before it, so that run's
latency (``max_speed``) is mostly backlog, not the pipeline's delay. The latency figures are
therefore measured in a paced run: the gateway replays the tape in real time at the speed that
sends ``--rate`` records per second on average (1 M/s, the target rate), its clock starting
``--lead-s`` wall seconds before the tape so the subscription is in place before the first
record, and ingestion and silver run at once as above. Per record (the snapshot, which only
builds the book, and the bin still open at the end left out): its bin's publish wall time minus
its ``ts_out`` (``latency_*``). That includes waiting for the market to close the bin (a bin of
tape time lasts ``bin width / speed`` of wall time when paced); ``pipeline_*`` leaves it out:
per bin, its publish time minus the send time of the first record after it, the record that
closed it, also split (``pipeline_stages``) at the moment the tail handed over the block holding
that record: ``to_tail`` (gateway, ingestion, bronze and the follow's sleep) and ``silver``.
``meets_pipeline_target`` holds that delay to the target's 2 ms, the bin width being the
market's share: in a real-time market a record waits up to a whole bin for it to close.

Target (issue #7): >= 1 M events/s sustained; p99 <= 2 ms plus the bin width. The machine's
cores are shared by the gateway, ingestion and silver: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import SecretStr

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and the sibling bench/engine.py
# would shadow the `engine` package; the repository root goes in front of it.
sys.path.insert(0, str(REPO_ROOT))

from engine.events import F_SNAPSHOT  # noqa: E402
from engine.silver import GridConfig, SilverBuilder  # noqa: E402
from engine.synthetic import DBN_MBO_DTYPE, generate_events, write_dbn  # noqa: E402
from qmachina.live.bronze import Bronze, read_bronze_file  # noqa: E402
from qmachina.live.bronze_tail import MBO_RTYPE, BronzeTail, FollowWait, mbo_events  # noqa: E402
from qmachina.live.gateway import LiveGateway  # noqa: E402
from qmachina.live.ingest import LiveIngestor, LiveTarget  # noqa: E402
from qmachina.serving.live_source import (  # noqa: E402
    DEFAULT_MIN_POLL_SECONDS,
    DEFAULT_POLL_SECONDS,
)
from qmachina.silver_build import grid_config_of  # noqa: E402
from qmachina.specs.pipeline import default_configs_root, resolve_pipeline  # noqa: E402

KEY = "db-" + "b" * 24 + "bench"
DATASET = "GLBX.MDP3"
# The shipped ES pipeline: its grid, and the raw symbol the synthetic tape is written under.
ES_PIPELINE = resolve_pipeline(
    default_configs_root() / "pipelines" / "es_default.yaml", check_files=False
)
ES_GRID: GridConfig = grid_config_of(ES_PIPELINE)
SYMBOL: str = ES_PIPELINE.instrument.symbol
TARGET_EVENTS_PER_S = 1_000_000
TARGET_LATENCY_MS_BEYOND_BIN = 2.0
# A follow that sees no new bronze for this long has lost its ingestion.
STALL_SECONDS = 30.0
# An MBO record as a ts_out subscription receives it: the gateway's send time appended.
MBO_WITH_SEND_TIME = np.dtype([*DBN_MBO_DTYPE.descr, ("ts_out", "<u8")])

I8 = npt.NDArray[np.int64]
# The gateway and ingestion processes fork from a fork server, not from this process: forked
# from here they would share its heap copy-on-write, and the page copies on both sides (slow
# on a VM: a few ms per MB touched) would stall the pipeline for its first few hundred
# milliseconds, as no separately started worker is. The server imports this module by name
# (preloading "__main__" does not spare each child from importing everything again).
PROCESSES = multiprocessing.get_context("forkserver")


def serve_gateway(tape: Path, speed: float, start_at: int | None, port_out: Connection) -> None:
    """Child process: serve ``tape`` at ``speed`` (math.inf: as fast as possible) from tape
    time ``start_at`` until terminated, stamping the wall clock as ``ts_out``; the bound port
    goes to ``port_out``."""
    gateway = LiveGateway.from_files(
        [tape], keys=[KEY], speed=speed, start_at=start_at, send_clock=time.time_ns
    )

    async def serve() -> None:
        port_out.send(await gateway.start())
        await gateway.serve_forever()

    asyncio.run(serve())


def ingest_session(
    port: int, bronze_root: Path, session_id: str, start_ns: int, records: int, done: Connection
) -> None:
    """Child process: ingest the tape from ``start_ns`` into bronze session ``session_id``; the
    wall time (ns) at which bronze holds ``records`` records goes to ``done`` (None if the
    ingestor stopped first)."""
    target = LiveTarget(
        host="127.0.0.1",
        port=port,
        dataset=DATASET,
        symbols=(SYMBOL,),
        key=SecretStr(KEY),
        ts_out=True,
    )
    with Bronze.open(bronze_root, session_id) as bronze:
        ingestor = LiveIngestor(target, bronze, session_start=start_ns)
        stop = threading.Event()
        thread = threading.Thread(target=ingestor.run, args=(stop,))
        thread.start()
        while ingestor.written < records and thread.is_alive():
            time.sleep(0.001)
        done.send(time.time_ns() if ingestor.written >= records else None)
        stop.set()
        thread.join()


def start_process(target: Any, *args: object) -> tuple[BaseProcess, Connection]:
    """``target(*args, sender)`` in a process of its own; the receiving end of ``sender``."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    process = PROCESSES.Process(target=target, args=(*args, sender), daemon=True)
    process.start()
    sender.close()  # the child holds the only sending end: its exit ends receiver.recv()
    return process, receiver


def start_gateway(
    tape: Path, speed: float = math.inf, start_at: int | None = None
) -> tuple[BaseProcess, int]:
    """The gateway process and its port."""
    process, receiver = start_process(serve_gateway, tape, speed, start_at)
    try:
        port = int(receiver.recv())
    except EOFError:
        raise RuntimeError("the gateway process exited before listening") from None
    return process, port


def bronze_done_ns(receiver: Connection, process: BaseProcess) -> int:
    """When the ingestion process's bronze held every record (wall ns); waits for it to end."""
    try:
        done = receiver.recv()
    except EOFError:
        done = None
    process.join()
    if done is None:
        raise RuntimeError(f"ingestion stopped early (exit code {process.exitcode})")
    return int(done)


@dataclass(frozen=True)
class SilverRun:
    """What following one bronze session into silver gave."""

    started_ns: int  # wall time the follow began
    finished_ns: int  # wall time the last record had been fed (the bins it closed published)
    cum_events: I8  # per published bin: events fed through its end (its cum_event_id)
    published_ns: I8  # per published bin: wall time it came out of the builder
    fed_through: I8  # per block read: events fed through its end
    read_ns: I8  # per block read: wall time the tail handed it over

    @property
    def bins(self) -> int:
        return len(self.cum_events)


def follow_into_silver(
    session_dir: Path, instrument_id: int, records: int, poll_seconds: float
) -> SilverRun:
    """Follow the session's bronze into silver until ``records`` records have been fed."""
    builder = SilverBuilder(ES_GRID)
    cum_events: list[I8] = []
    published_ns: list[I8] = []
    fed_through: list[int] = []
    read_ns: list[int] = []
    fed = 0
    started_ns = time.time_ns()
    last_seen = time.monotonic()
    idle = FollowWait(min(DEFAULT_MIN_POLL_SECONDS, poll_seconds), poll_seconds)
    with BronzeTail(session_dir) as tail:
        while fed < records:
            blocks = tail.read()
            read_at = time.time_ns()
            if not blocks:
                if time.monotonic() - last_seen > STALL_SECONDS:
                    raise RuntimeError(f"{session_dir}: no new bronze for {STALL_SECONDS:g} s")
                time.sleep(idle.seconds())
                continue
            idle.arrived()
            last_seen = time.monotonic()
            assert tail.stream is not None  # a block is read only after the header
            for block in blocks:
                events = mbo_events(block, tail.stream.version, instrument_id, ts_out=True)
                for batches in builder.feed_promptly(events):
                    now = time.time_ns()
                    for batch in batches:
                        cum_events.append(batch.column("cum_event_id").to_numpy())
                        published_ns.append(np.full(batch.num_rows, now, dtype=np.int64))
                fed += len(events)
                fed_through.append(fed)
                read_ns.append(read_at)
    finished_ns = time.time_ns()
    if not cum_events:
        raise RuntimeError(f"no silver bin was closed by {records} records: give more --events")
    return SilverRun(
        started_ns,
        finished_ns,
        np.concatenate(cum_events),
        np.concatenate(published_ns),
        np.asarray(fed_through, dtype=np.int64),
        np.asarray(read_ns, dtype=np.int64),
    )


def received_records(session_dir: Path, instrument_id: int) -> npt.NDArray[np.void]:
    """The instrument's MBO records in bronze, in stream order, each with its ``ts_out``."""
    parts = []
    for path in sorted(session_dir.glob("*.mbo.dbn")):
        _, block = read_bronze_file(path)
        mine = block.select((block.rtype == MBO_RTYPE) & (block.instrument_id == instrument_id))
        parts.append(np.frombuffer(mine.data, dtype=MBO_WITH_SEND_TIME))
    return np.concatenate(parts)


def pipeline_ms(
    run: SilverRun, received: npt.NDArray[np.void]
) -> dict[str, npt.NDArray[np.float64]]:
    """Per published bin followed by a record, in ms: its publish time minus the send time of
    that record (the one that closed it: record ``cum_event_id`` in feed order), in all
    (``total``) and in two parts, until the tail handed over the block holding that record
    (``to_tail``: gateway, ingestion, bronze and the follow's sleep) and from then on
    (``silver``: decoding and the builder)."""
    closed = run.cum_events < len(received)
    closing = run.cum_events[closed]
    sent = received["ts_out"][closing].astype(np.int64)
    read = run.read_ns[np.searchsorted(run.fed_through, closing, side="right")]
    published = run.published_ns[closed]
    return {
        name: np.asarray(delay / 1e6, dtype=np.float64)
        for name, delay in (
            ("total", published - sent),
            ("to_tail", read - sent),
            ("silver", published - read),
        )
    }


def latencies_ms(run: SilverRun, received: npt.NDArray[np.void]) -> npt.NDArray[np.float64]:
    """Per record in a published bin (the snapshot aside): its bin's publish time minus its
    gateway send time, in ms. Record ``i`` (in feed order) is in the first bin whose
    ``cum_event_id`` exceeds ``i``."""
    index = np.arange(len(received))
    in_bin = (index < run.cum_events[-1]) & ((received["flags"] & F_SNAPSHOT) == 0)
    bins = np.searchsorted(run.cum_events, index[in_bin], side="right")
    sent = received["ts_out"][in_bin].astype(np.int64)
    return np.asarray((run.published_ns[bins] - sent) / 1e6, dtype=np.float64)


def live_run(
    port: int, session_dir: Path, start_ns: int, n: int, instrument_id: int, poll_seconds: float
) -> tuple[SilverRun, npt.NDArray[np.void], int]:
    """Ingestion (in its own process) and silver (here) at once; the silver run, the records
    bronze received and the wall time bronze held them all."""
    root, session = session_dir.parent, session_dir.name
    ingest, done = start_process(ingest_session, port, root, session, start_ns, n)
    run = follow_into_silver(session_dir, instrument_id, n, poll_seconds)
    bronze_ns = bronze_done_ns(done, ingest)
    return run, received_records(session_dir, instrument_id), bronze_ns


def spread(values: npt.NDArray[np.float64]) -> dict[str, float]:
    """p50, p99 and max, rounded (ms)."""
    p50, p99 = (float(v) for v in np.percentile(values, [50, 99]))
    return {
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "max_ms": round(float(values.max()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000, help="MBO records in the tape")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=DEFAULT_POLL_SECONDS * 1000,
        help="the longest the silver follow sleeps once it has caught up with bronze (it "
        "starts at 1 ms after records arrive and doubles while none do, as serving does)",
    )
    parser.add_argument(
        "--rate", type=float, default=TARGET_EVENTS_PER_S, help="records/s of the paced run"
    )
    parser.add_argument(
        "--lead-s",
        type=float,
        default=2.0,
        help="wall seconds the paced gateway's clock runs before the tape's first record",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the tape and the bronze")
    args = parser.parse_args()
    PROCESSES.set_forkserver_preload(["bench.live"])
    n = args.events
    poll_seconds = args.poll_ms / 1000

    workdir = Path(tempfile.mkdtemp(prefix="qmachina-bench-live-"))
    try:
        events = generate_events(n, args.seed)
        instrument_id = int(events["instrument_id"][0])
        start_ns = int(events["ts_recv"][0])
        # The gateway releases MBO records by ts_recv.
        flow = events["ts_recv"][(events["flags"] & F_SNAPSHOT) == 0].astype(np.int64)
        # The replay speed at which the tape's flow comes at args.rate records per second.
        speed = args.rate * (int(flow[-1]) - int(flow[0])) / 1e9 / len(flow)
        tape = workdir / "tape.mbo.dbn"
        write_dbn(events, tape, dataset=DATASET, symbol=SYMBOL)
        warm = SilverBuilder(ES_GRID)  # compile (or load the numba cache) before timing
        warm.feed(events[: min(n, 10_000)])
        warm.finish()
        bronze_root = workdir / "bronze"

        gateway, port = start_gateway(tape)
        try:
            ingest, done = start_process(ingest_session, port, bronze_root, "ingest", start_ns, n)
            ingest_done_ns = bronze_done_ns(done, ingest)
            ingest_sent_ns = int(
                received_records(bronze_root / "ingest", instrument_id)["ts_out"][0]
            )
            silver = follow_into_silver(bronze_root / "ingest", instrument_id, n, poll_seconds)
            live, received, live_bronze_ns = live_run(
                port, bronze_root / "live", start_ns, n, instrument_id, poll_seconds
            )
        finally:
            gateway.terminate()
            gateway.join(timeout=10)

        lead_ns = int(args.lead_s * speed * 1e9)
        gateway, port = start_gateway(tape, speed, start_ns - lead_ns)
        try:
            paced, paced_received, _ = live_run(
                port, bronze_root / "paced", start_ns, n, instrument_id, poll_seconds
            )
        finally:
            gateway.terminate()
            gateway.join(timeout=10)
    finally:
        if not args.keep:
            shutil.rmtree(workdir)

    live_sent_ns = int(received["ts_out"][0])
    paced_sent_ns = int(paced_received["ts_out"][0])
    seconds = {
        "end_to_end": (live.finished_ns - live_sent_ns) / 1e9,
        "end_to_end_bronze": (live_bronze_ns - live_sent_ns) / 1e9,
        "ingest_only": (ingest_done_ns - ingest_sent_ns) / 1e9,
        "silver_only": (silver.finished_ns - silver.started_ns) / 1e9,
        "paced": (paced.finished_ns - paced_sent_ns) / 1e9,
    }
    bin_width_ms = ES_GRID.bin_width_ns / 1e6
    target_p99_ms = TARGET_LATENCY_MS_BEYOND_BIN + bin_width_ms
    events_per_s = n / seconds["end_to_end"]
    latency = spread(latencies_ms(paced, paced_received))
    pipeline = {name: spread(ms) for name, ms in pipeline_ms(paced, paced_received).items()}
    result: dict[str, Any] = {
        "events": n,
        "events_per_s": round(events_per_s),
        "ingest_events_per_s": round(n / seconds["ingest_only"]),
        "silver_events_per_s": round(n / seconds["silver_only"]),
        "latency_p50_ms": latency["p50_ms"],
        "latency_p99_ms": latency["p99_ms"],
        "latency_max_ms": latency["max_ms"],
        "pipeline_p50_ms": pipeline["total"]["p50_ms"],
        "pipeline_p99_ms": pipeline["total"]["p99_ms"],
        "pipeline_max_ms": pipeline["total"]["max_ms"],
        "pipeline_stages": {"to_tail": pipeline["to_tail"], "silver": pipeline["silver"]},
        "paced_events_per_s": round(n / seconds["paced"]),
        "bin_width_ms": bin_width_ms,
        "target_events_per_s": TARGET_EVENTS_PER_S,
        "target_p99_ms": target_p99_ms,
        "meets_throughput_target": events_per_s >= TARGET_EVENTS_PER_S,
        "meets_latency_target": latency["p99_ms"] <= target_p99_ms,
        # The target's share for the pipeline itself: the bin width is the market's.
        "meets_pipeline_target": pipeline["total"]["p99_ms"] <= TARGET_LATENCY_MS_BEYOND_BIN,
        "max_speed_latency": spread(latencies_ms(live, received)),
        "bins": {"max_speed": live.bins, "paced": paced.bins},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "config": {
            "pipeline": ES_PIPELINE.spec.name,
            "symbol": SYMBOL,
            "instrument_id": instrument_id,
            "seed": args.seed,
            "grid": {
                "bin_width_ns": ES_GRID.bin_width_ns,
                "bin_clock": ES_GRID.bin_clock,
                "grid_radius_ticks": ES_GRID.grid_radius_ticks,
                "n_absolute_ticks": ES_GRID.n_absolute_ticks,
            },
            "paced_rate": args.rate,
            "paced_speed": round(speed, 3),
            "paced_lead_s": args.lead_s,
            "silver_poll_ms": args.poll_ms,
            "latency": "paced run, per record: bin publish wall time - gateway ts_out (wall)",
            "pipeline_delay": "paced run, per bin: publish wall time - its closing record ts_out",
        },
    }
    if args.keep:
        result["workdir"] = str(workdir)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            shown = f"{value:,}" if type(value) is int else value
            print(f"{key:>24}: {shown}")


if __name__ == "__main__":
    main()
