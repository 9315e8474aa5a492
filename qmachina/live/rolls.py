"""Contract rolls, from the gateway's symbol mappings or from a calendar.

A continuous symbol (``ES.c.0``) stands for one contract at a time. The gateway says which with
a ``SymbolMappingMsg`` when a subscription starts and again when the symbol rolls.
:class:`ContractTracker` turns those mappings into the active contract per symbol and reports
each roll once.

The other policy is a calendar (:class:`CalendarRollPolicy`): a name (``ES``) stands for one
raw symbol from each scheduled time on, in market time. :class:`CalendarTracker` follows the
records' ``ts_event`` through the schedule of a session subscribed to its raw symbols and
reports every step the market has reached: the first as an assignment (no contract before it),
each later one as a roll. What it reports depends only on the schedule and on how far the
market has got, so a retried ingestion reports the same rolls again, at the same times.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from qmachina.live.ingest_events import SymbolMapped

__all__ = [
    "CalendarRollPolicy",
    "CalendarTracker",
    "Contract",
    "ContractRoll",
    "ContractTracker",
]

MAPPING_REASON = "the gateway mapped the symbol to another instrument"


@dataclass(frozen=True)
class Contract:
    """One contract: its instrument id and raw symbol."""

    instrument_id: int
    symbol: str


@dataclass(frozen=True)
class ContractRoll:
    """``symbol`` moved from one contract to the next at ``ts_event`` (market time); with no
    ``from_contract``, the first contract a calendar assigns it."""

    symbol: str
    from_contract: Contract | None
    to_contract: Contract
    ts_event: int
    reason: str = MAPPING_REASON


class ContractTracker:
    """The active contract of each subscribed symbol, from symbol mappings.

    Rolls go forward only: a mapping back to a contract the symbol has already rolled away
    from is history being restated (a reconnection replaying from before the roll announces
    the old contract again, then the new one), not a roll. A mapping to the active contract
    changes nothing; the first mapping of a symbol sets its contract without a roll.
    """

    def __init__(self, symbols: Iterable[str]) -> None:
        self._symbols = frozenset(symbols)
        self._history: dict[str, list[Contract]] = {}

    def observe(self, mapping: SymbolMapped) -> ContractRoll | None:
        """Take one mapping; the roll it reveals, if any."""
        symbol = mapping.stype_in_symbol
        if symbol not in self._symbols:
            return None
        contract = Contract(mapping.instrument_id, mapping.stype_out_symbol)
        history = self._history.setdefault(symbol, [])
        if not history:
            history.append(contract)
            return None
        known = {c.instrument_id for c in history}
        if contract.instrument_id in known:
            return None
        roll = ContractRoll(symbol, history[-1], contract, mapping.ts_event)
        history.append(contract)
        return roll

    def active(self, symbol: str) -> Contract | None:
        """The contract ``symbol`` stands for now (None before its first mapping)."""
        history = self._history.get(symbol)
        return history[-1] if history else None

    def contracts(self, symbol: str) -> list[Contract]:
        """Every contract ``symbol`` has stood for, oldest first."""
        return list(self._history.get(symbol, ()))


class CalendarRollPolicy:
    """The active raw symbol by time, from a schedule ``[(from_ts_ns, raw_symbol), ...]``."""

    def __init__(self, schedule: Sequence[tuple[int, str]]) -> None:
        if not schedule:
            raise ValueError("a roll schedule needs at least one (ts, symbol) entry")
        steps = sorted(schedule)
        times = [ts for ts, _ in steps]
        if len(set(times)) != len(times):
            raise ValueError("a roll schedule has two entries at one time")
        self._times = times
        self._symbols = [symbol for _, symbol in steps]

    @property
    def steps(self) -> list[tuple[int, str]]:
        """The schedule in time order: ``(from_ts_ns, raw_symbol)``."""
        return list(zip(self._times, self._symbols, strict=True))

    def active(self, ts_ns: int) -> str | None:
        """The raw symbol in force at ``ts_ns`` (None before the schedule starts)."""
        index = bisect.bisect_right(self._times, ts_ns) - 1
        return self._symbols[index] if index >= 0 else None

    def next_roll(self, ts_ns: int) -> tuple[int, str] | None:
        """The first scheduled change after ``ts_ns``: (when, to which symbol)."""
        index = bisect.bisect_right(self._times, ts_ns)
        if index >= len(self._times):
            return None
        return self._times[index], self._symbols[index]


class CalendarTracker:
    """The contract a calendar's ``name`` stands for, as the market moves (see the module).

    :meth:`observe` learns each raw symbol's instrument id from the subscription's mappings;
    :meth:`advance` takes the market time reached and returns the steps reached since the last
    call, in order: the schedule's first step as an assignment (no ``from``), each later one as
    a roll from the step before. A step whose symbol has no mapping yet waits.
    """

    def __init__(self, name: str, policy: CalendarRollPolicy) -> None:
        self.name = name
        self._steps = policy.steps
        self._ids: dict[str, int] = {}
        self._active: Contract | None = None
        self._next = 0  # the first step not reported yet

    def observe(self, mapping: SymbolMapped) -> None:
        self._ids[mapping.stype_in_symbol] = mapping.instrument_id

    @property
    def active(self) -> Contract | None:
        return self._active

    def advance(self, market_ns: int) -> list[ContractRoll]:
        settled: list[ContractRoll] = []
        while self._next < len(self._steps):
            at, symbol = self._steps[self._next]
            to = self._contract(self._next)
            if at > market_ns or to is None:
                break
            since = datetime.fromtimestamp(at / 1e9, UTC).isoformat()
            reason = f"calendar {self.name}: {symbol} from {since}"
            settled.append(ContractRoll(self.name, self._active, to, at, reason))
            self._active = to
            self._next += 1
        return settled

    def _contract(self, step: int) -> Contract | None:
        symbol = self._steps[step][1]
        instrument_id = self._ids.get(symbol)
        return None if instrument_id is None else Contract(instrument_id, symbol)
