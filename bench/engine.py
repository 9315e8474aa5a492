"""Engine benchmark: book only, book + silver, and end to end from .dbn.zst to Parquet.

    python bench/engine.py --events 5000000 --json

Generates (or reuses) a seeded synthetic DBN file under ``data/bench/``. Each stage is timed
after a warm-up run, so numba compilation is not counted; compare ratios within one run. End to
end reads ahead (``engine.read_ahead``) as ``qmachina silver build`` does, so decoding the next
batches overlaps with building silver on a second core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `engine` package; the repository root goes in front of it.
sys.path.insert(0, str(REPO_ROOT))

from engine.book import OrderBook  # noqa: E402
from engine.read_ahead import read_ahead  # noqa: E402
from engine.replay import replay_files  # noqa: E402
from engine.silver import GridConfig, SilverBuilder  # noqa: E402
from engine.silver_parquet import SilverParquetWriter  # noqa: E402
from engine.synthetic import write_synthetic_dbn  # noqa: E402
from qmachina.silver_build import grid_config_of  # noqa: E402
from qmachina.specs.pipeline import default_configs_root, resolve_pipeline  # noqa: E402

# The grid the shipped ES pipeline resolves to: the benchmark measures what ships.
ES_GRID: GridConfig = grid_config_of(
    resolve_pipeline(default_configs_root() / "pipelines" / "es_default.yaml", check_files=False)
)


def best_of(runs: int, action: Callable[[], None]) -> float:
    """The fastest of ``runs`` timings of ``action()`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per stage (best kept)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data" / "bench")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    args.data_dir.mkdir(parents=True, exist_ok=True)
    dbn_file = args.data_dir / f"synthetic-{args.events}-{args.seed}.mbo.dbn.zst"
    if not dbn_file.exists():
        started = time.perf_counter()
        write_synthetic_dbn(dbn_file, args.events, args.seed)
        if not args.json:
            print(f"generated {dbn_file} in {time.perf_counter() - started:.1f} s")

    events = np.concatenate(list(replay_files([dbn_file])))
    n_events = len(events)

    def book_only() -> None:
        OrderBook(ES_GRID.tick_size).apply(events)

    bins = 0

    def book_and_silver() -> None:
        nonlocal bins
        builder = SilverBuilder(ES_GRID)
        builder.feed(events)
        builder.finish()
        bins = builder.bins_emitted

    def end_to_end() -> None:
        builder = SilverBuilder(ES_GRID)
        with (
            tempfile.TemporaryDirectory() as tmp,
            SilverParquetWriter(Path(tmp) / "silver.parquet", builder.schema) as writer,
        ):
            for batch in read_ahead(replay_files([dbn_file])):
                for out in builder.feed(batch):
                    writer.write(out)
            for out in builder.finish():
                writer.write(out)

    def decode_only() -> None:
        for _ in replay_files([dbn_file]):
            pass

    small = events[: min(n_events, 10_000)]
    OrderBook(ES_GRID.tick_size).apply(small)  # compile (or load the numba cache)
    warm = SilverBuilder(ES_GRID)
    warm.feed(small)
    warm.finish()

    book_s = best_of(args.runs, book_only)
    silver_s = best_of(args.runs, book_and_silver)
    decode_s = best_of(args.runs, decode_only)
    e2e_s = best_of(args.runs, end_to_end)
    result = {
        "events": n_events,
        "bins": bins,
        "book_events_per_s": round(n_events / book_s),
        "silver_events_per_s": round(n_events / silver_s),
        "decode_events_per_s": round(n_events / decode_s),
        "e2e_events_per_s": round(n_events / e2e_s),
        "file": str(dbn_file),
        "file_bytes": dbn_file.stat().st_size,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:,}" if isinstance(value, int) else f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
