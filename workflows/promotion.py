"""Promotion: a serving version put behind an alias only after it passed its preflight, and, when
asked for, a person's approval.

1. ``preflight`` (an activity) checks the version: its spec valid under today's strict rules, its
   lineage complete, every dataset file present with the checksum the version recorded, the run
   it came from meeting the thresholds given, and its snapshot schema one this code serves. A
   failure ends the promotion ``rejected`` with the reasons; nothing is written.
2. With ``require_approval``, the workflow waits for the ``decide`` update. Its validator refuses,
   before anything enters history, a decision when none is awaited, and a decision by someone not
   allowed to approve (the API checks the approver's relation before it sends the update; the
   validator holds the requester to the four-eyes rule).
3. ``repoint`` (an activity) moves the alias to the version in one store transaction with its
   history row and audit event, and the promotion ends ``promoted``.

The ``status`` query reports the state, the preflight's findings and the decision. This module
holds the workflow and its input/output types; the activities import them, and the workflow
knows the activities only by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from temporalio import workflow
from temporalio.common import RetryPolicy

PREFLIGHT = "preflight_promotion"
REPOINT = "repoint_alias"

PromotionState = Literal["preflight", "awaiting_approval", "repointing", "promoted", "rejected"]


@dataclass(frozen=True)
class PromotionRequest:
    """Put ``version_id`` behind ``alias`` in the workspace, as ``actor`` asked for ``reason``.

    ``thresholds`` maps a metric path of the run the version came from (``test.hit_rate``) to
    the least value it must have; a version with no run fails any threshold given.
    """

    workspace_id: str
    alias: str
    version_id: str
    actor: str
    reason: str
    configs_root: str
    data_root: str
    thresholds: dict[str, float] = field(default_factory=dict)
    require_approval: bool = False


@dataclass(frozen=True)
class PreflightReport:
    """What the preflight found; ``failures`` empty means the version may be promoted."""

    failures: list[str]
    checks: list[str]
    """Every check that ran, in order, failed or not."""


@dataclass(frozen=True)
class Decision:
    """A person's approval or refusal of a promotion awaiting it."""

    approver: str
    approve: bool
    note: str = ""


@dataclass(frozen=True)
class RepointRequest:
    workspace_id: str
    alias: str
    version_id: str
    actor: str
    reason: str
    promotion_id: str


@dataclass(frozen=True)
class RepointResult:
    previous_version_id: str | None


@dataclass(frozen=True)
class PromotionStatus:
    state: PromotionState
    alias: str
    version_id: str
    failures: list[str]
    checks: list[str]
    decision: Decision | None = None
    previous_version_id: str | None = None


@workflow.defn
class Promotion:
    def __init__(self) -> None:
        self._request: PromotionRequest | None = None
        self._state: PromotionState = "preflight"
        self._report = PreflightReport(failures=[], checks=[])
        self._decision: Decision | None = None
        self._previous: str | None = None

    @workflow.run
    async def run(self, request: PromotionRequest) -> PromotionStatus:
        self._request = request
        retry = RetryPolicy(maximum_attempts=5, non_retryable_error_types=["PromotionError"])
        self._report = await workflow.execute_activity(
            PREFLIGHT,
            request,
            result_type=PreflightReport,
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=retry,
        )
        if self._report.failures:
            self._state = "rejected"
            return self.status()
        if request.require_approval:
            self._state = "awaiting_approval"
            await workflow.wait_condition(lambda: self._decision is not None)
            assert self._decision is not None
            if not self._decision.approve:
                self._state = "rejected"
                return self.status()
        self._state = "repointing"
        promotion_id = workflow.info().workflow_id
        approval = "" if self._decision is None else f", approved by {self._decision.approver}"
        result = await workflow.execute_activity(
            REPOINT,
            RepointRequest(
                request.workspace_id,
                request.alias,
                request.version_id,
                request.actor,
                f"{request.reason} (promotion {promotion_id}{approval})",
                promotion_id,
            ),
            result_type=RepointResult,
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=retry,
        )
        self._previous = result.previous_version_id
        self._state = "promoted"
        return self.status()

    @workflow.update
    async def decide(self, decision: Decision) -> PromotionStatus:
        self._decision = decision
        return self.status()

    @decide.validator
    def _decision_is_due(self, decision: Decision) -> None:
        if self._state != "awaiting_approval" or self._decision is not None:
            raise ValueError(f"the promotion is {self._state}: no decision is awaited")
        if not decision.approver:
            raise ValueError("a decision names its approver")
        if self._request is not None and decision.approver == self._request.actor:
            raise ValueError(
                f"{decision.approver!r} asked for this promotion and cannot also approve it"
            )

    @workflow.query
    def status(self) -> PromotionStatus:
        request = self._request
        return PromotionStatus(
            state=self._state,
            alias="" if request is None else request.alias,
            version_id="" if request is None else request.version_id,
            failures=list(self._report.failures),
            checks=list(self._report.checks),
            decision=self._decision,
            previous_version_id=self._previous,
        )
