"""The Promotion workflow's activities: the preflight of a serving version, and the alias
repoint that ends a promotion.

The preflight writes nothing; every finding is returned as data, so a rejected promotion leaves
the store as it was. The repoint is one store transaction (alias row, history event, audit row).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from qmachina.experiment_run import metric_at
from qmachina.serving.snapshot import ServingSnapshot, UnservableSnapshotError, check_servable
from qmachina.silver_build import sha256_of
from qmachina.store import repository as repo
from qmachina.store import serving_registry as registry
from workflows.promotion import (
    PREFLIGHT,
    REPOINT,
    PreflightReport,
    PromotionRequest,
    RepointRequest,
    RepointResult,
)


def _data_findings(snapshot: ServingSnapshot, data_root: Path) -> list[str]:
    failures = []
    for dataset in snapshot.lineage.dataset_files:
        path = data_root / dataset.name
        if not path.is_file():
            failures.append(f"data: {dataset.name} is not in {data_root}")
        elif (actual := sha256_of(path)) != dataset.sha256:
            failures.append(
                f"data: {dataset.name} has sha256 {actual}, the version was registered with "
                f"{dataset.sha256}"
            )
    return failures


def _lineage_findings(snapshot: ServingSnapshot) -> list[str]:
    lineage = snapshot.lineage
    failures = []
    if not lineage.dataset_files:
        failures.append("lineage: no dataset file is recorded")
    if not lineage.code_version.package:
        failures.append("lineage: the code version is not recorded")
    if lineage.source == "experiment_run" and not (
        lineage.experiment_job_id and lineage.run_point_hash
    ):
        failures.append("lineage: the experiment job or run it came from is not recorded")
    return failures


class PromotionActivities:
    """Bound to the store the worker writes."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @activity.defn(name=PREFLIGHT)
    async def preflight_promotion(self, request: PromotionRequest) -> PreflightReport:
        """Every check, in order; a version that cannot even be read fails the rest."""
        checks = ["version", "spec", "lineage", "data", "thresholds"]
        async with self._sessions() as session:
            try:
                row = await registry.get_version(session, request.workspace_id, request.version_id)
            except registry.VersionNotFoundError as error:
                return PreflightReport([f"version: {error}"], checks[:1])
            stored = row.snapshot
        try:
            snapshot = ServingSnapshot.from_stored(stored)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            return PreflightReport(
                [
                    f"spec: the stored snapshot is not one this code serves "
                    f"({error.error_count()} problems; first at {where}: {first['msg']})"
                ],
                checks[:2],
            )
        failures: list[str] = []
        try:
            check_servable(snapshot)
        except UnservableSnapshotError as error:
            failures.append(f"spec: {error}")
        failures += _lineage_findings(snapshot)
        failures += await asyncio.to_thread(_data_findings, snapshot, Path(request.data_root))
        failures += await self._threshold_findings(request, snapshot)
        return PreflightReport(failures, checks)

    async def _threshold_findings(
        self, request: PromotionRequest, snapshot: ServingSnapshot
    ) -> list[str]:
        if not request.thresholds:
            return []
        lineage = snapshot.lineage
        if lineage.experiment_job_id is None or lineage.run_point_hash is None:
            return ["thresholds: the version comes from no experiment run to hold them to"]
        async with self._sessions() as session:
            try:
                run = await repo.get_run(
                    session, request.workspace_id, lineage.experiment_job_id, lineage.run_point_hash
                )
            except repo.StoreError as error:
                return [f"thresholds: {error}"]
        failures = []
        for path, least in sorted(request.thresholds.items()):
            value = metric_at(run.metrics, path)
            if value is None:
                failures.append(f"thresholds: the run has no metric {path}")
            elif value < least:
                failures.append(f"thresholds: {path} is {value}, below {least}")
        return failures

    @activity.defn(name=REPOINT)
    async def repoint_alias(self, request: RepointRequest) -> RepointResult:
        """Repoint the alias and say what it named before. A retry after a repoint that
        committed finds it done (repointing to the named version is a no-op) and reads the
        previous version from the alias's last event."""
        async with self._sessions.begin() as session:
            repoint = await registry.repoint_alias(
                session,
                request.workspace_id,
                request.alias,
                request.version_id,
                request.actor,
                request.reason,
            )
            if repoint.event is not None:
                return RepointResult(repoint.event.from_version_id)
            history = await registry.alias_history(session, request.workspace_id, request.alias)
        return RepointResult(history[-1].from_version_id if history else None)
