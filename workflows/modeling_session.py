"""ModelingSession: a model built in six gated steps, from data to promotion, durably.

1. ``dataset`` (the pipeline whose silver the model sees), 2. ``gold`` (the gold spec),
3. ``signal`` (the serving spec: signal, parameters, scoring, stream), 4. ``parameter_space``
(the experiment: sweep axes, TP/SL, cooldown, budget), 5. ``execution`` (the sweep, run as a
child ``ExperimentSweep``), 6. ``decision`` (promote a run behind an alias, or abandon).

Each step is committed with the ``commit`` update. Its validator refuses, before anything enters
history, a commit out of order, a payload that does not validate (every issue with its field
path), and a commit by someone the API did not find allowed to change the session (or, at step
6, by an advisor: people decide). The API runs the checks that need files (referenced specs,
data present) before it sends the update. ``reopen`` takes a committed step back, which
invalidates every step after it; ``commit_manual`` fills steps 1-4 from a whole model at once.

Committing step 5 starts the execution: an activity writes the model's spec chain and creates
the sweep's job, then the sweep runs as a child workflow whose progress the API reads from it.
``cancel_execution`` cancels it; step 5 completes when the sweep succeeds. Once step 6 is
committed with ``promote``, the ``promote`` update registers the chosen run as a serving version
(its lineage naming the session) and puts it behind the alias through the ``Promotion``
workflow; the session then ends ``promoted``. Every accepted commit, reopening, cancellation and
outcome is appended to the decision log. An idle session whose history grew long continues as
new, carrying its state.

This module holds the workflow and its input/output types; activities import both, and the
workflow knows the activities only by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from qmachina.modeling.draft import (
        SECTION_OF_STEP,
        STEP_NAMES,
        DecisionCommit,
        StepIssue,
        structural_issues,
    )
    from qmachina.temporal_names import (
        PROMOTION_JOB_KIND,
        PROMOTION_TASK_QUEUE,
        SWEEP_JOB_KIND,
        SWEEP_TASK_QUEUE,
        job_search_attributes,
        promotion_workflow_id,
        sweep_workflow_id,
    )
    from workflows.experiment_sweep import (
        ExperimentSource,
        ExperimentSweep,
        SweepOutcome,
        SweepRequest,
    )
    from workflows.promotion import Promotion, PromotionRequest, PromotionStatus

PREPARE_EXECUTION = "prepare_model_execution"
REGISTER_SESSION_VERSION = "register_session_version"

EXECUTION_STEP = 5
DECISION_STEP = 6
EDIT_PERMISSION = "can_mutate"
"""The relation on the session the API must have found before it sends a change."""

SessionState = Literal[
    "designing", "executing", "analyzing", "completed", "promoting", "promoted", "abandoned"
]
ExecutionState = Literal["starting", "running", "succeeded", "failed", "canceled"]
ActorType = Literal["user", "advisor"]


@dataclass(frozen=True)
class Actor:
    """Who asks for a change: a subject, whether a person or an advisor acting for one, and the
    relations the API found the subject holds on the session."""

    subject: str
    actor_type: ActorType = "user"
    granted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StepCommit:
    step: int
    payload: dict[str, Any]
    actor: Actor


@dataclass(frozen=True)
class ManualCommit:
    """A whole model (steps 1-4) given at once, the sections already expanded."""

    sections: dict[str, dict[str, Any]]
    actor: Actor


@dataclass(frozen=True)
class StepReopen:
    step: int
    actor: Actor
    reason: str = ""


@dataclass(frozen=True)
class ActorRequest:
    """A request that carries nothing but who makes it (cancel the execution, promote)."""

    actor: Actor
    reason: str = ""


@dataclass(frozen=True)
class DecisionEntry:
    """One line of the decision log."""

    seq: int
    step: int
    action: str
    """``commit``, ``reopen``, ``manual``, ``cancel``, ``execution``, ``promote``,
    ``promotion``."""
    actor: str
    actor_type: ActorType
    payload: dict[str, Any]
    at: str
    """ISO 8601, workflow time. Times are carried as text: a continued run decodes its carry
    inside the sandbox, where ``datetime`` is not the converter's own class."""


@dataclass(frozen=True)
class CommittedStep:
    step: int
    payload: dict[str, Any]
    committed_by: str
    committed_at: str
    """ISO 8601, workflow time."""


@dataclass(frozen=True)
class Execution:
    """The sweep of step 5: its job, its workflow and how it went."""

    revision: int
    state: ExecutionState
    job_id: str = ""
    sweep_workflow_id: str = ""
    configs_root: str = ""
    experiment: str = ""
    error: str = ""
    points_recorded: int = 0
    points_failed: int = 0


@dataclass(frozen=True)
class PromotionRecord:
    """The last promotion the session asked for, and how it ended."""

    alias: str
    version_id: str = ""
    workflow_id: str = ""
    state: str = "registering"
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SessionCarry:
    """What a session carries into its next run when it continues as new."""

    committed: list[CommittedStep]
    decisions: list[DecisionEntry]
    executions: int
    execution: Execution | None
    promotion: PromotionRecord | None
    state: SessionState


@dataclass(frozen=True)
class SessionRequest:
    """The workflow's input. The roots are the workers' paths (the API's, resolved);
    ``point_delay_seconds`` slows the sweep's points (tests of crashes and cancellation)."""

    workspace_id: str
    session_id: str
    created_by: str
    configs_root: str
    data_root: str
    lake_root: str
    sessions_root: str
    """Where each execution's spec chain is written: ``<root>/<session>/r<revision>``."""
    archive_root: str
    """The accepted experiment specs by hash (the jobs API reads a job's spec there)."""
    title: str = ""
    point_delay_seconds: float = 0.0
    history_events_limit: int = 10_000
    carry: SessionCarry | None = None


@dataclass(frozen=True)
class PrepareRequest:
    workspace_id: str
    session_id: str
    revision: int
    sections: dict[str, dict[str, Any]]
    configs_root: str
    data_root: str
    sessions_root: str
    archive_root: str
    actor: str


@dataclass(frozen=True)
class PreparedExecution:
    """The spec chain written and the sweep's job created (queued)."""

    job_id: str
    configs_root: str
    experiment: str
    spec_hash: str
    max_concurrent_chunks: int


@dataclass(frozen=True)
class RegisterRequest:
    workspace_id: str
    session_id: str
    job_id: str
    point_hash: str | None
    """The run to register; None: the job's best by its objective on the training span."""
    configs_root: str
    data_root: str
    actor: str


@dataclass(frozen=True)
class RegisteredVersion:
    version_id: str
    point_hash: str


@dataclass(frozen=True)
class StepView:
    step: int
    name: str
    status: Literal["open", "committed", "locked", "running"]
    """``open``: next to commit; ``locked``: an earlier step is not committed yet."""
    payload: dict[str, Any] | None = None
    committed_by: str | None = None
    committed_at: str | None = None


@dataclass(frozen=True)
class SessionStatus:
    session_id: str
    workspace_id: str
    title: str
    state: SessionState
    steps: list[StepView]
    next_step: int | None
    """The step to commit next; None when none can be (running, completed or ended)."""
    execution: Execution | None
    promotion: PromotionRecord | None
    decisions: int


RefusalKind = Literal["SessionConflict", "PayloadInvalid", "NotAllowed"]
"""Why an update was refused: the session's state or step order, the payload, the actor."""


def _refuse(message: str, kind: RefusalKind = "SessionConflict", *details: Any) -> ApplicationError:
    return ApplicationError(message, *details, type=kind, non_retryable=True)


def _invalid(step: int, issues: list[StepIssue]) -> ApplicationError:
    shown = "; ".join(f"{issue.field or 'payload'}: {issue.message}" for issue in issues)
    return _refuse(
        f"step {step} ({STEP_NAMES[step - 1]}) does not validate: {shown}",
        "PayloadInvalid",
        [{"step": issue.step, "field": issue.field, "message": issue.message} for issue in issues],
    )


@workflow.defn
class ModelingSession:
    def __init__(self) -> None:
        self._request: SessionRequest | None = None
        self._state: SessionState = "designing"
        self._committed: dict[int, CommittedStep] = {}
        self._decisions: list[DecisionEntry] = []
        self._executions = 0
        self._execution: Execution | None = None
        self._promotion: PromotionRecord | None = None
        self._promotion_due = False
        self._cancel_due = False

    # ------------------------------------------------------------------ the run

    @workflow.run
    async def run(self, request: SessionRequest) -> SessionStatus:
        self._request = request
        if request.carry is not None:
            self._restore(request.carry)
        while self._state not in ("promoted", "abandoned"):
            await workflow.wait_condition(
                lambda: (
                    self._execution_due()
                    or self._promotion_due
                    or self._state == "abandoned"
                    or self._history_long()
                )
            )
            if self._execution_due():
                await self._execute(request)
            elif self._promotion_due:
                await self._promote(request)
            elif self._state == "abandoned":
                break
            elif workflow.all_handlers_finished():
                workflow.continue_as_new(replace(request, carry=self._carry()))
            else:
                await workflow.wait_condition(workflow.all_handlers_finished)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.status()

    def _execution_due(self) -> bool:
        return EXECUTION_STEP in self._committed and self._execution is None

    def _history_long(self) -> bool:
        assert self._request is not None
        info = workflow.info()
        idle = self._state in ("designing", "analyzing", "completed")
        too_long = info.get_current_history_length() > self._request.history_events_limit
        return idle and (too_long or info.is_continue_as_new_suggested())

    async def _execute(self, request: SessionRequest) -> None:
        self._executions += 1
        revision = self._executions
        self._execution = Execution(revision=revision, state="starting")
        self._state = "executing"
        commit = self._committed[EXECUTION_STEP]
        try:
            prepared = await workflow.execute_activity(
                PREPARE_EXECUTION,
                PrepareRequest(
                    request.workspace_id,
                    request.session_id,
                    revision,
                    self._sections(),
                    request.configs_root,
                    request.data_root,
                    request.sessions_root,
                    request.archive_root,
                    commit.committed_by,
                ),
                result_type=PreparedExecution,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=RetryPolicy(
                    maximum_attempts=5, non_retryable_error_types=["ExecutionRefused"]
                ),
            )
        except ActivityError as error:  # the activity's failure, whatever its kind, ends the step
            self._end_execution("failed", error=_failure_text(error))
            return
        sweep_id = sweep_workflow_id(request.workspace_id, prepared.job_id)
        self._execution = replace(
            self._execution,
            state="running",
            job_id=prepared.job_id,
            sweep_workflow_id=sweep_id,
            configs_root=prepared.configs_root,
            experiment=prepared.experiment,
        )
        sweep = SweepRequest(
            request.workspace_id,
            prepared.job_id,
            ExperimentSource(
                prepared.experiment, prepared.configs_root, request.data_root, request.lake_root
            ),
            max_concurrent_chunks=prepared.max_concurrent_chunks,
            point_delay_seconds=request.point_delay_seconds,
        )
        try:
            handle = await workflow.start_child_workflow(
                ExperimentSweep.run,
                sweep,
                id=sweep_id,
                task_queue=SWEEP_TASK_QUEUE,
                search_attributes=job_search_attributes(
                    request.workspace_id, SWEEP_JOB_KIND, prepared.spec_hash
                ),
            )
            if self._cancel_due:
                await handle.signal(ExperimentSweep.cancel)
            outcome: SweepOutcome = await handle
        except ChildWorkflowError as error:
            self._end_execution("failed", error=_failure_text(error))
            return
        self._end_execution(
            "succeeded" if outcome.state == "succeeded" else outcome.state,
            recorded=outcome.points_recorded,
            failed=outcome.points_failed,
        )

    def _end_execution(
        self, state: ExecutionState, *, error: str = "", recorded: int = 0, failed: int = 0
    ) -> None:
        assert self._execution is not None
        self._cancel_due = False
        self._execution = replace(
            self._execution,
            state=state,
            error=error,
            points_recorded=recorded,
            points_failed=failed,
        )
        outcome: dict[str, Any] = {
            "state": state,
            "job_id": self._execution.job_id,
            "points_recorded": recorded,
            "points_failed": failed,
        }
        if error:
            outcome["error"] = error
        self._log(EXECUTION_STEP, "execution", Actor("qmachina"), outcome)
        if state == "succeeded":
            self._state = "analyzing"
        else:
            # Step 5 opens again: the design stands and can be run (or reopened) anew.
            del self._committed[EXECUTION_STEP]
            self._state = "designing"

    async def _promote(self, request: SessionRequest) -> None:
        self._promotion_due = False
        decision = DecisionCommit.model_validate(self._committed[DECISION_STEP].payload)
        execution = self._execution
        assert execution is not None
        assert decision.alias is not None
        actor = self._committed[DECISION_STEP].committed_by
        self._state = "promoting"
        self._promotion = PromotionRecord(alias=decision.alias)
        try:
            registered = await workflow.execute_activity(
                REGISTER_SESSION_VERSION,
                RegisterRequest(
                    request.workspace_id,
                    request.session_id,
                    execution.job_id,
                    decision.point_hash,
                    execution.configs_root,
                    request.data_root,
                    actor,
                ),
                result_type=RegisteredVersion,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=RetryPolicy(
                    maximum_attempts=5, non_retryable_error_types=["RegistrationRefused"]
                ),
            )
        except ActivityError as error:  # a refused registration leaves the session completed
            self._end_promotion("rejected", [_failure_text(error)])
            return
        promotion_id = promotion_workflow_id(request.workspace_id, decision.alias)
        self._promotion = replace(
            self._promotion, version_id=registered.version_id, workflow_id=promotion_id
        )
        try:
            result: PromotionStatus = await workflow.execute_child_workflow(
                Promotion.run,
                PromotionRequest(
                    workspace_id=request.workspace_id,
                    alias=decision.alias,
                    version_id=registered.version_id,
                    actor=actor,
                    reason=f"{decision.reason} (modeling session {request.session_id})",
                    configs_root=execution.configs_root,
                    data_root=request.data_root,
                    thresholds=dict(decision.thresholds),
                    require_approval=decision.require_approval,
                ),
                id=promotion_id,
                task_queue=PROMOTION_TASK_QUEUE,
                search_attributes=job_search_attributes(
                    request.workspace_id, PROMOTION_JOB_KIND, registered.version_id
                ),
            )
        except ChildWorkflowError as error:
            self._end_promotion("failed", [_failure_text(error)])
            return
        self._end_promotion(result.state, list(result.failures))

    def _end_promotion(self, state: str, failures: list[str]) -> None:
        assert self._promotion is not None
        self._promotion = replace(self._promotion, state=state, failures=failures)
        payload: dict[str, Any] = {
            "state": state,
            "alias": self._promotion.alias,
            "version_id": self._promotion.version_id,
        }
        if failures:
            payload["failures"] = failures
        self._log(DECISION_STEP, "promotion", Actor("qmachina"), payload)
        self._state = "promoted" if state == "promoted" else "completed"

    # ------------------------------------------------------------------ updates

    @workflow.update
    async def commit(self, commit: StepCommit) -> SessionStatus:
        self._committed[commit.step] = CommittedStep(
            commit.step, dict(commit.payload), commit.actor.subject, workflow.now().isoformat()
        )
        self._log(commit.step, "commit", commit.actor, dict(commit.payload))
        if commit.step == EXECUTION_STEP:
            self._state = "executing"  # the run loop starts it; nothing else may change meanwhile
        if commit.step == DECISION_STEP:
            decision = DecisionCommit.model_validate(commit.payload)
            self._state = "completed" if decision.decision == "promote" else "abandoned"
        return self.status()

    @commit.validator
    def _commit_is_due(self, commit: StepCommit) -> None:
        self._require_editor(commit.actor)
        if commit.step not in range(1, DECISION_STEP + 1):
            raise _refuse(
                f"there is no step {commit.step}; steps are 1 to {DECISION_STEP}", "PayloadInvalid"
            )
        if self._state in ("executing", "promoting", "promoted", "abandoned"):
            raise _refuse(f"the session is {self._state}: no step can be committed")
        due = self._next_step()
        if commit.step != due:
            raise _refuse(
                f"step {commit.step} ({STEP_NAMES[commit.step - 1]}) cannot be committed now: "
                f"step {due} ({STEP_NAMES[due - 1]}) is next"
                if due is not None
                else f"step {commit.step} cannot be committed: every step is committed"
            )
        issues = structural_issues(commit.step, commit.payload)
        if issues:
            raise _invalid(commit.step, issues)
        if commit.step == DECISION_STEP and commit.actor.actor_type != "user":
            raise _refuse(
                "the promotion decision is a person's: an advisor cannot commit it", "NotAllowed"
            )

    @workflow.update
    async def commit_manual(self, manual: ManualCommit) -> SessionStatus:
        invalidated = sorted(step for step in self._committed if step > len(SECTION_OF_STEP))
        for step, section in SECTION_OF_STEP.items():
            self._committed[step] = CommittedStep(
                step,
                dict(manual.sections[section]),
                manual.actor.subject,
                workflow.now().isoformat(),
            )
        for step in invalidated:
            del self._committed[step]
        self._execution = None
        self._promotion = None
        self._state = "designing"
        self._log(
            1, "manual", manual.actor, {"sections": manual.sections, "invalidated": invalidated}
        )
        return self.status()

    @commit_manual.validator
    def _manual_is_allowed(self, manual: ManualCommit) -> None:
        self._require_editor(manual.actor)
        if self._state in ("executing", "promoting", "promoted", "abandoned"):
            raise _refuse(f"the session is {self._state}: its model cannot be replaced")
        missing = sorted(set(SECTION_OF_STEP.values()) - set(manual.sections))
        if missing:
            raise _refuse(f"the model lacks {', '.join(missing)}", "PayloadInvalid")
        for step, section in SECTION_OF_STEP.items():
            issues = structural_issues(step, manual.sections[section])
            if issues:
                raise _invalid(step, issues)

    @workflow.update
    async def reopen(self, reopen: StepReopen) -> SessionStatus:
        invalidated = sorted(step for step in self._committed if step > reopen.step)
        for step in [reopen.step, *invalidated]:
            del self._committed[step]
        if reopen.step <= EXECUTION_STEP:
            self._execution = None
        self._promotion = None
        self._state = "designing" if reopen.step <= EXECUTION_STEP else "analyzing"
        self._log(
            reopen.step,
            "reopen",
            reopen.actor,
            {"reason": reopen.reason, "invalidated": invalidated},
        )
        return self.status()

    @reopen.validator
    def _reopen_is_allowed(self, reopen: StepReopen) -> None:
        self._require_editor(reopen.actor)
        if self._state in ("executing", "promoting", "promoted", "abandoned"):
            raise _refuse(f"the session is {self._state}: no step can be reopened")
        if reopen.step not in self._committed:
            raise _refuse(f"step {reopen.step} is not committed: there is nothing to reopen")

    @workflow.update
    async def cancel_execution(self, request: ActorRequest) -> SessionStatus:
        self._cancel_due = True
        self._log(EXECUTION_STEP, "cancel", request.actor, {"reason": request.reason})
        execution = self._execution
        if execution is not None and execution.sweep_workflow_id:
            sweep = workflow.get_external_workflow_handle(execution.sweep_workflow_id)
            await sweep.signal(ExperimentSweep.cancel)
        return self.status()

    @cancel_execution.validator
    def _execution_is_running(self, request: ActorRequest) -> None:
        self._require_editor(request.actor)
        if self._state != "executing" or self._cancel_due:
            raise _refuse(f"the session is {self._state}: no execution is running to cancel")

    @workflow.update
    async def promote(self, request: ActorRequest) -> SessionStatus:
        self._promotion_due = True
        self._log(DECISION_STEP, "promote", request.actor, {"reason": request.reason})
        return self.status()

    @promote.validator
    def _promotion_is_allowed(self, request: ActorRequest) -> None:
        self._require_editor(request.actor)
        if request.actor.actor_type != "user":
            raise _refuse("a promotion is a person's act: an advisor cannot start it", "NotAllowed")
        if self._state != "completed" or self._promotion_due:
            unfinished = [
                f"{step} ({STEP_NAMES[step - 1]})"
                for step in range(1, DECISION_STEP + 1)
                if step not in self._committed
            ]
            detail = f"; steps not committed: {', '.join(unfinished)}" if unfinished else ""
            raise _refuse(
                f"only a completed session can be promoted: this one is {self._state}{detail}"
            )

    # ------------------------------------------------------------------ queries

    @workflow.query
    def status(self) -> SessionStatus:
        request = self._request
        return SessionStatus(
            session_id="" if request is None else request.session_id,
            workspace_id="" if request is None else request.workspace_id,
            title="" if request is None else request.title,
            state=self._state,
            steps=[self._step_view(step) for step in range(1, DECISION_STEP + 1)],
            next_step=self._next_step() if self._state in ("designing", "analyzing") else None,
            execution=self._execution,
            promotion=self._promotion,
            decisions=len(self._decisions),
        )

    @workflow.query
    def decisions(self) -> list[DecisionEntry]:
        return list(self._decisions)

    # ------------------------------------------------------------------ helpers

    def _require_editor(self, actor: Actor) -> None:
        if not actor.subject:
            raise _refuse("a change names who makes it", "NotAllowed")
        if EDIT_PERMISSION not in actor.granted:
            raise _refuse(f"{actor.subject!r} may not change this session", "NotAllowed")

    def _next_step(self) -> int | None:
        for step in range(1, DECISION_STEP + 1):
            if step not in self._committed:
                if step == DECISION_STEP and (
                    self._execution is None or self._execution.state != "succeeded"
                ):
                    return None
                return step
        return None

    def _step_view(self, step: int) -> StepView:
        committed = self._committed.get(step)
        name = STEP_NAMES[step - 1]
        if committed is not None:
            running = step == EXECUTION_STEP and self._state == "executing"
            return StepView(
                step,
                name,
                "running" if running else "committed",
                committed.payload,
                committed.committed_by,
                committed.committed_at,
            )
        return StepView(step, name, "open" if step == self._next_step() else "locked")

    def _sections(self) -> dict[str, dict[str, Any]]:
        return {
            section: dict(self._committed[step].payload)
            for step, section in SECTION_OF_STEP.items()
        }

    def _log(self, step: int, action: str, actor: Actor, payload: dict[str, Any]) -> None:
        self._decisions.append(
            DecisionEntry(
                seq=len(self._decisions) + 1,
                step=step,
                action=action,
                actor=actor.subject,
                actor_type=actor.actor_type,
                payload=payload,
                at=workflow.now().isoformat(),
            )
        )

    def _carry(self) -> SessionCarry:
        return SessionCarry(
            committed=[self._committed[step] for step in sorted(self._committed)],
            decisions=list(self._decisions),
            executions=self._executions,
            execution=self._execution,
            promotion=self._promotion,
            state=self._state,
        )

    def _restore(self, carry: SessionCarry) -> None:
        self._committed = {step.step: step for step in carry.committed}
        self._decisions = list(carry.decisions)
        self._executions = carry.executions
        self._execution = carry.execution
        self._promotion = carry.promotion
        self._state = carry.state


def _failure_text(error: BaseException) -> str:
    """The innermost message of an activity's or child's failure."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error)
