"""Request and response models of the workspace API: workspaces, their members, quotas and
audit trail, as the OpenAPI document declares them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from api.bounds import MAX_EXACT_INTEGER, MAX_INT32

WORKSPACES_PATH = "/v1/workspaces"

Role = Literal["owner", "admin", "editor", "viewer"]
"""The roles of ``qmachina/authz/model.fga``, widest first (the store's ``MEMBER_ROLES``)."""
NewWorkspaceSlug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]
CallerRole = Annotated[
    Role | None,
    Field(
        description="The caller's role in the workspace; null only when the authorizer grants "
        "access the store does not record (`qmachina authz sync` repairs it)"
    ),
]


class WorkspaceCreate(BaseModel):
    """A workspace to create; the caller becomes its owner."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"slug": "rates-desk", "name": "Rates"}]},
    )

    slug: NewWorkspaceSlug = Field(
        description="Lowercase letters, digits and `-`, at most 64 characters; unique"
    )
    name: str | None = Field(
        default=None, min_length=1, max_length=200, description="Default: the slug"
    )


class Workspace(BaseModel):
    """A workspace and the caller's role in it."""

    id: str
    slug: str
    name: str
    created_at: datetime
    role: CallerRole


class WorkspaceList(BaseModel):
    """The workspaces the caller may read, by slug."""

    workspaces: list[Workspace]


class QuotaState(BaseModel):
    """A quota's limit and what the workspace uses of it now."""

    limit: int | None = Field(description="null: unlimited; 0: nothing may be started")
    current: int


class WorkspaceQuotas(BaseModel):
    """The workspace's quotas with their current use, and its bound on concurrent chunks."""

    max_concurrent_jobs: QuotaState = Field(
        description="Experiment jobs queued or running at once; `current` counts them"
    )
    max_streams: QuotaState = Field(
        description="Serving streams open at once (`current`: those open in this API process)"
    )
    max_storage_bytes: QuotaState = Field(
        description="Bytes of lake artifacts the workspace's jobs reference; `current` sums "
        "the distinct files"
    )
    max_concurrent_chunks: int | None = Field(
        description="At most this many chunks of one sweep run at once (a sweep asking for "
        "more runs at this bound); null: each sweep's own parallelism"
    )


class WorkspaceDetail(Workspace):
    """A workspace, the caller's role, and its quotas with their current use."""

    quotas: WorkspaceQuotas


def json_integer(value: object) -> object:
    """Refuse what JSON Schema's ``integer`` refuses (``false``, ``"4"``) before pydantic's
    conversion, which then takes an integral number (``4`` or ``4.0``) and refuses ``4.5``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON integer")
    return value


# The bound first, the validator after it: so it wraps the bounded integer, and the OpenAPI
# document declares the bound as `minimum`.
QuotaLimit = Annotated[int, Ge(0), Le(MAX_INT32), BeforeValidator(json_integer)] | None
StorageLimit = Annotated[int, Ge(0), Le(MAX_EXACT_INTEGER), BeforeValidator(json_integer)] | None
ChunkBound = Annotated[int, Ge(1), Le(MAX_INT32), BeforeValidator(json_integer)] | None


class QuotaPatch(BaseModel):
    """The quotas to change; a field left out keeps its value, null makes it unlimited."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"max_concurrent_jobs": 4, "max_storage_bytes": None}]},
    )

    max_concurrent_jobs: QuotaLimit = Field(default=None, description="At least 0; null: none")
    max_streams: QuotaLimit = Field(default=None, description="At least 0; null: none")
    max_storage_bytes: StorageLimit = Field(default=None, description="At least 0; null: none")
    max_concurrent_chunks: ChunkBound = Field(
        default=None, description="At least 1; null: each sweep's own parallelism"
    )


class MemberRole(BaseModel):
    """The role to give a member."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"role": "editor"}]}
    )

    role: Role


class Member(BaseModel):
    """A principal's role in the workspace."""

    subject: str = Field(description="The member's OIDC subject")
    role: Role
    created_at: datetime
    updated_at: datetime


class MemberList(BaseModel):
    """The workspace's members, by subject."""

    members: list[Member]


class MemberChange(Member):
    """A member's role just set."""

    previous: Role | None = Field(description="The role held before; null for a new member")


class AuditEvent(BaseModel):
    """Who did what to which record of the workspace."""

    id: str
    actor: str = Field(description="The subject of the caller's token (or a qmachina command)")
    action: str = Field(examples=["workspace.member_set"])
    target: str = Field(examples=["user:alice"])
    payload: dict[str, Any]
    created_at: datetime


class AuditPage(BaseModel):
    """One page of the workspace's audit trail, newest first."""

    total: int = Field(description="Events matching the filters, on every page")
    limit: int
    offset: int
    events: list[AuditEvent]
