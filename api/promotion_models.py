"""Request and response models of ``/v1/serving/promotions``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

PROMOTIONS_PATH = "/v1/serving/promotions"

AliasName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
VersionRef = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8,64}$")]
MetricPath = Annotated[str, StringConstraints(pattern=r"^(train|test)\.[a-z_][a-z0-9_]*$")]


class PromotionStart(BaseModel):
    """Put a registered version behind an alias, after its preflight."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "version": "3f9c2a1b",
                    "alias": "es-vp-prod",
                    "reason": "best test-span PnL of sweep 41",
                    "thresholds": {"test.hit_rate": 0.5},
                    "require_approval": True,
                }
            ]
        },
    )

    version: VersionRef = Field(description="A version id, or a unique prefix of 8+ characters")
    alias: AliasName
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1800)]
    thresholds: dict[MetricPath, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict,
        description="Least values of metrics of the run the version came from",
    )
    require_approval: bool = Field(
        default=False, description="Wait for another editor's decision before the repoint"
    )


class DecisionBody(BaseModel):
    """An editor's decision on a promotion awaiting approval."""

    model_config = ConfigDict(extra="forbid")

    approve: bool
    note: Annotated[str, StringConstraints(max_length=2000)] = ""


class PromotionDecision(BaseModel):
    approver: str
    approve: bool
    note: str


class PromotionView(BaseModel):
    """A promotion as its workflow reports it."""

    id: str = Field(description="The promotion's workflow id")
    alias: str
    version_id: str
    state: Literal["preflight", "awaiting_approval", "repointing", "promoted", "rejected"]
    checks: list[str] = Field(description="The preflight checks run so far, in order")
    failures: list[str] = Field(description="Why the preflight rejected the version")
    decision: PromotionDecision | None
    previous_version_id: str | None = Field(description="What the alias named before")
