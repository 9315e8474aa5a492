"""What the Temporal sweep tests share: the ES twenty-minute configs with their silver in a lake,
and a stack of a local dev server, a SQLite store and a fresh task queue per test.

The fixtures ``sweep_roots`` and ``sweep_store_url`` live in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.sweep import SweepActivities
from activities.sweep_tracking import TrackingTarget
from qmachina.experiment_run import run_experiment
from qmachina.silver_build import build_silver
from qmachina.specs.pipeline import resolve_pipeline
from qmachina.store import repository as repo
from qmachina.store.database import create_store_engine, session_factory
from qmachina.store.models import ExperimentRun, JobArtifact, JobEvent
from qmachina.temporal_names import sweep_workflow_id
from tests.es_grid import SMALL_EXPERIMENT, es_session_configs
from tests.live_server import start_dev_server
from worker.main import sweep_worker
from workflows.experiment_sweep import (
    ExperimentSource,
    ExperimentSweep,
    SweepOutcome,
    SweepRequest,
)

# z_min_periods 700 exceeds the serving spec's z_window (600): the signal refuses those points.
FAILING_EXPERIMENT = """\
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
SWEEP_EXPERIMENTS = {"es_small": SMALL_EXPERIMENT, "es_failing": FAILING_EXPERIMENT}


@dataclass(frozen=True)
class Roots:
    configs: Path
    data: Path
    lake: Path

    def source(self, experiment: str) -> ExperimentSource:
        return ExperimentSource(
            f"experiments/{experiment}.yaml", str(self.configs), str(self.data), str(self.lake)
        )


def make_roots(base: Path, sample_dir: Path) -> Roots:
    """The shipped configs with the ES pipeline cut to twenty minutes, its silver in a lake.

    The small experiment is also run once in this process: on a fresh checkout that compiles
    (and caches on disk) every numba kernel a sweep uses, here, instead of inside the first test
    that waits on a sweep with a deadline."""
    configs = es_session_configs(base, SWEEP_EXPERIMENTS)
    pipeline = configs / "pipelines" / "es_default.yaml"
    build_silver(resolve_pipeline(pipeline, configs, sample_dir), base / "lake")
    run_experiment(
        configs / "experiments" / "es_small.yaml",
        lake_root=base / "lake",
        configs_root=configs,
        data_root=sample_dir,
    )
    return Roots(configs, sample_dir, base / "lake")


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

    async def events(self) -> list[JobEvent]:
        engine = create_store_engine(self.store_url)
        try:
            async with session_factory(engine)() as session:
                return await repo.job_events_after(session, self.workspace_id, self.job_id, 0)
        finally:
            await engine.dispose()

    async def artifacts(self) -> list[JobArtifact]:
        engine = create_store_engine(self.store_url)
        try:
            async with session_factory(engine)() as session:
                return await repo.list_artifacts(session, self.workspace_id, self.job_id)
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
async def sweep_stack(
    store_url: str, tracking: TrackingTarget | None = None
) -> AsyncIterator[Stack]:
    """A dev server with qMachina's search attributes, a workspace and a queued job in the store."""
    engine = create_store_engine(store_url)
    sessions = session_factory(engine)
    async with sessions.begin() as session:
        workspace = await repo.create_workspace(session, f"ws-{uuid.uuid4().hex[:8]}", "Desk")
        job = await repo.create_job(session, workspace.id, "es-sweep", "e" * 64)
    try:
        async with await start_dev_server() as env:
            yield Stack(
                env,
                SweepActivities(sessions, tracking),
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
