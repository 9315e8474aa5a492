"""A structured, readable diff of two serving snapshots.

Both snapshots are compared in their JSON form, content and lineage (the version ids differ
whenever anything does, so they are left out). Each difference is one :class:`SnapshotChange`
at a path a person can read and a program can follow:

- mappings by key: ``content.signal.params.k_ticks``, ``content.gold.spec.nodes.fast.window``;
- lists of records that name themselves (a ``field`` or ``name`` unique within the list), by
  that name: ``content.stream.silver[field=bid_depth].role``,
  ``lineage.dataset_files[name=x.dbn.zst].sha256``; a change of their order alone is one
  ``reordered`` change listing the names;
- other lists of records by position (``...[2].role``), and lists of plain values whole
  (``content.projection_horizons_bins``: ``[10, 50]`` against ``[10, 100]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qmachina.serving.snapshot import ServingSnapshot

Change = Literal["changed", "added", "removed", "reordered"]
RECORD_KEYS = ("field", "name")
"""What a record in a list is called by, in order of preference."""


@dataclass(frozen=True)
class SnapshotChange:
    """One difference: the value at ``path`` in snapshot ``a`` and in ``b`` (None on the side
    where it is absent: ``added`` exists only in b, ``removed`` only in a)."""

    path: str
    change: Change
    a: Any
    b: Any


def diff_snapshots(a: ServingSnapshot, b: ServingSnapshot) -> list[SnapshotChange]:
    """Every difference between two snapshots' content and lineage, in document order."""
    return diff_values(
        a.model_dump(mode="json", exclude={"version_id"}),
        b.model_dump(mode="json", exclude={"version_id"}),
    )


def diff_values(a: Any, b: Any, path: str = "") -> list[SnapshotChange]:
    """The differences between two JSON values, located under ``path``."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return _diff_mappings(a, b, path)
    if _is_list(a) and _is_list(b):
        return _diff_lists(a, b, path)
    if a == b and type(a) is type(b):  # 1 and 1.0 (or True) are different values in a spec
        return []
    return [SnapshotChange(path, "changed", a, b)]


def _diff_mappings(a: Mapping[str, Any], b: Mapping[str, Any], path: str) -> list[SnapshotChange]:
    changes: list[SnapshotChange] = []
    for key in [*a, *(key for key in b if key not in a)]:
        where = f"{path}.{key}" if path else str(key)
        if key not in b:
            changes.append(SnapshotChange(where, "removed", a[key], None))
        elif key not in a:
            changes.append(SnapshotChange(where, "added", None, b[key]))
        else:
            changes += diff_values(a[key], b[key], where)
    return changes


def _diff_lists(a: Sequence[Any], b: Sequence[Any], path: str) -> list[SnapshotChange]:
    record_key = _record_key(a, b)
    if record_key is not None:
        return _diff_records(a, b, path, record_key)
    if not all(isinstance(item, Mapping) for item in (*a, *b)):
        return [] if _same(a, b) else [SnapshotChange(path, "changed", list(a), list(b))]
    changes: list[SnapshotChange] = []
    for index in range(max(len(a), len(b))):
        where = f"{path}[{index}]"
        if index >= len(b):
            changes.append(SnapshotChange(where, "removed", a[index], None))
        elif index >= len(a):
            changes.append(SnapshotChange(where, "added", None, b[index]))
        else:
            changes += diff_values(a[index], b[index], where)
    return changes


def _diff_records(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], path: str, key: str
) -> list[SnapshotChange]:
    by_name_a = {item[key]: item for item in a}
    by_name_b = {item[key]: item for item in b}
    changes: list[SnapshotChange] = []
    for name in [*by_name_a, *(name for name in by_name_b if name not in by_name_a)]:
        where = f"{path}[{key}={name}]"
        if name not in by_name_b:
            changes.append(SnapshotChange(where, "removed", by_name_a[name], None))
        elif name not in by_name_a:
            changes.append(SnapshotChange(where, "added", None, by_name_b[name]))
        else:
            changes += diff_values(by_name_a[name], by_name_b[name], where)
    kept_a = [name for name in by_name_a if name in by_name_b]
    kept_b = [name for name in by_name_b if name in by_name_a]
    if kept_a != kept_b:
        changes.append(SnapshotChange(path, "reordered", kept_a, kept_b))
    return changes


def _record_key(a: Sequence[Any], b: Sequence[Any]) -> str | None:
    """The key naming every record of both lists, uniquely within each, if there is one."""
    items = [*a, *b]
    if not items or not all(isinstance(item, Mapping) for item in items):
        return None
    for key in RECORD_KEYS:
        if all(isinstance(item.get(key), str) for item in items) and all(
            len({item[key] for item in side}) == len(side) for side in (a, b)
        ):
            return key
    return None


def _is_list(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and not any(diff_values(x, y) for x, y in zip(a, b, strict=True))
