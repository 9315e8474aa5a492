"""ExperimentSpec: a serving spec swept over parameters on a dataset.

Every evaluation setting may be a scalar or a list (a sweep axis); sweep axes also cover the
scoring threshold and the signal's own parameters, each value checked against the signal
registry by the config validator.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from qmachina.specs.serving import ConfigReference, ParamScalar
from qmachina.specs.spec_model import SpecModel

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


def _as_axis(value: object) -> tuple[object, ...]:
    """A scalar is an axis of one value."""
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _distinct(values: tuple[object, ...]) -> tuple[object, ...]:
    if not values:
        raise ValueError("an axis needs at least one value")
    repeated = sorted({repr(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"repeated values: {', '.join(repeated)}")
    return values


class EvalAxes(SpecModel):
    """Trade geometry; each field is a value or a list of values to sweep."""

    tp_ticks: tuple[PositiveInt, ...] = Field(strict=False)
    sl_ticks: tuple[PositiveInt, ...] = Field(strict=False)
    max_hold_bins: tuple[PositiveInt, ...] = Field(strict=False)
    warmup_bins: tuple[NonNegativeInt, ...] = Field(default=(0,), strict=False)
    cooldown_bins: tuple[NonNegativeInt, ...] = Field(default=(0,), strict=False)

    @field_validator("*", mode="before")
    @classmethod
    def _scalar_or_list(cls, value: object) -> object:
        return _as_axis(value)

    @field_validator("*")
    @classmethod
    def _no_repeats(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        _distinct(tuple(values))
        return values


class SweepAxes(SpecModel):
    """Axes over scoring and over the signal's parameters (names checked by the validator)."""

    threshold: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...] = Field(
        default=(), strict=False
    )
    signal_params: dict[str, tuple[ParamScalar, ...]] = Field(default_factory=dict, strict=False)

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_axis(cls, value: object) -> object:
        return _as_axis(value)

    @field_validator("signal_params", mode="before")
    @classmethod
    def _param_axes(cls, value: object) -> object:
        if isinstance(value, dict):
            return {name: _as_axis(values) for name, values in value.items()}
        return value

    @field_validator("signal_params")
    @classmethod
    def _param_axes_distinct(
        cls, axes: dict[str, tuple[ParamScalar, ...]]
    ) -> dict[str, tuple[ParamScalar, ...]]:
        for values in axes.values():
            _distinct(tuple(values))
        return axes


class Dataset(SpecModel):
    """The pipelines whose silver the sweep evaluates (default: the serving spec's own)."""

    pipelines: tuple[ConfigReference, ...] = Field(default=(), strict=False)
    train_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.6
    """Thresholds are chosen on the first part of each dataset and reported on the rest."""


class Parallelism(SpecModel):
    chunk_points: PositiveInt = 100
    max_concurrent_chunks: PositiveInt = 2


class Tracking(SpecModel):
    mlflow: bool = True
    experiment_name: Annotated[str, StringConstraints(min_length=1)] | None = None


class ExperimentSpec(SpecModel):
    """A sweep: a serving spec over a dataset and axes, with its parallelism and tracking."""

    name: Annotated[
        str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][\w.-]*$")
    ]
    serving: ConfigReference
    dataset: Dataset = Dataset()
    eval: EvalAxes
    sweep: SweepAxes = SweepAxes()
    parallelism: Parallelism = Parallelism()
    tracking: Tracking = Tracking()
    objective: Literal["total_pnl_ticks", "mean_pnl_ticks", "hit_rate"] = "total_pnl_ticks"

    @model_validator(mode="after")
    def _bounded(self) -> ExperimentSpec:
        points = (
            len(self.eval.tp_ticks)
            * len(self.eval.sl_ticks)
            * len(self.eval.max_hold_bins)
            * len(self.eval.warmup_bins)
            * len(self.eval.cooldown_bins)
            * max(1, len(self.sweep.threshold))
            * max(1, len(self.dataset.pipelines))
        )
        for values in self.sweep.signal_params.values():
            points *= len(values)
        if points > MAX_SWEEP_POINTS:
            raise ValueError(
                f"the sweep expands to {points:,} points; at most {MAX_SWEEP_POINTS:,} are allowed"
            )
        return self


MAX_SWEEP_POINTS = 100_000
