"""ExperimentSweep on a local Temporal dev server: a full sweep, cancel, a killed worker, a failing
point. Each test has its own server, task queue and SQLite store; the ES silver is built once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.sweep import SweepActivities, load_sweep
from qmachina import experiment_run
from qmachina.silver_build import build_silver
from qmachina.specs.pipeline import resolve_pipeline
from qmachina.store import repository as repo
from qmachina.store.database import (
    create_store_engine,
    default_sqlite_url,
    session_factory,
    upgrade_to_head,
)
from qmachina.store.models import ExperimentRun
from tests.conftest import REPO_ROOT
from tests.es_grid import SMALL_EXPERIMENT, es_session_configs
from worker.main import sweep_worker
from workflows.experiment_sweep import (
    ExperimentSource,
    ExperimentSweep,
    SweepOutcome,
    SweepRequest,
    sweep_workflow_id,
)

TEMPORAL = Path(sys.executable).parent / "temporal"
REPLAY_DIR = Path(__file__).resolve().parent / "replay"
RECORD_HISTORIES_ENV = "QMACHINA_RECORD_HISTORIES"

# z_min_periods 700 exceeds the serving spec's z_window (600): the signal refuses those points.
FAILING = """\
name: es_failing
serving: serving/derivative_baseline.yaml
dataset: {train_fraction: 0.5}
eval:
  tp_ticks: [2, 4]
  sl_ticks: 2
  max_hold_bins: 300
  warmup_bins: 100
sweep:
  threshold: [0.2, 0.5]
  signal_params:
    z_min_periods: [60, 700]
"""


@dataclass(frozen=True)
class Roots:
    configs: Path
    data: Path
    lake: Path

    def source(self, experiment: str) -> ExperimentSource:
        return ExperimentSource(
            f"experiments/{experiment}.yaml", str(self.configs), str(self.data), str(self.lake)
        )


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Roots:
    """The shipped configs with the ES pipeline cut to twenty minutes, its silver in a lake."""
    base = tmp_path_factory.mktemp("sweep")
    configs = es_session_configs(base, {"es_small": SMALL_EXPERIMENT, "es_failing": FAILING})
    pipeline = configs / "pipelines" / "es_default.yaml"
    build_silver(resolve_pipeline(pipeline, configs, sample_dir), base / "lake")
    return Roots(configs, sample_dir, base / "lake")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = default_sqlite_url(tmp_path)
    asyncio.run(upgrade_to_head(url))
    return url


@dataclass
class Stack:
    """A dev server, a store and a fresh task queue for one test."""

    env: WorkflowEnvironment
    activities: SweepActivities
    store_url: str
    task_queue: str
    workspace_id: str
    job_id: str

    def worker(self) -> Worker:
        return sweep_worker(
            self.env.client,
            self.activities,
            task_queue=self.task_queue,
            sticky_schedule_to_start=timedelta(seconds=1),
        )

    def request(self, experiment: str, roots: Roots) -> SweepRequest:
        return SweepRequest(self.workspace_id, self.job_id, roots.source(experiment))

    async def start(self, request: SweepRequest) -> WorkflowHandle[ExperimentSweep, SweepOutcome]:
        return await self.env.client.start_workflow(
            ExperimentSweep.run,
            request,
            id=sweep_workflow_id(request.workspace_id, request.job_id),
            task_queue=self.task_queue,
            # A workflow task held by a killed worker is retried elsewhere after this.
            task_timeout=timedelta(seconds=2),
        )

    async def runs(self) -> list[ExperimentRun]:
        engine = create_store_engine(self.store_url)
        try:
            async with session_factory(engine)() as session:
                rows = await session.scalars(
                    sa.select(ExperimentRun).where(ExperimentRun.job_id == self.job_id)
                )
                return list(rows)
        finally:
            await engine.dispose()

    async def job_status(self) -> str:
        engine = create_store_engine(self.store_url)
        try:
            async with session_factory(engine)() as session:
                job = await repo.get_job(session, self.workspace_id, self.job_id)
                return job.status
        finally:
            await engine.dispose()


@asynccontextmanager
async def sweep_stack(store_url: str) -> AsyncIterator[Stack]:
    engine = create_store_engine(store_url)
    sessions = session_factory(engine)
    async with sessions.begin() as session:
        workspace = await repo.create_workspace(session, f"ws-{uuid.uuid4().hex[:8]}", "Desk")
        job = await repo.create_job(session, workspace.id, "es-sweep", "e" * 64)
    try:
        async with await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(TEMPORAL),
            dev_server_extra_args=[
                "--dynamic-config-value",
                "frontend.enableServerVersionCheck=false",
            ],
        ) as env:
            yield Stack(
                env,
                SweepActivities(sessions),
                store_url,
                f"sweep-test-{uuid.uuid4().hex}",
                workspace.id,
                job.id,
            )
    finally:
        await engine.dispose()


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


def test_sweep_records_every_point_once(roots: Roots, store_url: str) -> None:
    async def scenario() -> None:
        async with sweep_stack(store_url) as stack, stack.worker():
            # Four chunks, two per run: the sweep continues as new once.
            request = replace(
                stack.request("es_small", roots),
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
            roots.configs / request.source.experiment,
            lake_root=roots.lake,
            configs_root=roots.configs,
            data_root=roots.data,
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
def test_cancel_keeps_finished_points(roots: Roots, store_url: str, how: str) -> None:
    async def scenario() -> None:
        async with sweep_stack(store_url) as stack, stack.worker():
            request = replace(
                stack.request("es_small", roots),
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


def test_sweep_resumes_after_worker_is_killed(roots: Roots, store_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sweep_stack(store_url) as stack:
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
                    store_url,
                    "--sticky-schedule-to-start-seconds",
                    "1",
                ],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                request = replace(
                    stack.request("es_small", roots),
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

                await until(mid_chunk)
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


def test_failing_point_records_its_error_and_the_rest_finish(roots: Roots, store_url: str) -> None:
    async def scenario() -> None:
        async with sweep_stack(store_url) as stack, stack.worker():
            handle = await stack.start(replace(stack.request("es_failing", roots), chunk_points=3))
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
