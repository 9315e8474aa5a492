"""Names every process agrees on to reach qMachina's workflows, defined once: task queues,
workflow IDs, job kinds and the custom search attributes every workflow carries.

The worker, the API and ``qmachina up`` import them from here (the domain layer), so none of them
reaches into ``workflows/`` for a name. The search attributes let
``temporal workflow list --query "Workspace='w1' AND JobKind='experiment_sweep'"`` and the
Temporal Web UI show what is what. A server must know them before a workflow uses them: the
embedded dev server is started with :func:`dev_server_flags`, and a production cluster registers
them once with ``temporal operator search-attribute create`` (see the README).
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

SWEEP_TASK_QUEUE = "experiment-sweep"
"""The task queue of ExperimentSweep and its activities."""
SWEEP_JOB_KIND = "experiment_sweep"
"""The ``JobKind`` of an experiment sweep."""


def sweep_workflow_id(workspace_id: str, job_id: str) -> str:
    """The workflow ID of a job's sweep: one sweep per job."""
    return f"sweep-{workspace_id}-{job_id}"


PROMOTION_TASK_QUEUE = SWEEP_TASK_QUEUE
"""Promotions run on the sweep workers' queue: one worker process serves both."""
PROMOTION_JOB_KIND = "promotion"
"""The ``JobKind`` of a promotion."""


def promotion_workflow_id(workspace_id: str, alias: str) -> str:
    """The workflow ID of an alias's promotion: one running promotion per alias."""
    return f"promotion-{workspace_id}-{alias}"


MODELING_TASK_QUEUE = SWEEP_TASK_QUEUE
"""Modeling sessions run on the sweep workers' queue, beside the sweeps they start."""
MODELING_JOB_KIND = "modeling_session"
"""The ``JobKind`` of a Create-a-Model session."""


def modeling_workflow_id(workspace_id: str, session_id: str) -> str:
    """The workflow ID of a modeling session."""
    return f"modeling-{workspace_id}-{session_id}"


LIVE_TASK_QUEUE = SWEEP_TASK_QUEUE
"""Live ingestion sessions run on the same workers (each holds one activity slot while it
runs)."""
LIVE_JOB_KIND = "live_session"
"""The ``JobKind`` of a live ingestion session."""


def live_workflow_id(workspace_id: str, session_id: str) -> str:
    """The workflow ID of a live ingestion session."""
    return f"live-{workspace_id}-{session_id}"


WORKSPACE_ATTRIBUTE = SearchAttributeKey.for_keyword("Workspace")
"""The workspace the workflow works for."""
JOB_KIND_ATTRIBUTE = SearchAttributeKey.for_keyword("JobKind")
"""What the workflow is: ``experiment_sweep``, later ``promotion``, ``live_session``..."""
SPEC_HASH_ATTRIBUTE = SearchAttributeKey.for_keyword("SpecHash")
"""The canonical hash of the spec the workflow runs (e.g. the ExperimentSpec)."""

QMACHINA_SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[str], ...] = (
    WORKSPACE_ATTRIBUTE,
    JOB_KIND_ATTRIBUTE,
    SPEC_HASH_ATTRIBUTE,
)


def dev_server_flags() -> list[str]:
    """``temporal server start-dev`` arguments that register every qMachina attribute."""
    flags: list[str] = []
    for key in QMACHINA_SEARCH_ATTRIBUTES:
        flags += ["--search-attribute", f"{key.name}=Keyword"]
    return flags


def job_search_attributes(workspace_id: str, kind: str, spec_hash: str) -> TypedSearchAttributes:
    """The attributes a job's workflow is started with."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(WORKSPACE_ATTRIBUTE, workspace_id),
            SearchAttributePair(JOB_KIND_ATTRIBUTE, kind),
            SearchAttributePair(SPEC_HASH_ATTRIBUTE, spec_hash),
        ]
    )
