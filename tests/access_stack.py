"""A served API over a store holding two workspaces, their members and a job of each, one shared
with the other workspace, a serving version of the first with an alias, and a modeling session
of the first (its workflow run by a worker of the session workflow alone): what the access,
quota and fuzz tests call."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from temporalio.client import Client
from temporalio.worker import Worker

from api.app import create_app
from qmachina.serving.snapshot import snapshot_from_spec
from qmachina.settings import Settings, load_settings
from qmachina.specs.pipeline import default_configs_root, default_data_root
from qmachina.store import governance, live_sessions, modeling_sessions, serving_registry
from qmachina.store import repository as repo
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from qmachina.store.models import (
    AuditEvent,
    ResourceShare,
    ServingAlias,
    ServingAliasEvent,
    ServingVersion,
    WorkspaceMember,
)
from qmachina.temporal_names import (
    LIVE_TASK_QUEUE,
    MODELING_TASK_QUEUE,
    live_workflow_id,
    modeling_workflow_id,
)
from tests.live_server import BackgroundLoop, start_dev_server
from workflows.live_session import LiveIngestionSession, LiveSessionRequest
from workflows.modeling_session import ModelingSession, SessionRequest

SERVING_SPEC = "serving/derivative_baseline.yaml"
"""The spec of acme's serving version (the stack reads the shipped configs)."""
SERVING_ALIAS = "prod"


@dataclass
class World:
    acme_id: str
    globex_id: str
    shared_job: str
    private_job: str
    point_hash: str
    version_id: str
    """acme's serving version, which its alias ``prod`` points at."""
    session_id: str
    """acme's modeling session, nothing committed yet."""
    live_session_id: str = ""
    """acme's live session (its ingestion never runs: no worker has the activity)."""


class AccessStack(BackgroundLoop):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.store_url = default_sqlite_url(data_dir)
        super().__init__("access-stack")

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": self.data_dir,
            "database_url": self.store_url,
            "temporal_address": self.temporal_address,
        }
        return load_settings(**(values | overrides))

    async def start(self) -> None:
        await bootstrap_store(self.store_url)
        env = await self.resources.enter_async_context(await start_dev_server())
        self.temporal_address = env.client.service_client.config.target_host
        engine = create_store_engine(self.store_url)
        self.resources.push_async_callback(engine.dispose)
        self.sessions = session_factory(engine)
        await self.resources.enter_async_context(
            Worker(
                env.client,
                task_queue=MODELING_TASK_QUEUE,
                workflows=[ModelingSession, LiveIngestionSession],
            )
        )
        self.world = await self._populate()
        session_id = await self._open_session(env.client)
        live_session_id = await self._start_live_session(env.client)
        self.world = replace(self.world, session_id=session_id, live_session_id=live_session_id)
        self.base_url = await self.serve(create_app(self.settings()))

    async def _open_session(self, client: Client) -> str:
        session_id = str(uuid.uuid4())
        workflow_id = modeling_workflow_id(self.world.acme_id, session_id)
        async with self.sessions.begin() as session:
            await modeling_sessions.create_session(
                session,
                self.world.acme_id,
                session_id=session_id,
                title="access",
                created_by="eddie",
                workflow_id=workflow_id,
            )
        roots = str(self.data_dir)
        request = SessionRequest(
            self.world.acme_id, session_id, "eddie", roots, roots, roots, roots, roots
        )
        await client.start_workflow(
            ModelingSession.run, request, id=workflow_id, task_queue=MODELING_TASK_QUEUE
        )
        return session_id

    async def _start_live_session(self, client: Client) -> str:
        session_id = str(uuid.uuid4())
        workflow_id = live_workflow_id(self.world.acme_id, session_id)
        async with self.sessions.begin() as session:
            await live_sessions.create_session(
                session,
                self.world.acme_id,
                session_id=session_id,
                dataset="GLBX.MDP3",
                subscription={"symbols": ["ESH4"], "stype_in": "raw_symbol", "schema": "mbo"},
                created_by="eddie",
                workflow_id=workflow_id,
            )
        request = LiveSessionRequest(
            self.world.acme_id, session_id, "eddie", "GLBX.MDP3", ["ESH4"], str(self.data_dir)
        )
        await client.start_workflow(
            LiveIngestionSession.run, request, id=workflow_id, task_queue=LIVE_TASK_QUEUE
        )
        return session_id

    async def _populate(self) -> World:
        async with self.sessions.begin() as session:
            acme = await governance.create_owned_workspace(session, "acme", "Acme", "olivia")
            for subject, role in (("adam", "admin"), ("eddie", "editor"), ("vera", "viewer")):
                await governance.set_member_role(session, acme.id, subject, role)
            globex = await governance.create_owned_workspace(session, "globex", "Globex", "wendy")
            await governance.set_member_role(session, globex.id, "gvera", "viewer")
            jobs = []
            for name in ("shared", "private"):
                job = await repo.create_job(session, acme.id, name, "0" * 64)
                await repo.set_job_status(session, acme.id, job.id, "failed", error="test")
                await repo.append_job_event(
                    session, acme.id, job.id, "sweep_finished", {"state": "failed"}
                )
                jobs.append(job.id)
            await repo.record_run(
                session,
                acme.id,
                jobs[0],
                "a" * 64,
                params={"x": 1},
                metrics={"train": {"total_pnl_ticks": 1.0}},
                status="succeeded",
                spec_hashes={},
            )
            await governance.share_resource(session, acme.id, "experiment_job", jobs[0], globex.id)
            snapshot = snapshot_from_spec(
                SERVING_SPEC, configs_root=default_configs_root(), data_root=default_data_root()
            )
            await serving_registry.register_version(session, acme.id, snapshot, actor="eddie")
            await serving_registry.repoint_alias(
                session, acme.id, SERVING_ALIAS, snapshot.version_id, "eddie", "first activation"
            )
        return World(acme.id, globex.id, jobs[0], jobs[1], "a" * 64, snapshot.version_id, "")

    async def fingerprint(self) -> tuple[int, ...]:
        """Rows a refused request must not add: audit events, members, shares, serving
        versions, aliases and their history."""
        tables = (
            AuditEvent,
            WorkspaceMember,
            ResourceShare,
            ServingVersion,
            ServingAlias,
            ServingAliasEvent,
        )
        async with self.sessions() as session:
            counts = [
                await session.scalar(sa.select(sa.func.count()).select_from(table))
                for table in tables
            ]
        return tuple(int(count or 0) for count in counts)
