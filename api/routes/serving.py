"""``/v1/serving``: register immutable serving versions, read them, point aliases at them
(activation and rollback are repoints, each audited with its reason), and diff two of them.

Every route acts in the workspace named by ``?workspace=``: viewers read, editors register
versions and repoint aliases (``can_mutate`` on the workspace). A version or alias of another
workspace is a 404, like one that does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response, status

from api import serving_service
from api.access import InWorkspace, WorkspaceAccess
from api.bounds import Limit, Offset
from api.dependencies import State
from api.problems import problem_responses
from api.serving_models import (
    SERVING_PATH,
    AliasChange,
    AliasDetail,
    AliasEvent,
    AliasList,
    AliasRepoint,
    AliasRollback,
    DiffEntry,
    DiffSide,
    RegisteredVersion,
    ServingAlias,
    ServingVersion,
    ServingVersionDetail,
    SnapshotDiff,
    VersionList,
    VersionRegistration,
)
from qmachina.store import models as store

router = APIRouter(prefix=SERVING_PATH, tags=["serving"])

Reader = Annotated[WorkspaceAccess, Depends(InWorkspace("can_read"))]
Editor = Annotated[WorkspaceAccess, Depends(InWorkspace("can_mutate"))]
VersionRefPath = Annotated[
    str,
    Path(
        pattern=r"^[0-9a-f]{8,64}$",
        description="A version id, or a unique prefix of it of at least 8 characters",
    ),
]
AliasPath = Annotated[
    str,
    Path(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="The alias: lowercase letters, digits, `.`, `_` and `-`",
    ),
]
DiffRef = Annotated[
    str,
    Query(
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="A version id, a unique prefix of one (8 characters or more), or an alias",
    ),
]


def _version_fields(view: serving_service.VersionView) -> dict[str, Any]:
    lineage = view.snapshot.lineage
    return {
        "version_id": view.row.version_id,
        "model_id": view.row.model_id,
        "source": lineage.source,
        "spec_file": lineage.spec_file,
        "experiment_job_id": lineage.experiment_job_id,
        "run_point_hash": lineage.run_point_hash,
        "code_version": lineage.code_version,
        "registered_by": view.row.registered_by,
        "created_at": view.row.created_at,
        "aliases": view.aliases,
    }


def _alias_fields(alias: store.ServingAlias, model_id: str) -> dict[str, Any]:
    return {
        "name": alias.name,
        "version_id": alias.version_id,
        "model_id": model_id,
        "created_at": alias.created_at,
        "updated_at": alias.updated_at,
    }


def _alias_detail(view: serving_service.AliasView) -> dict[str, Any]:
    return {
        **_alias_fields(view.alias, view.model_id),
        "history": [
            AliasEvent(
                seq=event.seq,
                kind="rollback" if event.kind == "rollback" else "set",
                from_version_id=event.from_version_id,
                to_version_id=event.to_version_id,
                actor=event.actor,
                reason=event.reason,
                at=event.created_at,
            )
            for event in view.history
        ],
        "rollback_to": view.rollback_to,
    }


@router.post(
    "/versions",
    status_code=status.HTTP_201_CREATED,
    response_model=RegisteredVersion,
    responses={
        status.HTTP_200_OK: {
            "model": RegisteredVersion,
            "description": "The same content was registered before: the stored version",
        },
        **problem_responses(403, 404, 409, 422),
    },
)
async def register_serving_version(
    registration: VersionRegistration, state: State, access: Editor, response: Response
) -> RegisteredVersion:
    """Register a serving version from a serving spec file (``spec``) or from an experiment
    run of the workspace (``job_id`` and ``point_hash``: the job's serving spec with the run's
    signal parameters and threshold). The spec must pass the checks of ``qmachina config
    validate``: a bad one answers 422 naming every field, with nothing registered; a spec file
    that is not under the configs root, like an unknown job or run, is a 404. 201 with the new
    version; 200 when the same content was registered before (nothing written). 409 when the run
    cannot be served as recorded (it failed, or its specs changed since it ran). Needs
    ``can_mutate`` on the workspace (editors and above)."""
    view, created = await serving_service.register_version(state, access, registration)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"{SERVING_PATH}/versions/{view.row.version_id}"
    return RegisteredVersion.model_validate(
        _version_fields(view) | {"snapshot": view.snapshot, "created": created}
    )


@router.get("/versions", response_model=VersionList, responses=problem_responses(404, 422))
async def list_serving_versions(
    state: State,
    access: Reader,
    limit: Limit = 100,
    offset: Offset = 0,
) -> VersionList:
    """The workspace's serving versions, newest first, with the aliases pointing at each."""
    views, total = await serving_service.versions_page(
        state.sessions, access.workspace, limit=limit, offset=offset
    )
    return VersionList(
        total=total,
        limit=limit,
        offset=offset,
        versions=[ServingVersion.model_validate(_version_fields(view)) for view in views],
    )


@router.get(
    "/versions/{version_id}",
    response_model=ServingVersionDetail,
    responses=problem_responses(404, 409, 422),
)
async def get_serving_version(
    version_id: VersionRefPath, state: State, access: Reader
) -> ServingVersionDetail:
    """The version with its full snapshot: resolved pipeline, gold spec and hash, signal and
    parameters, scoring, stream schema, instrument and lineage. 409 for an ambiguous prefix."""
    view = await serving_service.version(state.sessions, access.workspace, version_id)
    return ServingVersionDetail.model_validate(_version_fields(view) | {"snapshot": view.snapshot})


@router.get("/aliases", response_model=AliasList, responses=problem_responses(404, 422))
async def list_serving_aliases(state: State, access: Reader) -> AliasList:
    """The workspace's aliases, by name, with the version each points at."""
    found = await serving_service.aliases(state.sessions, access.workspace)
    return AliasList(
        aliases=[
            ServingAlias.model_validate(_alias_fields(alias, model_id)) for alias, model_id in found
        ]
    )


@router.get("/aliases/{alias}", response_model=AliasDetail, responses=problem_responses(404, 422))
async def get_serving_alias(alias: AliasPath, state: State, access: Reader) -> AliasDetail:
    """The alias, the version it points at, and its history of repoints (actor, reason, from,
    to, at), oldest first."""
    view = await serving_service.alias(state.sessions, access.workspace, alias)
    return AliasDetail.model_validate(_alias_detail(view))


@router.put(
    "/aliases/{alias}",
    response_model=AliasChange,
    responses=problem_responses(403, 404, 409, 422),
)
async def repoint_serving_alias(
    alias: AliasPath, body: AliasRepoint, state: State, access: Editor
) -> AliasChange:
    """Point the alias at a version of the workspace, creating the alias on first use: one
    history event and one audit row (actor, reason, from, to). Pointing it at the version it
    already names changes nothing (``changed`` is false). 404 for a version the workspace does
    not hold, 409 for an ambiguous prefix. Needs ``can_mutate`` on the workspace."""
    view, changed = await serving_service.repoint(
        state, access, alias, body.version_id, body.reason
    )
    return AliasChange.model_validate(_alias_detail(view) | {"changed": changed})


@router.post(
    "/aliases/{alias}/rollback",
    response_model=AliasChange,
    responses=problem_responses(403, 404, 409, 422),
)
async def roll_back_serving_alias(
    alias: AliasPath, body: AliasRollback, state: State, access: Editor
) -> AliasChange:
    """Repoint the alias at the version active before its latest activation not yet rolled
    back (``rollback_to``), recorded and audited as a rollback. 409 when there is none. Needs
    ``can_mutate`` on the workspace."""
    view = await serving_service.rollback(state, access, alias, body.reason)
    return AliasChange.model_validate(_alias_detail(view) | {"changed": True})


@router.get("/diff", response_model=SnapshotDiff, responses=problem_responses(404, 409, 422))
async def diff_serving_versions(
    a: DiffRef, b: DiffRef, state: State, access: Reader
) -> SnapshotDiff:
    """Every difference between the snapshots of two versions (each named by its id, a unique
    prefix of it, or an alias): content and lineage, one entry per path."""
    found = await serving_service.diff(state.sessions, access.workspace, a, b)
    sides = [
        DiffSide(ref=ref, version_id=version.version_id, alias=alias)
        for ref, version, alias in (found.a, found.b)
    ]
    return SnapshotDiff(
        a=sides[0],
        b=sides[1],
        identical=not found.changes,
        changes=[
            DiffEntry(path=change.path, change=change.change, a=change.a, b=change.b)
            for change in found.changes
        ],
    )
