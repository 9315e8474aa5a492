"""Explicit alias tables for values written by the predecessor system.

Nothing legacy is accepted silently: every mapping is listed here, tested, and announced with a
``DeprecationWarning`` that says what to write instead.
"""

from __future__ import annotations

import warnings

LEGACY_STREAM_ROLES = ("index", "feature", "score")

_FEATURE_ROLE_BY_SUFFIX = {"_v": "velocity", "_a": "acceleration", "_j": "jerk"}


def map_legacy_stream_role(role: str, field: str) -> str | None:
    """The current role for a legacy stream role, or None when ``role`` is not legacy.

    ``index`` → ``grid_index``; ``score`` → ``signal``; ``feature`` → ``velocity``,
    ``acceleration`` or ``jerk`` for a field ending in ``_v``, ``_a`` or ``_j``, else ``force``.
    """
    if role not in LEGACY_STREAM_ROLES:
        return None
    if role == "index":
        mapped = "grid_index"
    elif role == "score":
        mapped = "signal"
    else:
        mapped = _FEATURE_ROLE_BY_SUFFIX.get(field[-2:], "force")
    warnings.warn(
        f"stream role {role!r} (field {field!r}) is deprecated; write role: {mapped}",
        DeprecationWarning,
        stacklevel=2,
    )
    return mapped
