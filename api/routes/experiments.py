"""``/v1/experiments``: the experiment browser, a workspace's jobs grouped by experiment name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api import jobs_service
from api.access import InWorkspace, WorkspaceAccess
from api.dependencies import State
from api.job_models import ExperimentJobs, ExperimentList
from api.problems import problem_responses
from api.routes.experiment_jobs import job_of

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])


@router.get("", response_model=ExperimentList, responses=problem_responses(404, 422))
async def list_experiments(
    state: State, access: Annotated[WorkspaceAccess, Depends(InWorkspace("can_read"))]
) -> ExperimentList:
    """The workspace's experiments (jobs sharing a name) with their jobs and run counts; the
    most recently run experiment first, each one's jobs newest first."""
    groups = await jobs_service.experiment_groups(state.sessions, access.workspace)
    return ExperimentList(
        experiments=[
            ExperimentJobs(name=name, jobs=[job_of(view) for view in views])
            for name, views in groups
        ]
    )
