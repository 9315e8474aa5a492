"""What a subscription's symbols mean on the tape, and how continuous symbols roll.

* ``raw_symbol``: the raw symbols the files name (metadata mappings, live symbol mappings,
  instrument definitions) or the gateway was given; ``ALL_SYMBOLS`` is every instrument.
* ``instrument_id``: any instrument on the tape.
* ``continuous`` (``ES.c.0``): configured, one instrument at a time; a roll fault switches it
  to another instrument from a tape time on. On the tape that time is a *position*, the first
  record at or after it, so replays and :func:`qmachina.live.gateway.tape_records` agree with
  what live sessions saw.
* ``parent`` (``ES.FUT``): configured, or else every outright future of the root on the tape
  (raw symbols ``ROOT`` + month code + year digits).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qmachina.live.gateway_faults import Fault
from qmachina.live.gateway_protocol import ALL_SYMBOLS
from qmachina.live.gateway_tape import Tape

__all__ = ["RollStep", "SymbolError", "Symbology"]

_MONTH_CODES = "FGHJKMNQUVXZ"


class SymbolError(ValueError):
    """A configured symbol or roll target that the tape does not know."""


@dataclass(frozen=True)
class RollStep:
    """A continuous symbol maps to ``instrument_id`` from tape ``position`` (time ``at_ns``)."""

    symbol: str
    instrument_id: int
    at_ns: int
    position: int
    fault_index: int


class Symbology:
    """Symbol resolution for one tape; immutable once built."""

    def __init__(
        self,
        tape: Tape,
        continuous: Mapping[str, str | int] | None = None,
        rolls: Sequence[tuple[int, Fault]] = (),
        parents: Mapping[str, Sequence[str | int]] | None = None,
    ) -> None:
        self._tape = tape
        self._ids = tape.instrument_ids
        self._names = {iid: sym for sym, iid in tape.raw_symbols.items()}
        self._continuous = {
            symbol: self.instrument_id(target, f"continuous symbol {symbol}")
            for symbol, target in (continuous or {}).items()
        }
        self._parents = {
            symbol: [self.instrument_id(t, f"parent symbol {symbol}") for t in targets]
            for symbol, targets in (parents or {}).items()
        }
        steps: dict[str, list[RollStep]] = {}
        for index, fault in rolls:
            if fault.symbol not in self._continuous or fault.at_ns is None or fault.to is None:
                raise SymbolError(
                    f"roll of {fault.symbol}: configure the contract it starts on "
                    f"(continuous {fault.symbol}=RAW_SYMBOL)"
                )
            steps.setdefault(fault.symbol, []).append(
                RollStep(
                    symbol=fault.symbol,
                    instrument_id=self.instrument_id(fault.to, f"roll of {fault.symbol}"),
                    at_ns=fault.at_ns,
                    position=tape.position_before(fault.at_ns),
                    fault_index=index,
                )
            )
        self._steps = {s: sorted(v, key=lambda step: step.at_ns) for s, v in steps.items()}

    def instrument_id(self, target: str | int, what: str = "symbol") -> int:
        """A raw symbol or an instrument id (as int or digits) as an instrument id."""
        if isinstance(target, int) or str(target).isdigit():
            return int(target)
        if target in self._tape.raw_symbols:
            return self._tape.raw_symbols[target]
        known = ", ".join(sorted(self._tape.raw_symbols)) or "none"
        raise SymbolError(f"{what}: raw symbol {target!r} is not on the tape (known: {known})")

    def raw_symbol(self, instrument_id: int) -> str:
        """The raw symbol of an instrument, or its id as text when the files do not say."""
        return self._names.get(instrument_id, str(instrument_id))

    def continuous_symbols(self) -> list[str]:
        """The configured continuous symbols."""
        return sorted(self._continuous)

    def rolls(self, symbol: str) -> list[RollStep]:
        """The roll steps of a continuous symbol, in time order."""
        return list(self._steps.get(symbol, ()))

    def all_rolls(self) -> list[RollStep]:
        """Every roll step, in tape order."""
        steps = [step for steps in self._steps.values() for step in steps]
        return sorted(steps, key=lambda step: (step.position, step.at_ns))

    def continuous_base(self, symbol: str) -> int:
        """The instrument a continuous symbol starts on, before any roll."""
        return self._continuous[symbol]

    def resolve(self, stype_in: str, symbol: str) -> list[int]:
        """The instruments ``symbol`` means (continuous: before any roll); [] if none."""
        if symbol == ALL_SYMBOLS:
            return sorted(self._ids)
        if stype_in == "raw_symbol":
            iid = self._tape.raw_symbols.get(symbol)
            return [iid] if iid is not None else []
        if stype_in == "instrument_id":
            return [int(symbol)] if symbol.isdigit() and int(symbol) in self._ids else []
        if stype_in == "continuous":
            return [self._continuous[symbol]] if symbol in self._continuous else []
        if stype_in == "parent":
            if symbol in self._parents:
                return list(self._parents[symbol])
            root, dot, kind = symbol.rpartition(".")
            if not dot or kind != "FUT":
                return []
            pattern = re.compile(rf"^{re.escape(root)}[{_MONTH_CODES}]\d{{1,2}}$")
            return sorted(iid for sym, iid in self._tape.raw_symbols.items() if pattern.match(sym))
        return []
