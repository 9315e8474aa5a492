"""The API application: ``uvicorn api.app:create_app --factory``.

The lifespan connects one Temporal client and one store engine per process, from the settings;
routes reach them through the dependencies in :mod:`api.dependencies`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from temporalio.client import Client

from api.dependencies import AppState
from api.problems import install_problem_handlers
from api.routes import experiment_jobs, experiments, health
from qmachina.settings import Settings, load_settings
from qmachina.store.database import create_store_engine, session_factory


def create_app(settings: Settings | None = None) -> FastAPI:
    """The qMachina API for ``settings`` (default: read from the environment)."""
    resolved = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = await Client.connect(
            resolved.temporal_target, namespace=resolved.temporal_namespace
        )
        engine = create_store_engine(resolved.database_url)
        app.state.qmachina = AppState(resolved, client, session_factory(engine))
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(
        title="qMachina",
        version="1",
        summary="Event-level market-microstructure research and serving",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.include_router(health.router)
    app.include_router(experiment_jobs.router)
    app.include_router(experiments.router)
    return app
