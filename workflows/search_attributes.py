"""The custom search attributes every qMachina workflow carries, defined once.

They let ``temporal workflow list --query "Workspace='w1' AND JobKind='experiment_sweep'"`` and
the Temporal Web UI show what is what. A server must know them before a workflow uses them: the
embedded dev server is started with :func:`dev_server_flags`, and a production cluster registers
them once with ``temporal operator search-attribute create`` (see the README).
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

WORKSPACE = SearchAttributeKey.for_keyword("Workspace")
"""The workspace the workflow works for."""
JOB_KIND = SearchAttributeKey.for_keyword("JobKind")
"""What the workflow is: ``experiment_sweep``, later ``promotion``, ``live_session``..."""
SPEC_HASH = SearchAttributeKey.for_keyword("SpecHash")
"""The canonical hash of the spec the workflow runs (e.g. the ExperimentSpec)."""

QMACHINA_SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[str], ...] = (WORKSPACE, JOB_KIND, SPEC_HASH)


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
            SearchAttributePair(WORKSPACE, workspace_id),
            SearchAttributePair(JOB_KIND, kind),
            SearchAttributePair(SPEC_HASH, spec_hash),
        ]
    )
