"""Workspace quotas, enforced where work starts: a refusal states the quota, its limit and the
current use, and leaves nothing written."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from api.problems import QuotaExceededError, QuotaUse
from qmachina.store import governance
from qmachina.store.models import Workspace


async def reserve_job_slot(session: AsyncSession, workspace: Workspace) -> None:
    """In the transaction that creates a job: refuse it when the workspace already runs
    ``max_concurrent_jobs`` jobs or its artifacts fill ``max_storage_bytes``.

    The workspace row is written first, so two submissions to one workspace are counted one
    after the other and cannot both take the last slot.
    """
    locked = await governance.lock_workspace(session, workspace.id)
    if locked.max_concurrent_jobs is not None:
        active = await governance.active_job_count(session, workspace.id)
        if active >= locked.max_concurrent_jobs:
            use = QuotaUse(
                quota="max_concurrent_jobs", limit=locked.max_concurrent_jobs, current=active
            )
            raise QuotaExceededError(workspace.slug, use, "another queued or running job")
    if locked.max_storage_bytes is not None:
        used = await governance.storage_used(session, workspace.id)
        if used >= locked.max_storage_bytes:
            use = QuotaUse(quota="max_storage_bytes", limit=locked.max_storage_bytes, current=used)
            raise QuotaExceededError(workspace.slug, use, "a job storing more artifacts")
