"""Instrument configs (``configs/instruments/*.yaml``) and the engine settings they carry."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from qmachina.specs.spec_model import SpecModel
from qmachina.specs.yaml_loader import load_spec

DBN_PRICE_SCALE = 1_000_000_000
"""DBN prices are int64 in units of 1e-9."""

_DECIMAL_TEXT = re.compile(r"[+-]?\d+(\.\d+)?")


def _exact_decimal(value: object) -> Decimal:
    """Parse a decimal written as text (or an integer) without passing through binary floats."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} is not a finite decimal")
        return _without_trailing_zeros(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, float):
        raise ValueError(f"write {value!r} as a quoted decimal string ('{value!r}') so it is exact")
    if isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value.strip()):
        return _without_trailing_zeros(Decimal(value.strip()))
    raise ValueError(
        f"expected a decimal number written as a string, such as '0.25'; got {value!r}"
    )


def _without_trailing_zeros(value: Decimal) -> Decimal:
    """``0.250`` → ``0.25`` and ``5E+1`` → ``50``, exactly (``normalize`` rounds to context)."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, checked by the caller
    if not any(digits):
        return Decimal((sign, (0,), 0))
    if exponent > 0:
        digits, exponent = (*digits, *(0,) * exponent), 0
    while exponent < 0 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    return Decimal((sign, digits, exponent))


def _plain_decimal_text(value: Decimal) -> str:
    return format(value, "f")


ExactDecimal = Annotated[
    Decimal,
    BeforeValidator(_exact_decimal),
    PlainSerializer(_plain_decimal_text, return_type=str, when_used="json"),
]
"""A decimal given as text (``"0.25"``) or an integer, serialised as plain decimal text."""

Token = Annotated[str, StringConstraints(min_length=1, pattern=r"^\S+$")]
"""A non-empty name without whitespace (symbols, venues)."""

InstrumentId = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""Databento's numeric instrument id (uint32)."""

PositiveTicks = Annotated[int, Field(gt=0)]
BinWidthMs = Annotated[int, Field(gt=0)]
BinClock = Literal["ts_event", "ts_recv"]
DecaySeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def scaled_to_integer(value: Decimal, scale: int) -> int | None:
    """``value * scale`` when it is a whole number, else None (exact integer arithmetic)."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    magnitude = int("".join(map(str, digits))) * scale
    power: int = 10 ** abs(exponent)
    if exponent >= 0:
        whole = magnitude * power
    else:
        whole, remainder = divmod(magnitude, power)
        if remainder:
            return None
    return -whole if sign else whole


class _EngineFields(SpecModel):
    """The knobs of the book → silver engine; shared by instruments, overrides and settings."""

    bin_width_ms: BinWidthMs = 100
    bin_clock: BinClock = "ts_event"
    n_absolute_ticks: PositiveTicks
    grid_radius_ticks: PositiveTicks
    tau_rest_decay_s: DecaySeconds = 1.0
    tau_velocity_s: DecaySeconds = 0.5
    tau_acceleration_s: DecaySeconds = 1.0
    tau_jerk_s: DecaySeconds = 2.0

    @field_validator("grid_radius_ticks")
    @classmethod
    def _radius_leaves_room_to_reanchor(cls, radius: int, info: ValidationInfo) -> int:
        n_absolute_ticks = info.data.get("n_absolute_ticks")
        if n_absolute_ticks is not None and 4 * radius + 2 > n_absolute_ticks:
            raise ValueError(
                f"grid_radius_ticks ({radius}) needs n_absolute_ticks >= 4 * radius + 2 "
                f"({4 * radius + 2}), got {n_absolute_ticks}: the grid around spot must stay a "
                "radius inside the absolute tick window, with room to re-anchor"
            )
        return radius

    @property
    def bin_width_ns(self) -> int:
        """Bin width in nanoseconds, the unit of DBN timestamps."""
        return self.bin_width_ms * 1_000_000


class EngineSettings(_EngineFields):
    """The effective engine settings of a pipeline: the instrument's, with overrides applied."""


class EngineOverrides(SpecModel):
    """A pipeline's changes to its instrument's engine settings; unset fields keep theirs."""

    bin_width_ms: BinWidthMs | None = None
    bin_clock: BinClock | None = None
    n_absolute_ticks: PositiveTicks | None = None
    grid_radius_ticks: PositiveTicks | None = None
    tau_rest_decay_s: DecaySeconds | None = None
    tau_velocity_s: DecaySeconds | None = None
    tau_acceleration_s: DecaySeconds | None = None
    tau_jerk_s: DecaySeconds | None = None

    def values(self) -> dict[str, object]:
        """The overridden fields only."""
        return self.model_dump(exclude_none=True)


class _ContractFields(SpecModel):
    """What the exchange defines: symbol, venue, clock, tick and multiplier."""

    symbol: Token
    instrument_id: InstrumentId | None = None
    venue: Token
    timezone: str
    price_scale: Annotated[int, Field(gt=0)] = DBN_PRICE_SCALE
    # After price_scale: its validator checks the tick against the scale.
    tick_size: Annotated[ExactDecimal, Field(gt=0)]
    contract_multiplier: Annotated[ExactDecimal, Field(gt=0)]

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown timezone {name!r}; use an IANA name such as 'America/Chicago'"
            ) from None
        return name

    @field_validator("tick_size")
    @classmethod
    def _tick_is_whole_price_units(cls, tick_size: Decimal, info: ValidationInfo) -> Decimal:
        price_scale = info.data.get("price_scale")
        if price_scale is not None and scaled_to_integer(tick_size, price_scale) is None:
            raise ValueError(
                f"tick size {_plain_decimal_text(tick_size)} is not a whole number of price "
                f"units at price_scale {price_scale} "
                "(tick_size * price_scale = "
                f"{_plain_decimal_text(_without_trailing_zeros(tick_size * price_scale))})"
            )
        return tick_size


class InstrumentConfig(_EngineFields, _ContractFields):
    """One tradable instrument and the engine settings it is replayed with by default."""

    @property
    def tick_size_raw(self) -> int:
        """The tick size in fixed-point price units (tick_size * price_scale)."""
        raw = scaled_to_integer(self.tick_size, self.price_scale)
        assert raw is not None  # validated
        return raw

    @property
    def price_decimals(self) -> int:
        """Decimals needed to print a price on the tick grid (2 for a 0.25 tick)."""
        exponent = self.tick_size.as_tuple().exponent
        assert isinstance(exponent, int)
        return max(0, -exponent)

    @property
    def zone(self) -> ZoneInfo:
        """The exchange's timezone, in which session times are written."""
        return ZoneInfo(self.timezone)

    def engine_settings(self) -> EngineSettings:
        """The engine fields of this instrument on their own."""
        return EngineSettings.model_validate(
            {name: getattr(self, name) for name in EngineSettings.model_fields}
        )

    def with_engine_overrides(self, overrides: EngineOverrides) -> InstrumentConfig:
        """This instrument with overridden engine fields, validated again as a whole."""
        return InstrumentConfig.model_validate({**self.model_dump(), **overrides.values()})


def load_instrument_config(path: str | Path) -> InstrumentConfig:
    """Load and validate one instrument config YAML file."""
    return load_spec(path, InstrumentConfig)
