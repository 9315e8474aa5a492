"""Scratch PostgreSQL databases for the tests, on the machine's server (``make test`` starts it).

``QMACHINA_TEST_POSTGRES`` (``user@host:port``, default ``postgres@127.0.0.1:5432``) points the
tests at another server.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

PG_SERVER = os.environ.get("QMACHINA_TEST_POSTGRES", "postgres@127.0.0.1:5432")
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


async def _admin(statement: str) -> None:
    """Run ``statement`` outside a transaction in the server's ``postgres`` database."""
    engine = create_async_engine(
        f"postgresql+asyncpg://{PG_SERVER}/postgres",
        isolation_level="AUTOCOMMIT",
        connect_args={"timeout": 5},
    )
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """The asyncpg URL of a new, empty database, dropped (with its connections) afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, sa.exc.DBAPIError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_SERVER} ({exc!r}); start it with `{PG_START}` "
            "or point QMACHINA_TEST_POSTGRES at a server (user@host:port)"
        )
    try:
        yield f"postgresql+asyncpg://{PG_SERVER}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE "{name}" WITH (FORCE)'))
