"""``/v1/serving/promotions``: promote a registered version behind an alias through the
Promotion workflow (preflight, optional approval, atomic repoint), follow it, decide it.

Editors start promotions and decide them (``can_mutate`` on the workspace); the workflow's own
validator refuses a decision by the editor who asked for the promotion, or one not awaited.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, status

from api import promotion_service
from api.access import InWorkspace, WorkspaceAccess
from api.dependencies import State
from api.problems import problem_responses
from api.promotion_models import PROMOTIONS_PATH, DecisionBody, PromotionStart, PromotionView

router = APIRouter(prefix=PROMOTIONS_PATH, tags=["serving"])

Reader = Annotated[WorkspaceAccess, Depends(InWorkspace("can_read"))]
Editor = Annotated[WorkspaceAccess, Depends(InWorkspace("can_mutate"))]
AliasPath = Annotated[
    str, Path(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="The serving alias")
]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=PromotionView,
    responses=problem_responses(403, 404, 409, 422, 503),
)
async def start_promotion(body: PromotionStart, state: State, access: Editor) -> PromotionView:
    """Start promoting the version behind the alias: its preflight runs first (spec valid
    today, lineage complete, data present with the recorded checksums, thresholds met) and a
    failure ends it ``rejected`` with the reasons and nothing written. 409 while another
    promotion of the alias is under way."""
    return await promotion_service.start_promotion(state, access, body)


@router.get("/{alias}", response_model=PromotionView, responses=problem_responses(404, 422))
async def get_promotion(alias: AliasPath, state: State, access: Reader) -> PromotionView:
    """The alias's latest promotion: its state, the preflight's checks and findings, the
    decision and what the alias named before."""
    return await promotion_service.promotion_status(state, access, alias)


@router.post(
    "/{alias}/decision",
    response_model=PromotionView,
    responses=problem_responses(403, 404, 409, 422),
)
async def decide_promotion(
    alias: AliasPath, body: DecisionBody, state: State, access: Editor
) -> PromotionView:
    """Approve or refuse the alias's promotion awaiting a decision. 409 when none is awaited,
    or when the caller asked for the promotion (someone else must approve it)."""
    return await promotion_service.decide(state, access, alias, body)
