"""What a sweep reports besides its runs: progress (best point, ETA) as a query and as ordered job
events, MLflow tracking of its points, and how it fails: a chunk that exhausts its retries, a
plan that cannot be made. Real dev server, real worker code, real SQLite stores."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.sweep import load_sweep
from activities.sweep_tracking import TrackingTarget
from qmachina.store.models import ExperimentRun, JobArtifact
from qmachina.tracking import LAKE_REFS_FILE, LEADERBOARD_FILE, PARENT_TAG, POINT_HASH_TAG
from tests.sweep_stack import Roots, sweep_stack
from workflows.experiment_sweep import (
    CHUNK_RETRY,
    EVALUATE_CHUNK,
    BestPoint,
    ChunkRequest,
    ChunkResult,
    ExperimentSource,
    ExperimentSweep,
    SweepOutcome,
)


def best_of(runs: list[ExperimentRun], objective: str) -> BestPoint:
    """The best succeeded run by the training objective, ties to the smaller hash, computed
    here independently of the workflow and the activities."""
    candidates = [
        (run.metrics["train"][objective], run.point_hash)
        for run in runs
        if run.status == "succeeded" and run.metrics["train"][objective] is not None
    ]
    value, point_hash = min(candidates, key=lambda c: (-c[0], c[1]))
    return BestPoint(point_hash, float(value))


def test_progress_reports_the_best_point_and_an_eta_in_the_query_and_the_events(
    sweep_roots: Roots, sweep_store_url: str
) -> None:
    async def scenario() -> None:
        async with sweep_stack(sweep_store_url) as stack, stack.worker():
            request = replace(
                stack.request("es_small", sweep_roots), chunk_points=4, max_concurrent_chunks=1
            )
            handle = await stack.start(request)
            outcome = await handle.result()
            progress = await handle.query(ExperimentSweep.progress)
            runs = await stack.runs()
            events = await stack.events()

        assert outcome == SweepOutcome("succeeded", points_recorded=16, points_failed=0)
        best = best_of(runs, "total_pnl_ticks")
        assert progress.objective == "total_pnl_ticks"
        assert progress.best == best
        assert progress.eta_seconds == 0.0
        assert progress.elapsed_seconds > 0.0

        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        kinds = [e.kind for e in events]
        assert kinds[0] == "sweep_planned"
        assert kinds[-1] == "sweep_finished"
        assert "tracked" not in kinds  # this worker has no tracking target
        steps = [e.payload for e in events if e.kind == "progress"]
        assert len(steps) >= 4  # at least one per chunk
        done = [step["points_done"] for step in steps]
        assert done == sorted(done), "one chunk at a time: progress never goes back"
        assert done[-1] == 16
        assert all(step["points_total"] == 16 for step in steps)
        assert steps[-1]["best"] == {
            "point_hash": best.point_hash,
            "objective_value": best.objective_value,
        }
        assert steps[-1]["eta_seconds"] == 0.0
        assert all(step["eta_seconds"] is not None for step in steps)
        assert events[-1].payload["state"] == "succeeded"

    asyncio.run(scenario())


def test_a_tracked_sweep_logs_every_point_its_leaderboard_and_its_silver_to_mlflow(
    sweep_roots: Roots, sweep_store_url: str, tmp_path: Path
) -> None:
    tracking = TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.sqlite3'}", tmp_path / "artifacts")

    async def scenario() -> tuple[
        str, list[ExperimentRun], dict[str, dict[str, Any]], list[JobArtifact]
    ]:
        async with sweep_stack(sweep_store_url, tracking) as stack, stack.worker():
            handle = await stack.start(stack.request("es_failing", sweep_roots))
            outcome = await handle.result()
            assert outcome == SweepOutcome("succeeded", points_recorded=8, points_failed=4)
            ordered = await stack.events()
            assert [e.kind for e in ordered][-2:] == ["sweep_finished", "tracked"]
            events = {e.kind: e.payload for e in ordered}
            return handle.id, await stack.runs(), events, await stack.artifacts()

    workflow_id, runs, events, artifacts = asyncio.run(scenario())
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    experiment = client.get_experiment_by_name("es_failing")
    assert experiment is not None
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`qmachina.sweep_key` = '{workflow_id}'"
    )
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    sweep = load_sweep(sweep_roots.source("es_failing"))
    assert {k: parent.data.tags[f"spec.{k}"] for k in sweep.spec_hashes} == sweep.spec_hashes
    assert parent.data.params["objective"] == "total_pnl_ticks"
    assert parent.data.params["points"] == "4"
    assert events["tracked"]["mlflow_parent_run_id"] == parent.info.run_id
    assert events["tracked"]["child_runs"] == 4

    children = client.search_runs(
        [experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    succeeded = {r.point_hash: r for r in runs if r.status == "succeeded"}
    assert {c.data.tags[POINT_HASH_TAG] for c in children} == set(succeeded)
    for child in children:
        stored = succeeded[child.data.tags[POINT_HASH_TAG]].metrics
        for span in ("train", "test"):
            for name, value in stored[span].items():
                if value is None:
                    assert f"{span}_{name}" not in child.data.metrics
                else:
                    assert child.data.metrics[f"{span}_{name}"] == pytest.approx(value)
        assert child.data.params["signal.z_min_periods"] == "60"

    artifacts_dir = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "dl")))
    leaderboard = json.loads((artifacts_dir / LEADERBOARD_FILE).read_text())["rows"]
    ranked = sorted(
        succeeded.values(),
        key=lambda r: (-r.metrics["train"]["total_pnl_ticks"], r.point_hash),
    )
    assert [row["point_hash"] for row in leaderboard] == [r.point_hash for r in ranked]
    refs = json.loads((artifacts_dir / LAKE_REFS_FILE).read_text())["refs"]
    assert len(refs) == 1
    silver = Path(refs[0]["path"])
    assert refs[0]["sha256"] == hashlib.sha256(silver.read_bytes()).hexdigest()
    assert [(a.kind, a.uri, a.sha256) for a in artifacts] == [
        ("silver", refs[0]["path"], refs[0]["sha256"])
    ]


def test_a_tracking_failure_is_reported_and_leaves_the_job_succeeded(
    sweep_roots: Roots, sweep_store_url: str, tmp_path: Path
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the tracking store's directory should be")
    tracking = TrackingTarget(f"sqlite:///{blocked / 'mlflow.sqlite3'}", tmp_path / "artifacts")

    async def scenario() -> None:
        async with sweep_stack(sweep_store_url, tracking) as stack, stack.worker():
            handle = await stack.start(stack.request("es_small", sweep_roots))
            outcome = await handle.result()
            events = await stack.events()
            assert await stack.job_status() == "succeeded"

        assert outcome == SweepOutcome("succeeded", points_recorded=16, points_failed=0)
        kinds = [e.kind for e in events]
        assert kinds[-2:] == ["sweep_finished", "tracking_failed"]
        assert kinds.count("tracking_failed") == 1
        assert "MLflow tracking failed" in events[-1].payload["error"]

    asyncio.run(scenario())


def test_a_chunk_that_exhausts_its_retries_fails_the_job_and_keeps_finished_points(
    sweep_roots: Roots, sweep_store_url: str
) -> None:
    attempts: list[int] = []

    async def scenario() -> None:
        async with sweep_stack(sweep_store_url) as stack:
            real = stack.activities

            @activity.defn(name=EVALUATE_CHUNK)
            async def evaluate_chunk_with_a_broken_disk(request: ChunkRequest) -> ChunkResult:
                if request.chunk_index == 1:
                    attempts.append(activity.info().attempt)
                    raise OSError(28, "No space left on device")
                return await real.evaluate_chunk(request)

            worker = Worker(
                stack.env.client,
                task_queue=stack.task_queue,
                workflows=[ExperimentSweep],
                activities=[
                    real.plan_sweep,
                    evaluate_chunk_with_a_broken_disk,
                    real.track_sweep,
                    real.finish_sweep,
                ],
            )
            async with worker:
                request = replace(
                    stack.request("es_small", sweep_roots), chunk_points=4, max_concurrent_chunks=1
                )
                handle = await stack.start(request)
                with pytest.raises(WorkflowFailureError) as failure:
                    await handle.result()
                progress = await handle.query(ExperimentSweep.progress)
            runs = await stack.runs()
            assert await stack.job_status() == "failed"
            finished = [e for e in await stack.events() if e.kind == "sweep_finished"]

        cause = failure.value.cause
        assert isinstance(cause, ApplicationError)
        assert "chunk 1 failed" in cause.message
        assert "No space left on device" in cause.message
        assert attempts == list(range(1, CHUNK_RETRY.maximum_attempts + 1))
        # Chunk 0 finished before; no chunk started after the failure.
        points = load_sweep(request.source).points
        assert sorted(r.point_hash for r in runs) == sorted(p.point_hash for p in points[:4])
        assert (progress.state, progress.chunks_done, progress.points_done) == ("failed", 1, 4)
        assert len(finished) == 1
        assert finished[0].payload["state"] == "failed"
        assert "No space left on device" in finished[0].payload["error"]

    asyncio.run(scenario())


def test_a_plan_that_cannot_be_made_fails_the_job_at_once(
    sweep_roots: Roots, sweep_store_url: str
) -> None:
    async def scenario() -> None:
        async with sweep_stack(sweep_store_url) as stack, stack.worker():
            request = stack.request("es_small", sweep_roots)
            missing = ExperimentSource(
                "experiments/no_such_experiment.yaml",
                request.source.configs_root,
                request.source.data_root,
                request.source.lake_root,
            )
            handle = await stack.start(replace(request, source=missing))
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
            history = await handle.fetch_history()
            assert await stack.job_status() == "failed"
            assert await stack.runs() == []
            finished = [e for e in await stack.events() if e.kind == "sweep_finished"]

        cause = failure.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.message.startswith("sweep planning failed:")
        assert "no_such_experiment.yaml" in cause.message
        scheduled = [
            e for e in history.events if e.HasField("activity_task_scheduled_event_attributes")
        ]
        names = [e.activity_task_scheduled_event_attributes.activity_type.name for e in scheduled]
        assert names == ["plan_sweep", "finish_sweep"], "a spec error is not retried or tracked"
        started = [
            e for e in history.events if e.HasField("activity_task_started_event_attributes")
        ]
        assert started[0].activity_task_started_event_attributes.attempt == 1
        assert len(finished) == 1
        assert "no_such_experiment.yaml" in finished[0].payload["error"]

    asyncio.run(scenario())
