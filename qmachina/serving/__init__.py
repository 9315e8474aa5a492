"""The serving registry's domain: immutable serving snapshots addressed by their content, and
structured diffs between them. The store keeps them (:mod:`qmachina.store.serving_registry`)."""

from qmachina.serving.diff import SnapshotChange, diff_snapshots
from qmachina.serving.snapshot import (
    CodeVersion,
    DatasetFile,
    Lineage,
    LineageError,
    RunSource,
    ServingContent,
    ServingSnapshot,
    UnservableSnapshotError,
    check_servable,
    snapshot_from_run,
    snapshot_from_spec,
    version_id_of,
)

__all__ = [
    "CodeVersion",
    "DatasetFile",
    "Lineage",
    "LineageError",
    "RunSource",
    "ServingContent",
    "ServingSnapshot",
    "SnapshotChange",
    "UnservableSnapshotError",
    "check_servable",
    "diff_snapshots",
    "snapshot_from_run",
    "snapshot_from_spec",
    "version_id_of",
]
