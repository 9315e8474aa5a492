"""Orchestration benchmark: a 1,000-point sweep through the running stack (`qmachina up`).

    python bench/sweep.py --json

The sweep is the derivative baseline on the full ES sample session (the shipped pipeline, over
30,000 silver bins of 100 ms), 2 signal parameter sets x 5 thresholds x 5 take-profits x 4 stop
losses x 5 cooldowns = 1,000 points, submitted through the API as an inline spec.

First the same spec is evaluated in this process (``run_experiment``: silver read once, gold
once, each score once, every point evaluated): that is the pure evaluation time. Then the sweep
is submitted to the stack and followed over Server-Sent Events:

- ``sweep_wall_s``: submission until the last point is recorded in the store;
- ``orchestration_overhead_s`` = ``sweep_wall_s`` - pure evaluation time, and its share of
  ``sweep_wall_s`` (target: at most 10 %): workflow scheduling, activities, store writes,
  heartbeats, progress events, and evaluation split over chunks;
- ``tracking_s``: MLflow logging of every point after the last one is recorded (off the
  evaluation path, reported apart), and ``job_wall_s`` until the job has finished.

The silver is built into the stack's lake first when it is missing (not timed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `engine` package; the repository root goes in front of it.
sys.path.insert(0, str(REPO_ROOT))

from qmachina.experiment_run import run_experiment  # noqa: E402
from qmachina.settings import load_settings  # noqa: E402
from qmachina.silver_build import MANIFEST_FILE, build_silver  # noqa: E402
from qmachina.specs.pipeline import default_configs_root, resolve_pipeline  # noqa: E402
from qmachina.sweep_cli import JOBS_PATH, job_events  # noqa: E402

PIPELINE = "pipelines/es_default.yaml"
TARGET_OVERHEAD = 0.10


def bench_spec(chunk_points: int, max_concurrent_chunks: int) -> dict[str, Any]:
    """The 1,000-point sweep, as the ExperimentSpec document submitted inline."""
    return {
        "name": "bench_sweep_1000",
        "serving": "serving/derivative_baseline.yaml",
        "dataset": {"pipelines": [PIPELINE], "train_fraction": 0.6},
        "eval": {
            "tp_ticks": [2, 4, 6, 8, 12],
            "sl_ticks": [2, 4, 6, 8],
            "max_hold_bins": 600,
            "warmup_bins": 600,
            "cooldown_bins": [0, 20, 50, 100, 300],
        },
        "sweep": {
            "threshold": [0.3, 0.4, 0.5, 0.6, 0.8],
            "signal_params": {"k_ticks": [5, 10]},
        },
        "parallelism": {
            "chunk_points": chunk_points,
            "max_concurrent_chunks": max_concurrent_chunks,
        },
        "tracking": {"mlflow": True, "experiment_name": "bench_sweep_1000"},
        "objective": "total_pnl_ticks",
    }


def silver_bins(lake: Path) -> int:
    """The bins of the ES session's silver, built into ``lake`` first if it is missing."""
    pipeline = resolve_pipeline(default_configs_root() / PIPELINE)
    manifest = lake / pipeline.pipeline_hash / MANIFEST_FILE
    if not manifest.is_file():
        build_silver(pipeline, lake)
    bins: int = json.loads(manifest.read_text())["bins"]
    return bins


def pure_evaluation_s(spec: dict[str, Any], lake: Path) -> tuple[float, int]:
    """Seconds to evaluate the sweep in this process (after a warm-up), and its point count."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "bench_sweep.yaml"
        path.write_text(yaml.safe_dump(spec))
        run_experiment(path, lake_root=lake)  # warm-up: numba caches, file system cache
        started = time.perf_counter()
        result = run_experiment(path, lake_root=lake)
        return time.perf_counter() - started, len(result.leaderboard)


def run_through_stack(api: str, spec: dict[str, Any], workspace: str) -> dict[str, float | str]:
    """Submit the sweep and time it from its events."""
    with httpx.Client(base_url=api, timeout=httpx.Timeout(60.0, read=None)) as client:
        submitted = time.perf_counter()
        response = client.post(JOBS_PATH, json={"workspace": workspace, "spec": spec})
        if response.is_error:
            raise SystemExit(f"submission failed: HTTP {response.status_code} {response.text}")
        job = response.json()
        points_recorded_at: float | None = None
        finished_at = float("nan")
        state = "unknown"
        for _, kind, payload in job_events(client, job["id"], workspace):
            now = time.perf_counter()
            done = kind == "progress" and payload["points_done"] >= payload["points_total"]
            if done and points_recorded_at is None:
                points_recorded_at = now
            elif kind == "sweep_finished":
                finished_at = now
                state = payload["state"]
        if points_recorded_at is None:  # the sweep ended before its last point
            points_recorded_at = finished_at
    return {
        "job_id": job["id"],
        "state": state,
        "sweep_wall_s": points_recorded_at - submitted,
        "job_wall_s": finished_at - submitted,
        "tracking_s": finished_at - points_recorded_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", help="the API's base URL (default: from the settings)")
    parser.add_argument("--workspace", default="default")
    parser.add_argument("--chunk-points", type=int, default=125)
    parser.add_argument("--max-concurrent-chunks", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    settings = load_settings()
    api = args.api or f"http://{settings.api_host}:{settings.api_port}"
    try:
        httpx.get(f"{api}/v1/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as error:
        message = f"the stack's API at {api} is not healthy ({error}): run `qmachina up`"
        raise SystemExit(message) from None

    spec = bench_spec(args.chunk_points, args.max_concurrent_chunks)
    bins = silver_bins(settings.lake_dir)
    evaluation_s, points = pure_evaluation_s(spec, settings.lake_dir)
    timing = run_through_stack(api, spec, args.workspace)
    wall = float(timing["sweep_wall_s"])
    overhead = wall - evaluation_s
    report = {
        "points": points,
        "bins": bins,
        "chunk_points": args.chunk_points,
        "max_concurrent_chunks": args.max_concurrent_chunks,
        "pure_evaluation_s": round(evaluation_s, 3),
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()},
        "points_per_s": round(points / wall, 1),
        "orchestration_overhead_s": round(overhead, 3),
        "orchestration_overhead_fraction": round(overhead / wall, 4),
        "target_overhead_fraction": TARGET_OVERHEAD,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>34}: {value}")


if __name__ == "__main__":
    main()
