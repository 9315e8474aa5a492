"""Engines, sessions and migrations for the control-plane store, from a database URL.

PostgreSQL (``postgresql+asyncpg://...``) in production and CI, SQLite
(``sqlite+aiosqlite:///path``) as the embedded default. The schema comes only from the Alembic
migrations in ``qmachina/store/migrations``, configured here in code (no ``alembic.ini``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_FILE_NAME = "qmachina.sqlite3"

# NaN and infinities are not JSON: PostgreSQL rejects them and SQLite would store invalid text,
# so refuse them on both backends alike.
_json_serializer = functools.partial(json.dumps, allow_nan=False)


def default_sqlite_url(data_dir: Path) -> str:
    """The embedded store's URL: a SQLite file in ``data_dir``."""
    return f"sqlite+aiosqlite:///{(data_dir / SQLITE_FILE_NAME).resolve()}"


# How long a SQLite connection waits for another's write lock before failing "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


def _configure_sqlite_connection(dbapi_connection: Any, connection_record: object) -> None:
    # SQLite ignores foreign keys unless each connection asks for them. Write-ahead logging lets
    # the API's many short reads (authorization checks while streams run) and the worker's
    # writes proceed side by side: in the default rollback journal a reader blocks a commit.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def create_store_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``; SQLite connections enforce foreign keys and use a
    write-ahead log."""
    engine = create_async_engine(url, json_serializer=_json_serializer)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose rows stay readable after commit (callers own the transaction)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(_alembic_config(connection), revision)


def _downgrade(connection: Connection, revision: str) -> None:
    command.downgrade(_alembic_config(connection), revision)


async def upgrade_to_head(url: str) -> None:
    """Apply every migration not yet applied to the database at ``url``."""
    engine = create_store_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade, "head")
    finally:
        await engine.dispose()


async def downgrade_to_base(url: str) -> None:
    """Undo every migration: drops all control-plane tables (for tests and teardown)."""
    engine = create_store_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_downgrade, "base")
    finally:
        await engine.dispose()
