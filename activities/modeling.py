"""The ModelingSession workflow's activities: prepare an execution (write the model's spec chain,
create the sweep's job) and register the run a session promotes as a serving version.

Both are safe to retry: an execution's spec chain is written to a directory of its own revision
(same sections, same bytes) and its job has an id derived from the session and revision, so a
retry finds the job it created; registering the same snapshot twice gives the same version.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from qmachina.experiment_archive import ExperimentArchive
from qmachina.modeling.draft import MODEL_FILES, materialize
from qmachina.serving.snapshot import LineageError, RunSource, ServingSnapshot, snapshot_from_run
from qmachina.specs.errors import SpecError
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.identity import spec_hash
from qmachina.store import governance
from qmachina.store import repository as repo
from qmachina.store import serving_registry as registry
from qmachina.store.models import Workspace
from qmachina.validate_configs import validate_experiment
from workflows.modeling_session import (
    PREPARE_EXECUTION,
    REGISTER_SESSION_VERSION,
    PreparedExecution,
    PrepareRequest,
    RegisteredVersion,
    RegisterRequest,
)

_JOB_IDS = uuid.UUID("6f1d3c52-5b0e-4f7e-9a57-2f0c1d6a9e41")
"""Namespace of the job ids derived from a session and an execution revision."""


def execution_job_id(session_id: str, revision: int) -> str:
    """The id of the sweep job of a session's execution ``revision``."""
    return str(uuid.uuid5(_JOB_IDS, f"{session_id}/r{revision}"))


def execution_root(sessions_root: Path, session_id: str, revision: int) -> Path:
    """Where the spec chain of a session's execution ``revision`` is written."""
    return sessions_root / session_id / f"r{revision}"


def _write_chain(request: PrepareRequest) -> tuple[Path, ExperimentSpec]:
    """Write the chain and accept its experiment as a submission would (validated, archived by
    hash, so the jobs API reads the job's spec like any other)."""
    into = execution_root(Path(request.sessions_root), request.session_id, request.revision)
    materialize(request.sections, configs_root=Path(request.configs_root), into=into)
    accepted = ExperimentArchive(Path(request.archive_root)).accept_file(
        MODEL_FILES["experiment"], configs_root=into, data_root=Path(request.data_root)
    )
    return into, accepted.spec


def _refused(kind: str, message: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


async def _check_quotas(session: AsyncSession, workspace: Workspace) -> None:
    """The job quotas of the API's submissions, for a job the workflow creates: the workspace
    row is locked by the caller, so concurrent executions are counted one after the other."""
    if workspace.max_concurrent_jobs is not None:
        active = await governance.active_job_count(session, workspace.id)
        if active >= workspace.max_concurrent_jobs:
            raise _refused(
                "ExecutionRefused",
                f"workspace {workspace.slug!r} is at its max_concurrent_jobs quota "
                f"(limit {workspace.max_concurrent_jobs}, current use {active})",
            )
    if workspace.max_storage_bytes is not None:
        used = await governance.storage_used(session, workspace.id)
        if used >= workspace.max_storage_bytes:
            raise _refused(
                "ExecutionRefused",
                f"workspace {workspace.slug!r} is at its max_storage_bytes quota "
                f"(limit {workspace.max_storage_bytes}, current use {used})",
            )


class ModelingActivities:
    """Bound to the store the worker writes."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @activity.defn(name=PREPARE_EXECUTION)
    async def prepare_model_execution(self, request: PrepareRequest) -> PreparedExecution:
        """Write the chain, check it as a sweep would load it, and create the queued job within
        the workspace's quotas (audited as the session's actor)."""
        try:
            into, spec = await asyncio.to_thread(_write_chain, request)
        except SpecError as error:
            raise _refused("ExecutionRefused", f"the model does not validate: {error}") from None
        job_id = execution_job_id(request.session_id, request.revision)
        experiment_hash = spec_hash(spec)
        async with self._sessions.begin() as session:
            workspace = await governance.lock_workspace(session, request.workspace_id)
            try:
                await repo.get_job(session, request.workspace_id, job_id)
            except repo.JobNotFoundError:
                await _check_quotas(session, workspace)
                await repo.create_job(
                    session, request.workspace_id, spec.name, experiment_hash, job_id=job_id
                )
                facts = {
                    "experiment": MODEL_FILES["experiment"],
                    "spec_hash": experiment_hash,
                    "modeling_session": request.session_id,
                    "revision": request.revision,
                }
                await repo.append_job_event(
                    session, request.workspace_id, job_id, "job_submitted", facts
                )
                await repo.write_audit(
                    session,
                    request.workspace_id,
                    actor=request.actor,
                    action="experiment_job.submit",
                    target=job_id,
                    payload=facts,
                )
        limit = workspace.max_concurrent_chunks
        chunks = spec.parallelism.max_concurrent_chunks
        return PreparedExecution(
            job_id=job_id,
            configs_root=str(into),
            experiment=MODEL_FILES["experiment"],
            spec_hash=experiment_hash,
            max_concurrent_chunks=chunks if limit is None else min(chunks, limit),
        )

    @activity.defn(name=REGISTER_SESSION_VERSION)
    async def register_session_version(self, request: RegisterRequest) -> RegisteredVersion:
        """Register the chosen run (else the job's best) as a serving version whose lineage
        names the session."""
        async with self._sessions() as session:
            job = await repo.get_job(session, request.workspace_id, request.job_id)
            if request.point_hash is None:
                objective = await asyncio.to_thread(self._objective_of, request)
                leaders = await repo.list_runs(
                    session,
                    request.workspace_id,
                    job.id,
                    order_by=f"train.{objective}",
                    status="succeeded",
                    limit=1,
                )
                if not leaders:
                    raise _refused(
                        "RegistrationRefused", f"experiment job {job.id} has no succeeded run"
                    )
                run = leaders[0]
            else:
                try:
                    run = await repo.get_run(
                        session, request.workspace_id, job.id, request.point_hash
                    )
                except repo.StoreError as error:
                    raise _refused("RegistrationRefused", str(error)) from None
        source = RunSource(
            job.id,
            job.experiment_spec_hash,
            run.point_hash,
            run.params,
            run.spec_hashes,
            run.status,
        )
        try:
            snapshot = await asyncio.to_thread(self._snapshot, request, source)
        except (SpecError, LineageError) as error:
            raise _refused("RegistrationRefused", str(error)) from None
        async with self._sessions.begin() as session:
            registered = await registry.register_version(
                session, request.workspace_id, snapshot, actor=request.actor
            )
        return RegisteredVersion(registered.version.version_id, run.point_hash)

    @staticmethod
    def _objective_of(request: RegisterRequest) -> str:
        root = Path(request.configs_root)
        spec = validate_experiment(
            root / MODEL_FILES["experiment"], root=root, data_root=Path(request.data_root)
        )
        return spec.objective

    @staticmethod
    def _snapshot(request: RegisterRequest, source: RunSource) -> ServingSnapshot:
        root = Path(request.configs_root)
        experiment = validate_experiment(
            root / MODEL_FILES["experiment"], root=root, data_root=Path(request.data_root)
        )
        built = snapshot_from_run(
            source, experiment, configs_root=root, data_root=Path(request.data_root)
        )
        lineage = built.lineage.model_copy(update={"modeling_session_id": request.session_id})
        return ServingSnapshot.of(built.content, lineage)
