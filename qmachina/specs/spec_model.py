"""The base every spec model shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SpecModel(BaseModel):
    """Base of every spec: unknown fields rejected, immutable, and strict about types.

    Strict because YAML is loose: ``bin_width_ms: "100"`` or ``: true`` is a mistake in the
    file, not a number to coerce. Fields that are meant to be parsed from text (decimals,
    local datetimes) opt out of strictness one by one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
