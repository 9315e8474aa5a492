"""Orchestration benchmark: a 1,000-point sweep through the running stack (`qmachina up`).

    python bench/sweep.py --json

The sweep is the derivative baseline on the full ES sample session (the shipped pipeline, over
30,000 silver bins of 100 ms), 1,000 points submitted through the API as an inline spec, in one
of two shapes (``--workload``):

- ``trade-geometry`` (default): 2 signal parameter sets x 5 thresholds x 5 take-profits x 4 stop
  losses x 5 cooldowns: two scores, and 1,000 evaluations of ~0.3 ms each;
- ``signal-params``: 10 ``k_ticks`` x 5 ``z_window`` x 2 ``w_d1`` (100 scores) x 2 thresholds x
  5 take-profits: scoring dominates, as in a search over the signal itself.

First the same points are scored and evaluated in this process exactly as a chunk does it
(``ChunkEvaluator``: each score once, every point evaluated), silver and gold already in memory:
that is the pure evaluation time. Then a two-point warm-up sweep on the same data goes through
the stack (the worker loads its numba kernels, silver and gold, as any worker does for its first
sweep of a dataset; reported as ``warmup_wall_s``), and then the sweep itself, followed over
Server-Sent Events:

- ``sweep_wall_s``: submission until the last point is recorded in the store;
- ``orchestration_overhead_s`` = ``sweep_wall_s`` - pure evaluation time, and its share of
  ``sweep_wall_s`` (target: at most 10 %): workflow scheduling, activities, store writes,
  heartbeats, progress events, and evaluation split over chunks;
- ``job_wall_s``: until the job has finished (its ``sweep_finished`` event);
- ``tracking_s``: MLflow logging of every point, which follows the finished job (off the
  evaluation path, reported apart).

The silver is built into the stack's lake first when it is missing (not timed). Requests carry
``--token`` / ``QMACHINA_TOKEN``, else a token the local dev issuer mints for you.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from activities.lake_frames import LakeFrames  # noqa: E402
from activities.sweep import ChunkEvaluator, load_sweep  # noqa: E402
from qmachina.auth import DevIssuerError  # noqa: E402
from qmachina.auth.client import TOKEN_VARIABLE, api_auth  # noqa: E402
from qmachina.settings import load_settings  # noqa: E402
from qmachina.silver_build import MANIFEST_FILE, build_silver  # noqa: E402
from qmachina.specs.pipeline import (  # noqa: E402
    default_configs_root,
    default_data_root,
    resolve_pipeline,
)
from qmachina.sweep_cli import JOBS_PATH, job_events  # noqa: E402
from workflows.experiment_sweep import ExperimentSource  # noqa: E402

PIPELINE = "pipelines/es_default.yaml"
TARGET_OVERHEAD = 0.10


def warmup_spec() -> dict[str, Any]:
    """Two points (one per signal parameter set) of the benchmark's data, gold and signal."""
    spec = bench_spec("trade-geometry", chunk_points=2, max_concurrent_chunks=1)
    spec["name"] = "bench_sweep_warmup"
    spec["eval"] = {**spec["eval"], "tp_ticks": 4, "sl_ticks": 4, "cooldown_bins": 0}
    spec["sweep"] = {**spec["sweep"], "threshold": [0.5]}
    spec["tracking"] = {"mlflow": False}
    return spec


WORKLOADS = ("trade-geometry", "signal-params")


def bench_spec(workload: str, chunk_points: int, max_concurrent_chunks: int) -> dict[str, Any]:
    """The 1,000-point sweep, as the ExperimentSpec document submitted inline."""
    if workload == "signal-params":
        evaluation: dict[str, Any] = {"tp_ticks": [2, 4, 6, 8, 12], "sl_ticks": 4}
        evaluation.update({"cooldown_bins": 50})
        axes: dict[str, Any] = {
            "threshold": [0.4, 0.6],
            "signal_params": {
                "k_ticks": [3, 4, 5, 6, 8, 10, 12, 15, 20, 25],
                "z_window": [200, 300, 400, 500, 600],
                "w_d1": [0.4, 0.6],
            },
        }
    else:
        evaluation = {
            "tp_ticks": [2, 4, 6, 8, 12],
            "sl_ticks": [2, 4, 6, 8],
            "cooldown_bins": [0, 20, 50, 100, 300],
        }
        axes = {"threshold": [0.3, 0.4, 0.5, 0.6, 0.8], "signal_params": {"k_ticks": [5, 10]}}
    return {
        "name": f"bench_sweep_{workload.replace('-', '_')}",
        "serving": "serving/derivative_baseline.yaml",
        "dataset": {"pipelines": [PIPELINE], "train_fraction": 0.6},
        "eval": {"max_hold_bins": 600, "warmup_bins": 600, **evaluation},
        "sweep": axes,
        "parallelism": {
            "chunk_points": chunk_points,
            "max_concurrent_chunks": max_concurrent_chunks,
        },
        "tracking": {"mlflow": True},
        "objective": "total_pnl_ticks",
    }


def silver_bins(lake: Path) -> int:
    """The bins of the ES session's silver, built into ``lake`` first if it is missing."""
    pipeline = resolve_pipeline(default_configs_root() / PIPELINE)
    manifest = lake / pipeline.pipeline_hash / MANIFEST_FILE
    if not manifest.is_file():
        build_silver(pipeline, lake)
    bins: int = json.loads(manifest.read_text())["counts"]["bins"]
    return bins


def pure_evaluation_s(spec: dict[str, Any], lake: Path) -> tuple[float, int]:
    """Seconds this process takes to score and evaluate every point, grouped as a worker does
    it (each score once), with the silver and gold already in memory as a warm worker holds
    them; and the point count."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "bench_sweep.yaml"
        path.write_text(yaml.safe_dump(spec))
        source = ExperimentSource(
            str(path), str(default_configs_root()), str(default_data_root()), str(lake)
        )
        sweep = load_sweep(source)
    frames = LakeFrames()
    silver = frames.silver(sweep.pipeline(PIPELINE), lake)
    frames.gold(sweep.spec_hashes["gold"], sweep.gold_graph, silver)
    timings = []
    for _ in range(2):  # the first pass warms numba's cache and the signal's kernels
        evaluator = ChunkEvaluator(sweep, sweep.points, frames)
        started = time.perf_counter()
        failed = sum(evaluator.outcome(point).failed for point in sweep.points)
        timings.append(time.perf_counter() - started)
    if failed:
        raise SystemExit(f"{failed} points of the benchmark sweep failed in this process")
    return timings[-1], len(sweep.points)


def run_through_stack(
    api: str, auth: httpx.Auth, spec: dict[str, Any], workspace: str, *, tracked: bool = True
) -> dict[str, float | str]:
    """Submit the sweep and time it from its events (with ``tracked``, until MLflow has it)."""
    timeout = httpx.Timeout(60.0, read=None)
    with httpx.Client(base_url=api, auth=auth, timeout=timeout) as client:
        submitted = time.perf_counter()
        response = client.post(JOBS_PATH, params={"workspace": workspace}, json={"spec": spec})
        if response.is_error:
            raise SystemExit(f"submission failed: HTTP {response.status_code} {response.text}")
        job = response.json()
        points_recorded_at: float | None = None
        finished_at = float("nan")
        tracked_at: float | None = None
        state = "unknown"
        last_seen = 0
        while tracked_at is None:  # until MLflow has the sweep (or gave up on it)
            if not tracked and not math.isnan(finished_at):
                tracked_at = finished_at
                break
            for seq, kind, payload in job_events(client, job["id"], workspace, after=last_seen):
                now = time.perf_counter()
                last_seen = seq
                done = kind == "progress" and payload["points_done"] >= payload["points_total"]
                if done and points_recorded_at is None:
                    points_recorded_at = now
                elif kind == "sweep_finished":
                    finished_at = now
                    state = payload["state"]
                elif kind in ("tracked", "tracking_failed"):
                    tracked_at = now
            if tracked_at is None:
                time.sleep(0.2)  # the job's stream ended; tracking follows the job
        if points_recorded_at is None:  # the sweep ended before its last point
            points_recorded_at = finished_at
    return {
        "job_id": job["id"],
        "state": state,
        "sweep_wall_s": points_recorded_at - submitted,
        "job_wall_s": finished_at - submitted,
        "tracking_s": (tracked_at or finished_at) - finished_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", help="the API's base URL (default: from the settings)")
    parser.add_argument("--workspace", default="default")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_VARIABLE),
        help=f"a bearer token (default: ${TOKEN_VARIABLE}, else minted by the local dev issuer)",
    )
    parser.add_argument("--workload", choices=WORKLOADS, default=WORKLOADS[0])
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

    try:
        auth = api_auth(settings, args.token)
    except DevIssuerError as error:
        raise SystemExit(f"{error}; pass it with --token or {TOKEN_VARIABLE}") from None

    spec = bench_spec(args.workload, args.chunk_points, args.max_concurrent_chunks)
    bins = silver_bins(settings.lake_dir)
    evaluation_s, points = pure_evaluation_s(spec, settings.lake_dir)
    warmup = run_through_stack(api, auth, warmup_spec(), args.workspace, tracked=False)
    timing = run_through_stack(api, auth, spec, args.workspace)
    wall = float(timing["sweep_wall_s"])
    overhead = wall - evaluation_s
    report = {
        "workload": args.workload,
        "points": points,
        "bins": bins,
        "chunk_points": args.chunk_points,
        "max_concurrent_chunks": args.max_concurrent_chunks,
        "pure_evaluation_s": round(evaluation_s, 3),
        "warmup_wall_s": round(float(warmup["job_wall_s"]), 3),
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
