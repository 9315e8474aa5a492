"""What the live ingestor tells its caller, as small frozen records.

The ingestor calls ``on_event(event)`` from its own thread; every event here is cheap to build
and safe to hand to another thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from qmachina.live.checkpoint import Checkpoint

__all__ = [
    "Connected",
    "DisconnectReason",
    "Disconnected",
    "GatewayError",
    "GatewayNotice",
    "LiveEvent",
    "Progress",
    "Reconnecting",
    "SymbolMapped",
]


class DisconnectReason(StrEnum):
    """Why a connection ended."""

    RESET = "reset"  # the connection was reset or lost (TCP RST, gateway gone)
    CLOSED = "closed"  # the gateway closed it cleanly without being asked
    WATCHDOG = "watchdog"  # nothing, not even a heartbeat, within watchdog_seconds
    ERROR = "error"  # the gateway sent an error message, then closed
    STOPPED = "stopped"  # the ingestor was asked to stop


@dataclass(frozen=True)
class Connected:
    """A connection is authenticated and streaming from ``start`` (None: live).

    ``attempt``: the :class:`Reconnecting` attempt that succeeded (0: no failure before it).
    """

    attempt: int
    session_id: str | None
    start: int | None


@dataclass(frozen=True)
class Disconnected:
    """A connection ended; ``detail`` is the gateway's or the socket's message."""

    reason: DisconnectReason
    detail: str


@dataclass(frozen=True)
class Reconnecting:
    """The ingestor waits ``delay_seconds``, then makes connection attempt ``attempt``."""

    attempt: int
    delay_seconds: float
    detail: str


@dataclass(frozen=True)
class Progress:
    """Counts since the ingestor started, and where bronze stands.

    ``lag_ns``: wall-clock now minus the ``ts_event`` of the last record taken (None before the
    first record).
    """

    received: int
    written: int
    duplicates: int
    checkpoint: Checkpoint
    lag_ns: int | None


@dataclass(frozen=True)
class SymbolMapped:
    """The gateway mapped a subscribed symbol to an instrument (``SymbolMappingMsg``)."""

    instrument_id: int
    stype_in_symbol: str
    stype_out_symbol: str
    ts_event: int


@dataclass(frozen=True)
class GatewayError:
    """An ``ErrorMsg`` from the gateway."""

    message: str
    code: int | None
    ts_event: int


@dataclass(frozen=True)
class GatewayNotice:
    """A ``SystemMsg`` that is not a heartbeat (subscription acknowledged, replay finished...)."""

    message: str
    code: int | None
    ts_event: int


LiveEvent = (
    Connected | Disconnected | Reconnecting | Progress | SymbolMapped | GatewayError | GatewayNotice
)
