"""ExperimentSweep on a local Temporal dev server: a full sweep, cancel, a killed worker, a failing
point. Each test has its own server, task queue and SQLite store; the ES silver is built once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import CancelledError

from activities.sweep import load_sweep
from qmachina import experiment_run
from tests.conftest import REPO_ROOT
from tests.sweep_stack import Roots, sweep_stack, until
from workflows.experiment_sweep import ExperimentSweep, SweepOutcome

REPLAY_DIR = Path(__file__).resolve().parent / "replay"
RECORD_HISTORIES_ENV = "QMACHINA_RECORD_HISTORIES"


def test_sweep_records_every_point_once(sweep_roots: Roots, sweep_store_url: str) -> None:
    async def scenario() -> None:
        async with sweep_stack(sweep_store_url) as stack, stack.worker():
            # Four chunks, two per run: the sweep continues as new once.
            request = replace(
                stack.request("es_small", sweep_roots),
                chunk_points=4,
                max_concurrent_chunks=2,
                chunks_per_run=2,
            )
            handle = await stack.start(request)
            outcome = await handle.result()
            latest = stack.env.client.get_workflow_handle(handle.id)
            progress = await latest.query(ExperimentSweep.progress)
            first = stack.env.client.get_workflow_handle(
                handle.id, run_id=handle.first_execution_run_id
            )
            first_run = await first.fetch_history()
            last_run = await latest.fetch_history()
            runs = await stack.runs()
            assert await stack.job_status() == "succeeded"

        assert outcome == SweepOutcome("succeeded", points_recorded=16, points_failed=0)
        assert (progress.state, progress.points_total, progress.points_done) == (
            "succeeded",
            16,
            16,
        )
        assert (progress.chunks_done, progress.chunks_in_flight) == (4, 0)
        assert first_run.events[-1].event_type == (
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
        )
        points = load_sweep(request.source).points
        assert sorted(r.point_hash for r in runs) == sorted(p.point_hash for p in points)
        assert all(r.status == "succeeded" for r in runs)
        assert all(r.created_at == r.updated_at for r in runs), "a point was recorded twice"

        # The same points, the same metrics as the in-process experiment run.
        in_process = experiment_run.run_experiment(
            sweep_roots.configs / request.source.experiment,
            lake_root=sweep_roots.lake,
            configs_root=sweep_roots.configs,
            data_root=sweep_roots.data,
        )
        by_hash = {r.point_hash: r.metrics for r in runs}
        for row in in_process.leaderboard:
            stored = by_hash[row.point.point_hash]
            assert stored["train"]["total_pnl_ticks"] == row.train["total_pnl_ticks"]
            assert stored["test"]["signals"] == row.test["signals"]

        if os.environ.get(RECORD_HISTORIES_ENV) == "1":
            (REPLAY_DIR / "experiment_sweep_first_run.json").write_text(first_run.to_json())
            (REPLAY_DIR / "experiment_sweep_continued_run.json").write_text(last_run.to_json())

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["signal", "temporal_cancel"])
def test_cancel_keeps_finished_points(sweep_roots: Roots, sweep_store_url: str, how: str) -> None:
    async def scenario() -> None:
        async with sweep_stack(sweep_store_url) as stack, stack.worker():
            request = replace(
                stack.request("es_small", sweep_roots),
                chunk_points=2,
                max_concurrent_chunks=2,
                heartbeat_timeout_seconds=1.0,
                point_delay_seconds=0.3,
            )
            handle = await stack.start(request)

            async def some_chunk_done() -> bool:
                return (await handle.query(ExperimentSweep.progress)).chunks_done >= 1

            await until(some_chunk_done)
            if how == "signal":
                await handle.signal(ExperimentSweep.cancel)
                outcome = await handle.result()
                assert outcome.state == "canceled"
            else:
                await handle.cancel()
                with pytest.raises(WorkflowFailureError) as failure:
                    await handle.result()
                assert isinstance(failure.value.cause, CancelledError)
            progress = await handle.query(ExperimentSweep.progress)
            assert await stack.job_status() == "canceled"
            recorded = await stack.runs()
            await asyncio.sleep(1.0)  # canceled chunks must have stopped, not just been left
            assert len(await stack.runs()) == len(recorded)

        assert progress.state == "canceled"
        assert progress.chunks_in_flight == 0
        assert 2 <= len(recorded) < 16
        assert len({r.point_hash for r in recorded}) == len(recorded)
        if how == "signal":
            assert outcome.points_recorded == len(recorded)

    asyncio.run(scenario())


def test_sweep_resumes_after_worker_is_killed(
    sweep_roots: Roots, sweep_store_url: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with sweep_stack(sweep_store_url) as stack:
            log = (tmp_path / "worker.log").open("w")
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker.main",
                    "--address",
                    stack.env.client.service_client.config.target_host,
                    "--task-queue",
                    stack.task_queue,
                    "--database-url",
                    sweep_store_url,
                    "--sticky-schedule-to-start-seconds",
                    "1",
                ],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                request = replace(
                    stack.request("es_small", sweep_roots),
                    chunk_points=8,
                    max_concurrent_chunks=2,
                    heartbeat_timeout_seconds=1.0,
                    point_delay_seconds=0.3,
                )
                handle = await stack.start(request)

                # Two chunks of eight run side by side; both are cut mid-chunk.
                async def mid_chunk() -> bool:
                    assert process.poll() is None, (tmp_path / "worker.log").read_text()
                    return len(await stack.runs()) >= 3

                await until(mid_chunk, timeout=180.0)  # a cold worker imports and loads first
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait()
                log.close()
            recorded_before_kill = len(await stack.runs())
            async with stack.worker():
                outcome = await handle.result()
            runs = await stack.runs()
            assert await stack.job_status() == "succeeded"

        assert recorded_before_kill < 16
        assert outcome == SweepOutcome("succeeded", points_recorded=16, points_failed=0)
        assert len({r.point_hash for r in runs}) == len(runs) == 16
        assert all(r.created_at == r.updated_at for r in runs), "a point was recorded twice"

    asyncio.run(scenario())


def test_failing_point_records_its_error_and_the_rest_finish(
    sweep_roots: Roots, sweep_store_url: str
) -> None:
    async def scenario() -> None:
        async with sweep_stack(sweep_store_url) as stack, stack.worker():
            handle = await stack.start(
                replace(stack.request("es_failing", sweep_roots), chunk_points=3)
            )
            outcome = await handle.result()
            progress = await handle.query(ExperimentSweep.progress)
            runs = await stack.runs()
            assert await stack.job_status() == "succeeded"

        assert outcome == SweepOutcome("succeeded", points_recorded=8, points_failed=4)
        assert (progress.points_done, progress.points_failed) == (8, 4)
        failed = [r for r in runs if r.status == "failed"]
        assert {r.params["signal_params"]["z_min_periods"] for r in failed} == {700}
        for run in failed:
            assert run.metrics["error"]["type"] == "SignalError"
            assert "z_min_periods" in run.metrics["error"]["message"]
            assert "Traceback" in run.metrics["error"]["traceback"]
        succeeded = [r for r in runs if r.status == "succeeded"]
        assert len(succeeded) == 4
        assert all("train" in r.metrics and "test" in r.metrics for r in succeeded)

    asyncio.run(scenario())
