"""Request and response models of the serving registry API: versions, aliases with their
history, and snapshot diffs, as the OpenAPI document declares them.

A version's snapshot is :class:`qmachina.serving.snapshot.ServingSnapshot` itself, so its schema
is that of the specs it holds, defined once."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints

from qmachina.serving.snapshot import CodeVersion, ServingSnapshot
from qmachina.store.serving_registry import MAX_REASON_CHARS

SERVING_PATH = "/v1/serving"

VersionRef = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8,64}$")]
"""A version id, or a unique prefix of it of at least 8 characters."""
Reason = Annotated[
    str,
    # Something besides blanks (the store's own rule, spelt out so every regex engine agrees),
    # and no NUL, which PostgreSQL text cannot hold.
    StringConstraints(
        min_length=1,
        max_length=MAX_REASON_CHARS,
        pattern=r"^[^\x00]*[^ \t\n\r\x0b\x0c\x00][^\x00]*$",
    ),
]
Source = Literal["serving_spec", "experiment_run"]
AliasEventKind = Literal["set", "rollback"]
DiffChange = Literal["changed", "added", "removed", "reordered"]


class SpecRegistration(BaseModel):
    """Register the serving spec in a file under the configs root."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"spec": "serving/derivative_baseline.yaml"}]},
    )

    spec: str = Field(
        min_length=1,
        max_length=1000,
        description="A ServingSpec file, relative to the configs root (404 when there is none)",
        examples=["serving/derivative_baseline.yaml"],
    )


class RunRegistration(BaseModel):
    """Register an experiment run of the workspace: the job's serving spec with the run's
    signal parameters and threshold, its lineage naming the job and the run."""

    model_config = ConfigDict(extra="forbid", strict=True)

    job_id: str = Field(pattern=r"^[0-9a-fA-F-]{1,36}$", description="The experiment job's id")
    point_hash: str = Field(
        pattern=r"^[0-9a-f]{8,64}$",
        description="The run's point hash, or a unique prefix of it of at least 8 characters",
    )


class VersionRegistration(RootModel[SpecRegistration | RunRegistration]):
    """What to register: a serving spec file (``spec``), or an experiment run (``job_id`` and
    ``point_hash``)."""


class ServingVersion(BaseModel):
    """A serving version as listed."""

    version_id: str = Field(description="sha256 of the snapshot's content")
    model_id: str
    source: Source
    spec_file: str = Field(description="The serving spec file it was read from")
    experiment_job_id: str | None
    run_point_hash: str | None
    code_version: CodeVersion = Field(description="The qMachina that registered it first")
    registered_by: str = Field(description="The subject who registered it first")
    created_at: datetime
    aliases: list[str] = Field(description="The workspace's aliases pointing at it")


class ServingVersionDetail(ServingVersion):
    """A serving version with its full snapshot."""

    snapshot: ServingSnapshot


class RegisteredVersion(ServingVersionDetail):
    """The answer to a registration."""

    created: bool = Field(description="False when the same content was registered before")


class VersionList(BaseModel):
    """One page of the workspace's versions, newest first."""

    total: int
    limit: int
    offset: int
    versions: list[ServingVersion]


class AliasRepoint(BaseModel):
    """The version an alias is to name, and why."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"version_id": "6bd1b2c4c555efdf", "reason": "promote the baseline"}]
        },
    )

    version_id: VersionRef
    reason: Reason


class AliasRollback(BaseModel):
    """Why the alias is rolled back."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"reason": "PnL drift after the last promotion"}]},
    )

    reason: Reason


class AliasEvent(BaseModel):
    """One repoint of an alias."""

    seq: int = Field(description="1, 2, ... per alias")
    kind: AliasEventKind
    from_version_id: str | None = Field(description="null when the repoint created the alias")
    to_version_id: str
    actor: str
    reason: str
    at: datetime


class ServingAlias(BaseModel):
    """An alias and the version it points at."""

    name: str
    version_id: str
    model_id: str
    created_at: datetime
    updated_at: datetime


class AliasList(BaseModel):
    """The workspace's aliases, by name."""

    aliases: list[ServingAlias]


class AliasDetail(ServingAlias):
    """An alias with its history, oldest first."""

    history: list[AliasEvent]
    rollback_to: str | None = Field(
        description="The version a rollback would repoint the alias to; null: none"
    )


class AliasChange(AliasDetail):
    """An alias after a repoint or rollback."""

    changed: bool = Field(
        description="False when the alias already named the version: nothing was recorded"
    )


class DiffSide(BaseModel):
    """One side of a diff as resolved."""

    ref: str = Field(description="As given: a version id, a prefix of one, or an alias")
    version_id: str
    alias: str | None = Field(description="The alias `ref` named, if it named one")


class DiffEntry(BaseModel):
    """One difference between the two snapshots."""

    path: str = Field(examples=["content.signal.params.k_ticks"])
    change: DiffChange
    a: Any = Field(default=None, description="The value in `a` (null when added)")
    b: Any = Field(default=None, description="The value in `b` (null when removed)")


class SnapshotDiff(BaseModel):
    """Every difference between two versions' content and lineage."""

    a: DiffSide
    b: DiffSide
    identical: bool
    changes: list[DiffEntry]
