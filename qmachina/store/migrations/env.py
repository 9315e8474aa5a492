"""Alembic environment: runs on the connection that ``qmachina.store.database`` hands over.

The store's async engine opens the connection and passes it in ``config.attributes``, so the
same code migrates PostgreSQL (asyncpg) and SQLite (aiosqlite); SQLite uses batch mode, which
rebuilds a table for alterations SQLite cannot do in place.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from qmachina.store.models import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "qmachina migrations run through qmachina.store.database.upgrade_to_head(url), "
        "which supplies the connection; the alembic command line is not configured"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
