"""Bounds of the integers a request may carry, from the columns they meet: a number the store
cannot hold is a 422 naming the field, never a database error."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

MAX_INT32 = 2**31 - 1
"""The largest value of an ``INTEGER`` column on PostgreSQL."""
MAX_INT64 = 2**63 - 1
"""The largest value of a ``BIGINT`` column, and of an integer SQLite stores."""
MAX_EXACT_INTEGER = 2**53
"""The largest integer every JSON client holds exactly (as a double); below ``MAX_INT64``, so a
``BIGINT`` bound by it can be sent as ``9007199254740992`` or ``9.007199254740992e15`` alike."""

Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many items")]
Offset = Annotated[int, Query(ge=0, le=MAX_EXACT_INTEGER, description="Skip this many items first")]
