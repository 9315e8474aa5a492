"""ServingSpec: what a model is (pipeline, gold spec, signal, scoring) and what it streams.

The stream schema has two sections because silver and gold never share a wire: ``silver`` lists
per-tick silver fields sent as ``grid_update`` frames, ``gold`` lists gold outputs and the signal
score sent as ``gold_update`` frames. Each entry has a role; the roles of the predecessor system
(``index``, ``feature``, ``score``) are still read, through the explicit alias table in
:mod:`qmachina.specs.legacy`, with a deprecation warning.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from qmachina.specs.legacy import map_legacy_stream_role
from qmachina.specs.spec_model import SpecModel

ModelId = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
ConfigReference = Annotated[str, StringConstraints(min_length=1, pattern=r"^[^/].*\.ya?ml$")]
"""A path relative to the configs root, e.g. ``pipelines/es_default.yaml``."""
ParamScalar = int | float | bool | str

SIGNAL_SCORE_FIELD = "score"
"""The name under which the signal's score travels on the gold wire."""


class StreamRole(StrEnum):
    """What a streamed field means to a consumer (the browser picks colour scales by it)."""

    GRID_INDEX = "grid_index"
    DEPTH = "depth"
    MASS = "mass"
    FORCE = "force"
    VELOCITY = "velocity"
    ACCELERATION = "acceleration"
    JERK = "jerk"
    STATE = "state"
    SIGNAL = "signal"


class StreamField(SpecModel):
    """One streamed field and its role."""

    field: Annotated[str, StringConstraints(min_length=1)]
    role: Annotated[StreamRole, Field(strict=False)]  # enum values are read from YAML text

    @model_validator(mode="before")
    @classmethod
    def _legacy_role(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("role"), str):
            mapped = map_legacy_stream_role(data["role"], str(data.get("field", "")))
            if mapped is not None:
                return {**data, "role": mapped}
        return data


class StreamSchema(SpecModel):
    """The fields a serving version streams, per wire."""

    silver: tuple[StreamField, ...] = Field(default=(), strict=False)
    gold: tuple[StreamField, ...] = Field(default=(), strict=False)

    @model_validator(mode="after")
    def _each_field_once(self) -> StreamSchema:
        for wire in ("silver", "gold"):
            names = [entry.field for entry in getattr(self, wire)]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{wire} lists {', '.join(repeated)} more than once")
        return self


class SignalChoice(SpecModel):
    """The signal by registry name with its parameters (checked against the registry)."""

    name: Annotated[str, StringConstraints(min_length=1)]
    params: dict[str, ParamScalar] = Field(default_factory=dict)


class Scoring(SpecModel):
    """How the score turns into decisions: the firing threshold on the score."""

    threshold: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    side: Literal["both", "long", "short"] = "both"


class Visualization(SpecModel):
    """Display hints for the browser; they never change what is computed."""

    colormap: Literal["diverging", "sequential"] = "diverging"
    grid_field: str | None = None
    show_signal: bool = True


class ServingSpec(SpecModel):
    """A model as it will serve: every reference resolved and checked by the config validator."""

    model_id: ModelId
    pipeline: ConfigReference
    gold: ConfigReference
    signal: SignalChoice
    scoring: Scoring
    projection_horizons_bins: tuple[Annotated[int, Field(gt=0)], ...] = Field(
        default=(), strict=False
    )
    stream: StreamSchema
    visualization: Visualization = Visualization()

    @field_validator("projection_horizons_bins")
    @classmethod
    def _increasing(cls, horizons: tuple[int, ...]) -> tuple[int, ...]:
        if list(horizons) != sorted(set(horizons)):
            raise ValueError("horizons must be strictly increasing")
        return horizons
