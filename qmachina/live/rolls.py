"""Contract rolls of continuous symbols, from symbol mappings or from a calendar.

A continuous symbol (``ES.c.0``) stands for one contract at a time. The gateway says which with
a ``SymbolMappingMsg`` when a subscription starts and again when the symbol rolls.
:class:`ContractTracker` turns those mappings into the active contract per symbol and reports
each roll once. :class:`CalendarRollPolicy` is the other way to decide: a fixed schedule.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qmachina.live.ingest_events import SymbolMapped

__all__ = ["CalendarRollPolicy", "Contract", "ContractRoll", "ContractTracker"]


@dataclass(frozen=True)
class Contract:
    """One contract: its instrument id and raw symbol."""

    instrument_id: int
    symbol: str


@dataclass(frozen=True)
class ContractRoll:
    """A continuous ``symbol`` moved from one contract to the next at ``ts_event``."""

    symbol: str
    from_contract: Contract
    to_contract: Contract
    ts_event: int


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
