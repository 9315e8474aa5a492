"""Synthetic MBO tapes for the live tests: two instruments' flows written as real DBN files
with ``databento_dbn``, interleaved in time, several records per ``ts_event`` so a checkpoint's
count matters."""

from __future__ import annotations

from pathlib import Path

import databento_dbn
import numpy as np
import numpy.typing as npt

from qmachina.live.gateway_book import MBO_RECORD_DTYPE

DATASET = "GLBX.MDP3"
T0 = 1_703_548_800_000_000_000  # 2023-12-26 00:00 UTC
ESH4, ESM4 = 1001, 1002
COUNT = 3000  # records per instrument
BURST = 3  # records per ts_event
STEP_NS = 5_000_000  # between bursts of one instrument: the tape spans 5 s


def mbo_flow(instrument_id: int, offset_ns: int, seed: int) -> npt.NDArray[np.void]:
    """MBO records in bursts of BURST sharing one ts_event (ts_recv apart by 100 ns)."""
    rng = np.random.default_rng(seed)
    k = np.arange(COUNT)
    recs = np.zeros(COUNT, dtype=MBO_RECORD_DTYPE)
    recs["length"] = MBO_RECORD_DTYPE.itemsize // 4
    recs["rtype"] = 0xA0
    recs["publisher_id"] = 1
    recs["instrument_id"] = instrument_id
    recs["ts_event"] = T0 + (k // BURST) * STEP_NS + offset_ns
    recs["ts_recv"] = recs["ts_event"] + 20_000 + (k % BURST) * 100
    recs["order_id"] = instrument_id * 1_000_000 + k
    recs["price"] = (4800 + rng.integers(-8, 9, COUNT)) * 250_000_000
    recs["size"] = rng.integers(1, 20, COUNT)
    recs["flags"] = 128
    recs["action"] = rng.choice(np.frombuffer(b"ACMT", dtype=np.uint8), COUNT)
    recs["side"] = rng.choice(np.frombuffer(b"AB", dtype=np.uint8), COUNT)
    recs["ts_in_delta"] = 20_000
    recs["sequence"] = k + 1
    return recs


def write_tape(path: Path, records: npt.NDArray[np.void], symbol: str) -> None:
    metadata = databento_dbn.Metadata(
        dataset=DATASET,
        start=int(records["ts_recv"][0]),
        stype_in=databento_dbn.SType.from_str("raw_symbol"),
        stype_out=databento_dbn.SType.from_str("instrument_id"),
        schema=databento_dbn.Schema.from_str("mbo"),
        symbols=[symbol],
        partial=[],
        not_found=[],
        mappings=[],
        end=int(records["ts_recv"][-1]) + 1,
        version=3,
    )
    path.write_bytes(bytes(metadata.encode()) + records.tobytes())


def write_two_contract_tape(root: Path) -> list[Path]:
    """ESH4's and ESM4's interleaved flows, one file each, under ``root``."""
    paths = [root / "esh4.mbo.dbn", root / "esm4.mbo.dbn"]
    write_tape(paths[0], mbo_flow(ESH4, 0, seed=1), "ESH4")
    write_tape(paths[1], mbo_flow(ESM4, STEP_NS // 2, seed=2), "ESM4")
    return paths
