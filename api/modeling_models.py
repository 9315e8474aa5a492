"""Request and response models of ``/v1/modeling/sessions``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MODELING_PATH = "/v1/modeling/sessions"

Reason = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1800)]


class SessionStart(BaseModel):
    """Open a Create-a-Model session in the workspace."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"title": "ES VP"}]})

    title: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)] = ""


class StepCommitBody(BaseModel):
    """A step's payload. Steps 1-4 take a spec section, inline or as ``{"from_file": "..."}``
    (a shipped spec file relative to the configs root); step 5 takes ``{}`` (run the sweep);
    step 6 takes the decision (``promote`` with an alias, or ``abandon``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"payload": {"from_file": "pipelines/es_default.yaml"}},
                {
                    "payload": {
                        "decision": "promote",
                        "alias": "es-vp-prod",
                        "reason": "best training-span PnL",
                    }
                },
            ]
        },
    )

    payload: dict[str, Any] = Field(default_factory=dict)
    actor_type: Literal["user", "advisor"] = Field(
        default="user", description="`advisor` when an assistant commits for the caller"
    )


class StepReopenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason = ""


class ManualModelBody(BaseModel):
    """The whole model as YAML: top-level `pipeline`, `gold`, `serving` (without its pipeline
    and gold references) and `experiment` (without its serving reference)."""

    model_config = ConfigDict(extra="forbid")

    yaml: Annotated[str, StringConstraints(min_length=1, max_length=200_000)]
    actor_type: Literal["user", "advisor"] = "user"


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason = ""


class PreviewBody(BaseModel):
    """A candidate section to preview; absent, the committed one."""

    model_config = ConfigDict(extra="forbid")

    pipeline: dict[str, Any] | None = None
    gold: dict[str, Any] | None = None
    samples: Annotated[int, Field(ge=2, le=500, description="Silver: bins sampled")] = 20
    max_bins: Annotated[int, Field(ge=1, le=100_000, description="Gold: the first bins only")] = (
        6000
    )


class StepView(BaseModel):
    step: int
    name: str
    status: Literal["open", "committed", "locked", "running"]
    payload: dict[str, Any] | None = None
    committed_by: str | None = None
    committed_at: datetime | None = None


class ExecutionView(BaseModel):
    revision: int
    state: Literal["starting", "running", "succeeded", "failed", "canceled"]
    job_id: str
    error: str
    points_recorded: int
    points_failed: int
    progress: dict[str, Any] | None = Field(
        default=None, description="The sweep's live progress while it runs"
    )


class PromotionRecordView(BaseModel):
    alias: str
    version_id: str
    state: str
    failures: list[str]


class SessionView(BaseModel):
    id: str
    workspace: str
    title: str
    created_by: str
    created_at: datetime
    state: Literal[
        "designing", "executing", "analyzing", "completed", "promoting", "promoted", "abandoned"
    ]
    steps: list[StepView]
    next_step: int | None = Field(description="The step to commit next, if one can be")
    execution: ExecutionView | None
    promotion: PromotionRecordView | None
    decisions: int


class SessionSummary(BaseModel):
    id: str
    title: str
    created_by: str
    created_at: datetime


class SessionPage(BaseModel):
    items: list[SessionSummary]
    total: int


class DecisionView(BaseModel):
    seq: int
    step: int
    action: str
    actor: str
    actor_type: Literal["user", "advisor"]
    payload: dict[str, Any]
    at: datetime


class DecisionLog(BaseModel):
    """A session's decision log, oldest first."""

    entries: list[DecisionView]
