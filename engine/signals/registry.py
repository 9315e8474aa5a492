"""The signal registry: every signal declares typed parameters; unknown or ill-typed parameters
are errors naming the signal and the parameter, never a silent default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.silver_frame import SilverFrame

ParamValue = int | float | bool | str


class SignalError(ValueError):
    """An unknown signal, or a parameter it does not declare or cannot accept."""


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: its type, default, and optional bounds or choices."""

    name: str
    kind: type[int] | type[float] | type[bool] | type[str]
    default: ParamValue
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    doc: str = ""

    def check(self, signal: str, value: object) -> ParamValue:
        """The value converted to this parameter's type, or a SignalError naming it."""
        where = f"signal {signal!r} parameter {self.name!r}"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise SignalError(f"{where}: expected a boolean, got {value!r}")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise SignalError(f"{where}: expected an integer, got {value!r}")
            number: float = value
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SignalError(f"{where}: expected a number, got {value!r}")
            number = float(value)
            value = number
        else:
            if not isinstance(value, str):
                raise SignalError(f"{where}: expected a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise SignalError(f"{where}: {value!r} is not one of {', '.join(self.choices)}")
            return value
        if self.minimum is not None and number < self.minimum:
            raise SignalError(f"{where}: {value!r} is below the minimum {self.minimum}")
        if self.maximum is not None and number > self.maximum:
            raise SignalError(f"{where}: {value!r} is above the maximum {self.maximum}")
        assert isinstance(value, int | float)
        return value


@dataclass(frozen=True)
class SignalInputs:
    """What a signal may read. ``gold`` maps gold output names to arrays of shape
    ``[n_bins, n_ticks]`` (absolute-tick columns, as in ``frame``) or ``[n_bins]``. The trade
    geometry (TP/SL/hold) is there for signals that learn labels from it (ML signals)."""

    frame: SilverFrame
    gold: Mapping[str, np.ndarray]
    tp_ticks: int = 8
    sl_ticks: int = 4
    max_hold_bins: int = 600
    extra: Mapping[str, object] = field(default_factory=dict)


class Signal(Protocol):
    """A named scoring rule: ``score`` returns float64 ``[n_bins]`` (NaN where undefined) and
    must be causal: the score of bin t may use bins up to and including t only (an ML signal's
    score is out-of-sample by construction of its walk-forward)."""

    name: str
    params: tuple[ParamSpec, ...]

    def score(self, inputs: SignalInputs, params: Mapping[str, ParamValue]) -> np.ndarray: ...


_REGISTRY: dict[str, Signal] = {}


def register(signal: Signal) -> Signal:
    """Add a signal; a second signal with the same name is an error."""
    if signal.name in _REGISTRY:
        raise SignalError(f"signal {signal.name!r} is registered twice")
    _REGISTRY[signal.name] = signal
    return signal


def get_signal(name: str) -> Signal:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise SignalError(f"unknown signal {name!r} (known: {known})") from None


def signal_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def validate_params(name: str, params: Mapping[str, object]) -> dict[str, ParamValue]:
    """Every declared parameter, typed, with defaults filled in; anything else is an error."""
    signal = get_signal(name)
    declared = {p.name: p for p in signal.params}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise SignalError(
            f"signal {name!r} has no parameter {', '.join(map(repr, unknown))} "
            f"(parameters: {', '.join(declared) or 'none'})"
        )
    return {
        p.name: p.check(name, params[p.name]) if p.name in params else p.default
        for p in signal.params
    }
