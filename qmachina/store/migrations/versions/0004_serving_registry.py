"""The serving registry: immutable serving versions, aliases and their repoint history.

Serving versions and alias events are never updated; besides the ORM's refusal, a trigger on
each table makes the database refuse an ``UPDATE`` whoever sends it.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

IMMUTABLE_TABLES = ("serving_version", "serving_alias_event")
REFUSE_FUNCTION = "qmachina_refuse_update"
ALIAS_EVENT_KINDS = "kind IN ('set', 'rollback')"


def _workspace_id() -> sa.Column[str]:
    return sa.Column(
        "workspace_id",
        sa.String(36),
        sa.ForeignKey("workspace.id", ondelete="CASCADE"),
        nullable=False,
    )


def _timestamp(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def _version_fk(table: str, column: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["workspace_id", column],
        ["serving_version.workspace_id", "serving_version.version_id"],
        name=f"fk_{table}_{column}",
    )


def upgrade() -> None:
    op.create_table(
        "serving_version",
        sa.Column("id", sa.String(36), primary_key=True),
        _workspace_id(),
        sa.Column("version_id", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(100), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("snapshot", sa.JSON(), nullable=False),
        sa.Column("registered_by", sa.String(200), nullable=False),
        _timestamp("created_at"),
        sa.UniqueConstraint(
            "workspace_id", "version_id", name="uq_serving_version_workspace_id_version_id"
        ),
        sa.CheckConstraint("length(version_id) = 64", name="ck_serving_version_version_id_length"),
    )
    op.create_index("ix_serving_version_workspace_id", "serving_version", ["workspace_id"])
    op.create_index(
        "ix_serving_version_workspace_id_created_at",
        "serving_version",
        ["workspace_id", "created_at"],
    )
    op.create_table(
        "serving_alias",
        sa.Column("id", sa.String(36), primary_key=True),
        _workspace_id(),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version_id", sa.String(64), nullable=False),
        sa.Column("last_event_seq", sa.Integer(), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.UniqueConstraint("workspace_id", "name", name="uq_serving_alias_workspace_id_name"),
        sa.UniqueConstraint("workspace_id", "id", name="uq_serving_alias_workspace_id_id"),
        _version_fk("serving_alias", "version_id"),
    )
    op.create_index("ix_serving_alias_workspace_id", "serving_alias", ["workspace_id"])
    op.create_table(
        "serving_alias_event",
        sa.Column("id", sa.String(36), primary_key=True),
        _workspace_id(),
        sa.Column("alias_id", sa.String(36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("from_version_id", sa.String(64), nullable=True),
        sa.Column("to_version_id", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _timestamp("created_at"),
        sa.UniqueConstraint("alias_id", "seq", name="uq_serving_alias_event_alias_id_seq"),
        sa.CheckConstraint(ALIAS_EVENT_KINDS, name="ck_serving_alias_event_kind"),
        sa.ForeignKeyConstraint(
            ["workspace_id", "alias_id"],
            ["serving_alias.workspace_id", "serving_alias.id"],
            ondelete="CASCADE",
            name="fk_serving_alias_event_alias",
        ),
        _version_fk("serving_alias_event", "from_version_id"),
        _version_fk("serving_alias_event", "to_version_id"),
    )
    op.create_index("ix_serving_alias_event_workspace_id", "serving_alias_event", ["workspace_id"])
    op.create_index("ix_serving_alias_event_alias_id", "serving_alias_event", ["alias_id"])
    _refuse_updates()


def _refuse_updates() -> None:
    """A trigger per immutable table refusing every ``UPDATE`` as a constraint violation."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"CREATE FUNCTION {REFUSE_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION '% rows are immutable', TG_TABLE_NAME "
            "USING ERRCODE = 'integrity_constraint_violation'; END $$"
        )
        for table in IMMUTABLE_TABLES:
            op.execute(
                f"CREATE TRIGGER tr_{table}_immutable BEFORE UPDATE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {REFUSE_FUNCTION}()"
            )
    else:
        for table in IMMUTABLE_TABLES:
            op.execute(
                f"CREATE TRIGGER tr_{table}_immutable BEFORE UPDATE ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} rows are immutable'); END"
            )


def downgrade() -> None:
    # Dropping a table drops its triggers.
    op.drop_table("serving_alias_event")
    op.drop_table("serving_alias")
    op.drop_table("serving_version")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {REFUSE_FUNCTION}()")
