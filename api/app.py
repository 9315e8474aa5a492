"""The API application: ``uvicorn api.app:create_app --factory``.

The lifespan connects one Temporal client, one store engine and one authorizer per process,
from the settings; routes reach them through the dependencies in :mod:`api.dependencies`. Every
router but health (and the dev issuer's discovery routes) requires a bearer token
(:mod:`api.auth`), and every route of theirs declares the relation it needs
(:mod:`api.access`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from temporalio.client import Client

from api.auth import authentication_for, current_principal
from api.dependencies import AppState
from api.problems import PROTECTED, install_problem_handlers
from api.routes import (
    experiment_jobs,
    experiments,
    health,
    live,
    modeling,
    promotions,
    serving,
    stream,
    well_known,
    workspaces,
)
from qmachina.authz.setup import close_authorizer, open_authorizer
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
        sessions = session_factory(engine)
        authorizer = await open_authorizer(resolved, sessions)
        app.state.qmachina = AppState(resolved, client, sessions, authorizer)
        try:
            yield
        finally:
            await close_authorizer(authorizer)
            await engine.dispose()

    app = FastAPI(
        title="qMachina",
        version="1",
        summary="Event-level market-microstructure research and serving",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.state.authentication = authentication = authentication_for(resolved)
    app.include_router(health.router)
    app.include_router(stream.router)  # a WebSocket: it authenticates after the handshake
    if authentication.dev_issuer is not None:
        app.include_router(well_known.router)
    for router in (
        experiment_jobs.router,
        experiments.router,
        workspaces.router,
        serving.router,
        promotions.router,
        modeling.router,
        live.router,
    ):
        app.include_router(
            router,
            dependencies=[Depends(current_principal)],
            responses=PROTECTED,
        )
    return app
