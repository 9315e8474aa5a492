"""A Temporal worker for experiment sweeps, promotions and modeling sessions.

``python -m worker.main`` runs until SIGINT or SIGTERM. Every option defaults to the settings
(:mod:`qmachina.settings`: ``TEMPORAL_ADDRESS``, ``QMACHINA_DATABASE_URL``, ...). The worker
holds the store's database URL (never the workflow history), so credentials in it stay out of
Temporal.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from pydantic import SecretStr
from temporalio.client import Client
from temporalio.worker import Worker

from activities.live import LiveActivities
from activities.modeling import ModelingActivities
from activities.promotion import PromotionActivities
from activities.sweep import SweepActivities
from activities.sweep_tracking import TrackingTarget
from qmachina.settings import SettingsError, load_settings
from qmachina.store.database import create_store_engine, session_factory
from qmachina.temporal_names import SWEEP_TASK_QUEUE
from workflows.experiment_sweep import ExperimentSweep
from workflows.live_session import LiveIngestionSession
from workflows.modeling_session import ModelingSession
from workflows.promotion import Promotion


def sweep_worker(
    client: Client,
    activities: SweepActivities,
    *,
    promotions: PromotionActivities | None = None,
    modeling: ModelingActivities | None = None,
    live: LiveActivities | None = None,
    task_queue: str = SWEEP_TASK_QUEUE,
    sticky_schedule_to_start: timedelta = timedelta(seconds=10),
) -> Worker:
    """A worker running ExperimentSweep and its activities on ``task_queue``; given
    ``promotions``, the Promotion workflow and its activities too; given ``modeling`` as well,
    the ModelingSession workflow (which starts sweeps and promotions) and its activities; given
    ``live``, the LiveIngestionSession workflow and its ingestion activity.

    ``sticky_schedule_to_start`` bounds how long a workflow waits for the worker that last ran
    it before another worker takes over, which is how long a killed worker delays recovery.
    """
    workflows: list[type] = [ExperimentSweep]
    registered: list[Callable[..., Any]] = [
        activities.plan_sweep,
        activities.evaluate_chunk,
        activities.track_sweep,
        activities.finish_sweep,
    ]
    if promotions is not None:
        workflows.append(Promotion)
        registered += [promotions.preflight_promotion, promotions.repoint_alias]
        if modeling is not None:
            workflows.append(ModelingSession)
            registered += [modeling.prepare_model_execution, modeling.register_session_version]
    if live is not None:
        workflows.append(LiveIngestionSession)
        registered.append(live.ingest_live)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=workflows,
        activities=registered,
        sticky_queue_schedule_to_start_timeout=sticky_schedule_to_start,
    )


async def run_worker(
    address: str,
    namespace: str,
    task_queue: str,
    database_url: str,
    sticky_schedule_to_start: timedelta,
    tracking: TrackingTarget | None,
    api_key: SecretStr | None = None,
) -> None:
    """Serve ``task_queue`` until SIGINT or SIGTERM, then shut down gracefully. ``api_key`` is
    the Databento key live ingestion authenticates with."""
    client = await Client.connect(address, namespace=namespace)
    engine = create_store_engine(database_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        sessions = session_factory(engine)
        worker = sweep_worker(
            client,
            SweepActivities(sessions, tracking),
            promotions=PromotionActivities(sessions),
            modeling=ModelingActivities(sessions),
            live=LiveActivities(client, sessions, api_key),
            task_queue=task_queue,
            sticky_schedule_to_start=sticky_schedule_to_start,
        )
        async with worker:
            await stop.wait()
    finally:
        await engine.dispose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.main", description=__doc__)
    try:
        settings = load_settings()
    except SettingsError as error:
        parser.error(str(error))
    parser.add_argument("--address", default=settings.temporal_target)
    parser.add_argument("--namespace", default=settings.temporal_namespace)
    parser.add_argument("--task-queue", default=SWEEP_TASK_QUEUE)
    parser.add_argument(
        "--database-url", default=settings.database_url, help="the control-plane store"
    )
    parser.add_argument("--sticky-schedule-to-start-seconds", type=float, default=10.0)
    parser.add_argument(
        "--mlflow-tracking-uri",
        default=settings.mlflow_tracking_uri,
        help="where sweeps are logged (default: the settings' MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--no-tracking", action="store_true", help="do not log sweeps to MLflow")
    args = parser.parse_args(argv)
    tracking = (
        None
        if args.no_tracking
        else TrackingTarget(args.mlflow_tracking_uri, settings.mlflow_artifact_root)
    )
    asyncio.run(
        run_worker(
            args.address,
            args.namespace,
            args.task_queue,
            args.database_url,
            timedelta(seconds=args.sticky_schedule_to_start_seconds),
            tracking,
            settings.databento_api_key,
        )
    )


if __name__ == "__main__":
    main()
