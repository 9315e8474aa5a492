"""``GET /v1/health``: whether this API process reaches the store and Temporal."""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa
from fastapi import APIRouter, Response, status
from pydantic import BaseModel

from api.dependencies import State, StoreSession

router = APIRouter(prefix="/v1", tags=["health"])


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    store: bool
    temporal: bool


@router.get("/health", response_model=Health)
async def health(state: State, session: StoreSession, response: Response) -> Health:
    """``ok`` when the store answers a query and the Temporal frontend answers its health check."""
    try:
        await session.execute(sa.text("SELECT 1"))
        store_ok = True
    except Exception:
        store_ok = False
    try:
        temporal_ok = await state.temporal.service_client.check_health()
    except Exception:
        temporal_ok = False
    ok = store_ok and temporal_ok
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(status="ok" if ok else "degraded", store=store_ok, temporal=temporal_ok)
