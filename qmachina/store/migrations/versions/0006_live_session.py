"""Live ingestion sessions and the contract rolls they record.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def _workspace_id() -> sa.Column[str]:
    return sa.Column(
        "workspace_id",
        sa.String(36),
        sa.ForeignKey("workspace.id", ondelete="CASCADE"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "live_session",
        sa.Column("id", sa.String(36), primary_key=True),
        _workspace_id(),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("subscription", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("workflow_id", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("workspace_id", "id", name="uq_live_session_workspace_id_id"),
        sa.UniqueConstraint("workflow_id", name="uq_live_session_workflow_id"),
    )
    op.create_index("ix_live_session_workspace_id", "live_session", ["workspace_id"])
    op.create_index(
        "ix_live_session_workspace_id_created_at", "live_session", ["workspace_id", "created_at"]
    )
    op.create_table(
        "contract_roll_event",
        sa.Column("id", sa.String(36), primary_key=True),
        _workspace_id(),
        sa.Column("session_id", sa.String(36), nullable=False),
        sa.Column("symbol", sa.String(64), nullable=False),
        sa.Column("from_instrument_id", sa.BigInteger(), nullable=True),
        sa.Column("from_symbol", sa.String(64), nullable=True),
        sa.Column("to_instrument_id", sa.BigInteger(), nullable=False),
        sa.Column("to_symbol", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("ts_event", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id", "session_id"],
            ["live_session.workspace_id", "live_session.id"],
            ondelete="CASCADE",
            name="fk_contract_roll_event_session",
        ),
        sa.UniqueConstraint(
            "session_id",
            "ts_event",
            "to_instrument_id",
            name="uq_contract_roll_event_session_id_ts_event_to_instrument_id",
        ),
    )
    op.create_index("ix_contract_roll_event_workspace_id", "contract_roll_event", ["workspace_id"])
    op.create_index("ix_contract_roll_event_session_id", "contract_roll_event", ["session_id"])


def downgrade() -> None:
    op.drop_table("contract_roll_event")
    op.drop_table("live_session")
