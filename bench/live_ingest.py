"""Live ingestion benchmark: records per second from the local gateway into bronze.

    python bench/live_ingest.py --records 2000000 --json

A synthetic two-instrument MBO tape is served by ``qmachina gateway`` in its own process, as
fast as it goes; each run subscribes with ``start=`` the tape's start, so the whole tape is
replayed. Three runs on one gateway: the stock official client alone (a ``list.append``
callback, the least any consumer of its decoded records can do), the same client on its raw
record path (:mod:`qmachina.live.raw_client`: the gateway's bytes cut into record blocks), and
:class:`qmachina.live.ingest.LiveIngestor` into bronze (the raw path, then bronze). Compare
ratios within one run (2 cores: gateway, client and ingestor share them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import databento
import databento_dbn
import numpy as np
from pydantic import SecretStr

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from qmachina.live.bronze import Bronze  # noqa: E402
from qmachina.live.gateway_book import MBO_RECORD_DTYPE  # noqa: E402
from qmachina.live.ingest import LiveIngestor, LiveTarget  # noqa: E402
from qmachina.live.raw_client import RawRecordFeed, raw_live_client  # noqa: E402

KEY = "db-" + "b" * 24 + "bench"
DATASET = "GLBX.MDP3"
T0 = 1_703_548_800_000_000_000


def write_tape(path: Path, n: int) -> None:
    """``n`` MBO records of two interleaved instruments, 1 µs apart."""
    recs = np.zeros(n, dtype=MBO_RECORD_DTYPE)
    k = np.arange(n)
    recs["length"] = MBO_RECORD_DTYPE.itemsize // 4
    recs["rtype"] = 0xA0
    recs["publisher_id"] = 1
    recs["instrument_id"] = np.where(k % 2 == 0, 1001, 1002)
    recs["ts_event"] = T0 + k * 1_000
    recs["ts_recv"] = recs["ts_event"] + 100
    recs["order_id"] = k
    recs["price"] = 4_800_000_000_000
    recs["size"] = 1
    recs["flags"] = 128
    recs["action"] = ord("A")
    recs["side"] = ord("B")
    recs["sequence"] = k
    metadata = databento_dbn.Metadata(
        dataset=DATASET,
        start=T0,
        stype_in=databento_dbn.SType.from_str("raw_symbol"),
        stype_out=databento_dbn.SType.from_str("instrument_id"),
        schema=databento_dbn.Schema.from_str("mbo"),
        symbols=[],
        partial=[],
        not_found=[],
        mappings=[],
        version=3,
    )
    path.write_bytes(bytes(metadata.encode()) + recs.tobytes())


def start_gateway(tape: Path) -> tuple[subprocess.Popen[str], int]:
    """``qmachina gateway`` on a free port; returns the process and the port."""
    command = [sys.executable, "-m", "qmachina.gateway_cli", "--data", str(tape), "--port", "0"]
    command += ["--speed", "max"]
    env = {**os.environ, "DATABENTO_API_KEY": KEY}
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "gateway listening on HOST:PORT: ..."
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the gateway did not start: {line!r}")
    port = int(line.split("listening on ", 1)[1].split(":")[1])
    return proc, port


def stock_client(port: int, n: int) -> float:
    """Seconds for the stock client to deliver ``n`` decoded records to a callback."""
    client = databento.Live(key=KEY, gateway="127.0.0.1", port=port)
    got: list[Any] = []
    client.add_callback(got.append)
    client.subscribe(DATASET, "mbo", ["1001", "1002"], stype_in="instrument_id", start=T0)
    started = time.perf_counter()
    client.start()
    while len(got) < n + 3:  # + acknowledgement and two symbol mappings
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    client.terminate()
    return elapsed


def raw_client(port: int, n: int) -> float:
    """Seconds for the client's raw record path to hand on ``n`` records in blocks."""
    feed = RawRecordFeed()
    client = raw_live_client(feed, key=KEY, gateway="127.0.0.1", port=port)
    client.subscribe(DATASET, "mbo", ["1001", "1002"], stype_in="instrument_id", start=T0)
    started = time.perf_counter()
    client.start()
    got = 0
    while got < n + 3:  # + acknowledgement and two symbol mappings
        feed.wait(0.002)
        got += len(feed.take())
    elapsed = time.perf_counter() - started
    client.terminate()
    return elapsed


def ingestor(port: int, n: int, root: Path) -> float:
    """Seconds for the ingestor to write ``n`` records to bronze (synced at the end)."""
    target = LiveTarget(
        host="127.0.0.1",
        port=port,
        dataset=DATASET,
        symbols=("1001", "1002"),
        stype_in="instrument_id",
        key=SecretStr(KEY),
    )
    with Bronze.open(root, f"bench-{time.monotonic_ns()}") as bronze:
        ingest = LiveIngestor(target, bronze, session_start=T0)
        stop = threading.Event()
        thread = threading.Thread(target=ingest.run, args=(stop,))
        started = time.perf_counter()
        thread.start()
        while ingest.written < n:
            time.sleep(0.002)
        stop.set()
        thread.join()
        elapsed = time.perf_counter() - started
        assert bronze.records == n
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    n = args.records
    with tempfile.TemporaryDirectory() as tmp:
        tape = Path(tmp) / "tape.mbo.dbn"
        write_tape(tape, n)
        proc, port = start_gateway(tape)
        try:
            seconds = {
                "stock_client": stock_client(port, n),
                "raw_client": raw_client(port, n),
                "ingestor_to_bronze": ingestor(port, n, Path(tmp) / "bronze"),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    rates = {name: n / s for name, s in seconds.items()}
    if args.json:
        print(json.dumps({"records": n, "seconds": seconds, "records_per_s": rates}))
    else:
        for name, rate in rates.items():
            print(f"{name:>20}: {rate:>12,.0f} records/s ({seconds[name]:.2f} s)")


if __name__ == "__main__":
    main()
