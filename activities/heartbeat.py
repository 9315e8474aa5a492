"""The one heartbeat helper of every long activity: typed details, sent on a timer and on progress.

Cancellation reaches an activity only through a heartbeat response, so a long step that reports
no progress still heartbeats on the timer and stays cancellable.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Generic, TypeVar

from temporalio import activity
from temporalio.converter import value_to_type

Details = TypeVar("Details")

DEFAULT_INTERVAL_SECONDS = 10.0


class Heartbeat(Generic[Details]):
    """Heartbeats ``details`` every half heartbeat timeout, and at once on :meth:`report`."""

    def __init__(self, details: Details) -> None:
        self._details = details
        self._timer: asyncio.Task[None] | None = None

    @property
    def details(self) -> Details:
        return self._details

    def report(self, details: Details) -> None:
        """New progress: remembered for the timer and sent now (the SDK throttles sending)."""
        self._details = details
        activity.heartbeat(details)

    async def __aenter__(self) -> Heartbeat[Details]:
        self._timer = asyncio.create_task(self._beat())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer

    async def _beat(self) -> None:
        timeout = activity.info().heartbeat_timeout
        interval = timeout.total_seconds() / 2 if timeout else DEFAULT_INTERVAL_SECONDS
        while True:
            activity.heartbeat(self._details)
            await asyncio.sleep(interval)


def last_heartbeat(details_type: type[Details]) -> Details | None:
    """The details of the previous attempt's last heartbeat, typed; None on a first attempt."""
    details = activity.info().heartbeat_details
    if not details:
        return None
    typed: Details = value_to_type(details_type, details[0])
    return typed
