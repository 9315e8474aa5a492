"""What the serving routes do: register versions (from a serving spec or an experiment run),
read them, repoint and roll back aliases, and diff two versions.

A registration builds the snapshot only from a spec that passes the checks ``qmachina config
validate`` runs (a 422 naming every field otherwise, nothing written); the store checks it again
and keeps it once per content. Repoints go through
:func:`qmachina.store.serving_registry.repoint_alias`, which writes the alias, its history event
and the audit row in one transaction. The authorizer learns each new version's and alias's
``workspace`` tuple after the commit; the write is idempotent and repeated on every
registration and repoint, so a failed write is repaired by doing it again (or by ``qmachina
authz sync``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

from api.access import WorkspaceAccess
from api.dependencies import AppState, Sessions
from api.jobs_service import SweepRoots, sweep_roots
from api.problems import Issue, SpecRejectedError
from api.serving_models import SpecRegistration, VersionRegistration
from qmachina.authz.relationships import owned_by
from qmachina.serving.diff import SnapshotChange, diff_snapshots
from qmachina.serving.snapshot import (
    LineageError,
    RunSource,
    ServingSnapshot,
    snapshot_from_run,
    snapshot_from_spec,
)
from qmachina.specs.errors import SpecError, SpecIssue
from qmachina.store import repository as repo
from qmachina.store import serving_registry as registry
from qmachina.store.models import ServingAlias, ServingAliasEvent, ServingVersion, Workspace


@dataclass(frozen=True)
class VersionView:
    """A stored version, its snapshot read back, and the aliases pointing at it."""

    row: ServingVersion
    snapshot: ServingSnapshot
    aliases: list[str]


@dataclass(frozen=True)
class AliasView:
    """An alias, the model it serves, its history and where a rollback would take it."""

    alias: ServingAlias
    model_id: str
    history: list[ServingAliasEvent]
    rollback_to: str | None


@dataclass(frozen=True)
class DiffView:
    """Two resolved versions (with the alias each side named, if any) and their differences."""

    a: tuple[str, ServingVersion, str | None]
    b: tuple[str, ServingVersion, str | None]
    changes: list[SnapshotChange]


def _issue(issue: SpecIssue, configs: Path, spec: str | None) -> Issue:
    path = Path(issue.file)
    file = str(path.relative_to(configs)) if path.is_relative_to(configs) else issue.file
    field = issue.field or ("spec" if file == spec else "")
    return Issue(field=field, message=issue.message, file=file, line=issue.line)


def _rejected(error: SpecError, roots: SweepRoots, spec: str | None) -> SpecRejectedError:
    return SpecRejectedError(
        [_issue(issue, roots.configs, spec) for issue in error.issues], what="serving spec"
    )


def _aliases_of(aliases: Sequence[ServingAlias]) -> dict[str, list[str]]:
    pointing: dict[str, list[str]] = {}
    for alias in aliases:
        pointing.setdefault(alias.version_id, []).append(alias.name)
    return pointing


def _view(row: ServingVersion, aliases: dict[str, list[str]]) -> VersionView:
    return VersionView(
        row, ServingSnapshot.from_stored(row.snapshot), aliases.get(row.version_id, [])
    )


async def _snapshot_of(
    state: AppState, roots: SweepRoots, workspace: Workspace, registration: VersionRegistration
) -> ServingSnapshot:
    """The snapshot to register, built from files in a worker thread (specs are read and
    dataset files hashed)."""
    source = registration.root
    if isinstance(source, SpecRegistration):
        spec = source.spec
        try:
            return await asyncio.to_thread(
                snapshot_from_spec, spec, configs_root=roots.configs, data_root=roots.data
            )
        except SpecError as error:
            raise _rejected(error, roots, spec) from None
    async with state.sessions() as session:
        run = await registry.find_run(session, workspace.id, source.job_id, source.point_hash)
        job = await repo.get_job(session, workspace.id, source.job_id)
    experiment = await asyncio.to_thread(roots.archive.load, job.experiment_spec_hash)
    if experiment is None:
        raise LineageError(
            f"the experiment spec of job {job.id} (hash {job.experiment_spec_hash}) is not in "
            f"the archive {roots.archive.root}"
        )
    recorded = RunSource(
        job.id, job.experiment_spec_hash, run.point_hash, run.params, run.spec_hashes, run.status
    )
    try:
        return await asyncio.to_thread(
            snapshot_from_run,
            recorded,
            experiment,
            configs_root=roots.configs,
            data_root=roots.data,
        )
    except SpecError as error:
        raise _rejected(error, roots, None) from None


async def register_version(
    state: AppState, access: WorkspaceAccess, registration: VersionRegistration
) -> tuple[VersionView, bool]:
    """Build, check and store the snapshot (audited as the caller, the first time only); the
    version and whether this call created it."""
    roots = sweep_roots(state.settings)
    snapshot = await _snapshot_of(state, roots, access.workspace, registration)
    workspace_id = access.workspace.id
    async with state.sessions.begin() as session:
        registered = await registry.register_version(
            session, workspace_id, snapshot, actor=access.principal.subject
        )
        aliases = _aliases_of(await registry.list_aliases(session, workspace_id))
    await state.authorizer.write_tuples(
        [owned_by(workspace_id, "serving_version", registered.version.id)]
    )
    return _view(registered.version, aliases), registered.created


async def versions_page(
    sessions: Sessions, workspace: Workspace, *, limit: int, offset: int
) -> tuple[list[VersionView], int]:
    """A page of the workspace's versions, newest first, and how many there are."""
    async with sessions() as session:
        rows = await registry.list_versions(session, workspace.id, limit=limit, offset=offset)
        total = await registry.count_versions(session, workspace.id)
        aliases = _aliases_of(await registry.list_aliases(session, workspace.id))
    return [_view(row, aliases) for row in rows], total


async def version(sessions: Sessions, workspace: Workspace, ref: str) -> VersionView:
    """The version named by its id or a unique prefix of it."""
    async with sessions() as session:
        row = await registry.find_version(session, workspace.id, ref)
        aliases = _aliases_of(await registry.list_aliases(session, workspace.id))
    return _view(row, aliases)


async def _alias_view(session: AsyncSession, workspace_id: str, name: str) -> AliasView:
    alias = await registry.get_alias(session, workspace_id, name)
    history = await registry.alias_history(session, workspace_id, name)
    target = await registry.get_version(session, workspace_id, alias.version_id)
    return AliasView(alias, target.model_id, history, registry.rollback_target(history))


async def alias(sessions: Sessions, workspace: Workspace, name: str) -> AliasView:
    """The alias with its history."""
    async with sessions() as session:
        return await _alias_view(session, workspace.id, name)


async def aliases(sessions: Sessions, workspace: Workspace) -> list[tuple[ServingAlias, str]]:
    """The workspace's aliases, by name, each with the model it serves."""
    async with sessions() as session:
        found = await registry.list_aliases(session, workspace.id)
        models = {
            row.version_id: row.model_id
            for row in await registry.list_versions(session, workspace.id)
        }
    return [(alias, models[alias.version_id]) for alias in found]


async def repoint(
    state: AppState, access: WorkspaceAccess, name: str, version_ref: str, reason: str
) -> tuple[AliasView, bool]:
    """Point the alias at the version (creating the alias on first use), audited as the
    caller; the alias and whether anything changed."""
    workspace_id = access.workspace.id
    async with state.sessions.begin() as session:
        target = await registry.find_version(session, workspace_id, version_ref)
        moved = await registry.repoint_alias(
            session, workspace_id, name, target.version_id, access.principal.subject, reason
        )
        view = await _alias_view(session, workspace_id, name)
    await state.authorizer.write_tuples([owned_by(workspace_id, "serving_alias", moved.alias.id)])
    return view, moved.event is not None


async def rollback(state: AppState, access: WorkspaceAccess, name: str, reason: str) -> AliasView:
    """Repoint the alias at the version before its latest activation, audited as the caller."""
    workspace_id = access.workspace.id
    async with state.sessions.begin() as session:
        await registry.rollback_alias(session, workspace_id, name, access.principal.subject, reason)
        return await _alias_view(session, workspace_id, name)


async def diff(sessions: Sessions, workspace: Workspace, a: str, b: str) -> DiffView:
    """The differences between the versions ``a`` and ``b`` name (ids, prefixes or aliases)."""
    async with sessions() as session:
        version_a, alias_a = await registry.resolve_reference(session, workspace.id, a)
        version_b, alias_b = await registry.resolve_reference(session, workspace.id, b)
    changes = diff_snapshots(
        ServingSnapshot.from_stored(version_a.snapshot),
        ServingSnapshot.from_stored(version_b.snapshot),
    )
    return DiffView((a, version_a, alias_a), (b, version_b, alias_b), changes)
