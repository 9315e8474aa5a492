"""Canonical JSON and sha256 identity of specs: equal content, equal hash."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel


def canonical_json(model: BaseModel) -> str:
    """The model's content as canonical JSON: sorted keys, no whitespace, UTF-8 text.

    Every field is included, defaults too, so the identity is that of the effective values.
    Decimals, enums, paths and datetimes appear as strings (pydantic's JSON mode plus the
    models' own serializers); floats use Python's shortest round-trip form, which is the
    same on every platform.
    """
    return json.dumps(
        model.model_dump(mode="json"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def spec_hash(model: BaseModel) -> str:
    """sha256 hex digest of ``canonical_json(model)``."""
    return hashlib.sha256(canonical_json(model).encode("utf-8")).hexdigest()
