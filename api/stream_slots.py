"""The workspace quota ``max_streams``: serving streams open at once, counted per API process.

A stream takes a slot of its workspace when it starts (after authentication and authorization,
before its pipeline is joined) and gives it back when it ends, however it ends. Starting one
more than the workspace's ``max_streams`` (read from the store at the start: a changed quota
applies to the next stream) is refused with the limit and the current use; open streams are
never cut by a lowered quota.

The count lives in the process that holds the sockets. Behind several API processes each
enforces the limit on its own streams; a shared count would need the store (rows with a lease),
which a later stage can add behind this same interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette

from api.problems import QuotaExceededError, QuotaUse
from qmachina.store.models import Workspace


@dataclass
class StreamSlots:
    """Open streams per workspace id, in one process (touched from its event loop only)."""

    _open: dict[str, int] = field(default_factory=dict)

    def open_streams(self, workspace_id: str) -> int:
        """The streams the workspace has open now."""
        return self._open.get(workspace_id, 0)

    @contextmanager
    def reserve(self, workspace: Workspace) -> Iterator[None]:
        """Hold a stream slot of ``workspace`` for the ``with`` block; a
        :class:`QuotaExceededError` (quota ``max_streams``) when every slot is taken."""
        current = self.open_streams(workspace.id)
        limit = workspace.max_streams
        if limit is not None and current >= limit:
            raise QuotaExceededError(
                workspace.slug,
                QuotaUse(quota="max_streams", limit=limit, current=current),
                "another stream",
            )
        self._open[workspace.id] = current + 1
        try:
            yield
        finally:
            left = self._open[workspace.id] - 1
            if left:
                self._open[workspace.id] = left
            else:
                del self._open[workspace.id]


def stream_slots(app: Starlette) -> StreamSlots:
    """The stream slots of the app's process (``AppState.streams``)."""
    slots: StreamSlots = app.state.qmachina.streams
    return slots
