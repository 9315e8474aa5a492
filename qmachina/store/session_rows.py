"""What the modeling and live session tables share: a row read within its workspace, and a
workspace's rows a page at a time, newest first."""

from __future__ import annotations

from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from qmachina.store.models import LiveSession, ModelingSession

SessionRow = TypeVar("SessionRow", ModelingSession, LiveSession)


async def row_in_workspace(
    session: AsyncSession, table: type[SessionRow], workspace_id: str, row_id: str
) -> SessionRow | None:
    """The row with this id if it belongs to the workspace."""
    row: SessionRow | None = await session.scalar(
        sa.select(table).where(table.workspace_id == workspace_id, table.id == row_id)
    )
    return row


async def page_in_workspace(
    session: AsyncSession, table: type[SessionRow], workspace_id: str, *, limit: int, offset: int
) -> tuple[list[SessionRow], int]:
    """A page of the workspace's rows, newest first, and how many it has."""
    where = table.workspace_id == workspace_id
    rows = await session.scalars(
        sa.select(table)
        .where(where)
        .order_by(table.created_at.desc(), table.id)
        .limit(limit)
        .offset(offset)
    )
    total = await session.scalar(sa.select(sa.func.count()).select_from(table).where(where))
    return list(rows), int(total or 0)
