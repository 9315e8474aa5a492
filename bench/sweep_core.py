"""Sweep-core benchmark: 1,000 points over one hour of 100 ms silver bins, one process.

    python bench/sweep_core.py --json

The silver is real engine output: a seeded synthetic DBN file (``write_synthetic_dbn``) replayed
through the book and grid for exactly ``--bins`` bins, written once to Parquet under
``data/bench/`` and reused. The timed sweep is what a sweep activity does: expand the points,
read the silver (once), compute each signal parameter set's score (once) and evaluate every
point. The signal is a benchmark-only momentum z-score (registered here, so the registry path is
exercised): ``(spot_x2[t] - spot_x2[t - lookback_bins])`` divided by the root mean square of that
change over the ``norm_bins`` bins before t (strictly past). Numba compilation is done in a
warm-up on tiny arrays and reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `engine` package; the repository root goes in front of it.
sys.path.insert(0, str(REPO_ROOT))

from bench.engine import ES_GRID  # noqa: E402
from engine.evaluation import EvalParams, evaluate_many  # noqa: E402
from engine.replay import replay_files  # noqa: E402
from engine.signals.registry import (  # noqa: E402
    ParamSpec,
    ParamValue,
    SignalInputs,
    get_signal,
    register,
)
from engine.silver import SilverBuilder  # noqa: E402
from engine.silver_frame import SilverFrame  # noqa: E402
from engine.silver_parquet import SilverParquetWriter  # noqa: E402
from engine.sweep_core import (  # noqa: E402
    ScoreRequest,
    SweepSpace,
    expand_points,
    run_sweep_core,
)
from engine.synthetic import write_synthetic_dbn  # noqa: E402

SESSION_START_NS = 1_703_548_800_000_000_000  # the synthetic generator's default start
DATASET = "synthetic-es-1h"


class MomentumZ:
    """Benchmark signal: spot change over ``lookback_bins``, z-scored on the strict past."""

    name = "bench_momentum_z"
    params: tuple[ParamSpec, ...] = (
        ParamSpec("lookback_bins", int, 50, minimum=1),
        ParamSpec("norm_bins", int, 3000, minimum=2),
    )

    def score(self, inputs: SignalInputs, params: Mapping[str, ParamValue]) -> np.ndarray:
        lookback = int(params["lookback_bins"])
        norm = int(params["norm_bins"])
        spot = np.where(inputs.frame.spot_x2 >= 0, inputs.frame.spot_x2, np.nan).astype(float)
        change = np.full(len(spot), np.nan)
        change[lookback:] = spot[lookback:] - spot[:-lookback]
        finite = np.isfinite(change)
        squares = np.concatenate(([0.0], np.cumsum(np.where(finite, change * change, 0.0))))
        counts = np.concatenate(([0], np.cumsum(finite)))
        t = np.arange(len(spot))
        first = np.maximum(t - norm, 0)
        n = counts[t] - counts[first]  # bins first .. t-1: the past only
        mean_square = np.divide(
            squares[t] - squares[first], n, out=np.full(len(spot), np.nan), where=n >= 2
        )
        z = np.divide(
            change, np.sqrt(mean_square), out=np.full(len(spot), np.nan), where=mean_square > 0
        )
        return np.asarray(z)


def build_silver(path: Path, bins: int, seed: int, events_per_second: float) -> None:
    """Synthetic DBN → book → silver Parquet of exactly ``bins`` bins from the session start."""
    session_end = SESSION_START_NS + bins * ES_GRID.bin_width_ns
    n_events = int(events_per_second * bins * ES_GRID.bin_width_ns / 1e9 * 1.05) + 10_000
    dbn_file = path.with_suffix(".mbo.dbn.zst")
    write_synthetic_dbn(dbn_file, n_events, seed, events_per_second=events_per_second)
    builder = SilverBuilder(ES_GRID, session_start_ns=SESSION_START_NS)
    with SilverParquetWriter(path, builder.schema) as writer:
        for events in replay_files([dbn_file], end_ns=session_end):
            for batch in builder.feed(events):
                writer.write(batch)
        for batch in builder.finish(until_ns=session_end):
            writer.write(batch)
    dbn_file.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bins", type=int, default=36_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--events-per-second", type=float, default=500.0)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data" / "bench")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    args.data_dir.mkdir(parents=True, exist_ok=True)
    silver_file = args.data_dir / f"sweep-silver-{args.bins}-{args.seed}.parquet"
    if not silver_file.exists():
        started = time.perf_counter()
        build_silver(silver_file, args.bins, args.seed, args.events_per_second)
        if not args.json:
            print(f"built {silver_file} in {time.perf_counter() - started:.1f} s")

    register(MomentumZ())
    started = time.perf_counter()
    tiny = np.zeros(8)
    evaluate_many(tiny, tiny, tiny + 1, tiny == 0, [EvalParams(1.0, 1, 1, 1, 0, 0)], 10**8)
    compile_s = time.perf_counter() - started

    timings = {"load_s": 0.0, "score_s": 0.0}
    n_bins = 0

    def load(dataset: str) -> SilverFrame:
        nonlocal n_bins
        started = time.perf_counter()
        frame = SilverFrame(pq.read_table(silver_file), ES_GRID.tick_size)
        n_bins = frame.n_bins
        timings["load_s"] += time.perf_counter() - started
        return frame

    score_calls = 0

    def score(frame: SilverFrame, request: ScoreRequest) -> np.ndarray:
        nonlocal score_calls
        started = time.perf_counter()
        values = get_signal(request.signal).score(SignalInputs(frame, {}), request.params)
        score_calls += 1
        timings["score_s"] += time.perf_counter() - started
        return values

    started = time.perf_counter()
    points = expand_points(
        SweepSpace(
            datasets=(DATASET,),
            signals={MomentumZ.name: {"lookback_bins": (20, 100), "norm_bins": (3000,)}},
            thresholds=(1.0, 1.5, 2.0, 2.5, 3.0),
            tp_ticks=(4, 6, 8, 10, 12),
            sl_ticks=(2, 4, 6, 8),
            cooldown_bins=(0, 10, 50, 100, 300),
            max_hold_bins=(600,),
            warmup_bins=(300,),
        )
    )
    expand_s = time.perf_counter() - started
    result = run_sweep_core(load, score, points)
    total_s = time.perf_counter() - started
    metrics = result.metrics["all"]
    best = int(np.argmax(metrics["total_pnl_ticks"]))
    report = {
        "points": len(points),
        "bins": n_bins,
        "score_computations": score_calls,
        "trades_evaluated": int(metrics["signals"].sum()),
        "total_s": round(total_s, 3),
        "points_per_s": round(len(points) / total_s),
        "expand_s": round(expand_s, 3),
        "load_silver_s": round(timings["load_s"], 3),
        "score_s": round(timings["score_s"], 3),
        "evaluate_s": round(total_s - expand_s - timings["load_s"] - timings["score_s"], 3),
        "compile_s": round(compile_s, 3),
        "best_point": points[best].point_hash[:16],
        "best_total_pnl_ticks": int(metrics["total_pnl_ticks"][best]),
        "silver_file": str(silver_file),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
