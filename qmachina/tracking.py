"""MLflow tracking of a sweep: a parent run per sweep, a child run per sweep point.

The SQL results store stays the source of truth; this is a view of it for the MLflow UI, written
off the evaluation path, after the points are evaluated. Each child run carries

- params: ``dataset``, ``signal``, ``signal.<name>`` per signal parameter, ``threshold``,
  ``tp_ticks``, ``sl_ticks``, ``cooldown_bins``, ``max_hold_bins``, ``warmup_bins``, ``point_hash``;
- metrics: ``train_<metric>`` and ``test_<metric>``; a NaN metric (e.g. the hit rate of a span
  without trades) is not logged, since MLflow sorts and plots NaN as a number. The leaderboard
  artifact keeps it, as ``null``;
- tags: ``mlflow.parentRunId`` and ``qmachina.point_hash``.

Logging is idempotent: :meth:`SweepTracker.log_points` skips points whose child run already
finished and completes the ones a crash left running, so a retried activity creates no
duplicates. On a SQLite store a child run costs ~25-35 ms, bound by SQLite's commits (six per
run); threads gain little there (22-40 ms with four, measured), they are for a tracking server
reached over HTTP (``workers``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.tracking import MlflowClient

from engine.sweep_core import SweepPoint
from qmachina.silver_build import MANIFEST_FILE, SILVER_FILE

PARENT_TAG = "mlflow.parentRunId"
POINT_HASH_TAG = "qmachina.point_hash"
SWEEP_KEY_TAG = "qmachina.sweep_key"
LEADERBOARD_FILE = "leaderboard.json"
LAKE_REFS_FILE = "lake_refs.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PAGE = 10_000


class PointResult(Protocol):
    """One evaluated sweep point (e.g. :class:`qmachina.experiment_run.LeaderboardRow`)."""

    @property
    def point(self) -> SweepPoint: ...
    @property
    def train(self) -> Mapping[str, float]: ...
    @property
    def test(self) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class SilverRef:
    """A silver or gold table a sweep read from the lake, with the checksum that proves which."""

    layer: Literal["silver", "gold"]
    key: str  # the pipeline hash (silver) or gold spec hash (gold)
    path: str
    sha256: str

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"SilverRef {self.path}: sha256 must be 64 lowercase hex digits")


class TrackingError(RuntimeError):
    """The tracker was used out of order (e.g. points logged before a parent run exists)."""


def point_params(point: SweepPoint) -> dict[str, str]:
    """A child run's params: the point's fields, its signal params as ``signal.<name>``."""
    params = {
        "dataset": point.dataset,
        "signal": point.signal,
        "threshold": repr(point.threshold),
        "tp_ticks": str(point.tp_ticks),
        "sl_ticks": str(point.sl_ticks),
        "cooldown_bins": str(point.cooldown_bins),
        "max_hold_bins": str(point.max_hold_bins),
        "warmup_bins": str(point.warmup_bins),
        "point_hash": point.point_hash,
    }
    params.update({f"signal.{name}": str(value) for name, value in point.signal_params})
    return params


def point_metrics(row: PointResult) -> dict[str, float]:
    """A child run's metrics: ``train_*`` and ``test_*``, NaN left out."""
    metrics: dict[str, float] = {}
    for span, values in (("train", row.train), ("test", row.test)):
        metrics.update(
            {f"{span}_{name}": float(v) for name, v in values.items() if not math.isnan(v)}
        )
    return metrics


def _json_metrics(values: Mapping[str, float]) -> dict[str, float | None]:
    return {name: None if math.isnan(v) else v for name, v in values.items()}


def leaderboard_document(rows: Sequence[PointResult]) -> dict[str, object]:
    """The leaderboard artifact: rows in the given (ranked) order, NaN as ``null``."""
    return {
        "rows": [
            {
                "rank": rank,
                "point_hash": row.point.point_hash,
                "params": point_params(row.point),
                "train": _json_metrics(row.train),
                "test": _json_metrics(row.test),
            }
            for rank, row in enumerate(rows, start=1)
        ]
    }


class SweepTracker:
    """Logs one sweep to MLflow: :meth:`start` (or ``parent_run_id=`` to continue one started
    elsewhere), :meth:`log_points` in any number of chunks, the artifacts, then :meth:`finish`."""

    def __init__(
        self,
        tracking_uri: str,
        artifact_root: Path,
        *,
        parent_run_id: str | None = None,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.artifact_root = artifact_root
        self.workers = workers
        self._parent: Run | None = None
        self._logged: set[str] | None = None  # point hashes with a finished child run
        self._unfinished: dict[str, str] = {}  # point hash -> child run a crash left running
        if parent_run_id is not None:
            self._parent = self.client.get_run(parent_run_id)

    @property
    def parent_run_id(self) -> str:
        return str(self._require_parent().info.run_id)

    def _require_parent(self) -> Run:
        if self._parent is None:
            raise TrackingError("no parent run: call start() or pass parent_run_id=")
        return self._parent

    def _experiment_id(self, experiment_name: str) -> str:
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            return str(experiment.experiment_id)
        return self.client.create_experiment(
            experiment_name, artifact_location=self.artifact_root.resolve().as_uri()
        )

    def start(
        self,
        experiment_name: str,
        spec_hashes: Mapping[str, str],
        params: Mapping[str, object],
        *,
        sweep_key: str | None = None,
    ) -> str:
        """Create the sweep's parent run (tags ``spec.<kind>`` = hash) and return its id.

        With ``sweep_key`` (e.g. the workflow id) a retried start returns the parent run
        already created for that key instead of a second one.
        """
        if sweep_key is not None and "'" in sweep_key:
            raise ValueError(f"sweep_key must not contain a quote: {sweep_key!r}")
        experiment_id = self._experiment_id(experiment_name)
        self._parent, self._logged = None, None
        if sweep_key is not None:
            found = self.client.search_runs(
                [experiment_id], f"tags.`{SWEEP_KEY_TAG}` = '{sweep_key}'", max_results=1
            )
            self._parent = found[0] if found else None
        if self._parent is None:
            tags = {f"spec.{kind}": value for kind, value in spec_hashes.items()}
            if sweep_key is not None:
                tags[SWEEP_KEY_TAG] = sweep_key
            self._parent = self.client.create_run(
                experiment_id, tags=tags, run_name=experiment_name
            )
        # Logged on a found parent too: a crash may have come before; equal values are no-ops.
        self.client.log_batch(
            self.parent_run_id, params=[Param(k, str(v)) for k, v in params.items()]
        )
        return self.parent_run_id

    def _children(self) -> list[Run]:
        parent = self._require_parent()
        runs: list[Run] = []
        token: str | None = None
        while True:
            page = self.client.search_runs(
                [parent.info.experiment_id],
                f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                max_results=_PAGE,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def log_points(self, rows: Iterable[PointResult]) -> int:
        """One child run per point not logged yet; returns how many were written.

        The first call of a tracker reads the existing children once (a retried activity), a
        child left running by a crash is completed rather than duplicated.
        """
        parent = self._require_parent()
        if self._logged is None:
            self._logged = set()
            self._unfinished = {}
            for child in self._children():
                point_hash = child.data.tags.get(POINT_HASH_TAG, "")
                if child.info.status == RunStatus.to_string(RunStatus.FINISHED):
                    self._logged.add(point_hash)
                else:
                    self._unfinished[point_hash] = child.info.run_id
        todo = {row.point.point_hash: row for row in rows}
        pending = [row for key, row in todo.items() if key not in self._logged]

        def log_child(row: PointResult) -> str:
            point_hash = row.point.point_hash
            run_id = self._unfinished.get(point_hash)
            if run_id is None:
                run_id = self.client.create_run(
                    parent.info.experiment_id,
                    tags={PARENT_TAG: parent.info.run_id, POINT_HASH_TAG: point_hash},
                    run_name=f"{row.point.signal}-{point_hash[:12]}",
                ).info.run_id
            now = int(time.time() * 1000)
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, v, now, 0) for k, v in point_metrics(row).items()],
                params=[Param(k, v) for k, v in point_params(row.point).items()],
            )
            self.client.set_terminated(run_id)
            return point_hash

        try:
            if self.workers == 1:
                done = [log_child(row) for row in pending]
            else:
                with ThreadPoolExecutor(self.workers) as pool:
                    done = list(pool.map(log_child, pending))
        except BaseException:
            self._logged = None  # some children may exist now: read them again next time
            raise
        self._logged.update(done)
        for point_hash in done:
            self._unfinished.pop(point_hash, None)
        return len(done)

    def log_leaderboard(self, rows: Sequence[PointResult]) -> None:
        """The ranked leaderboard as ``leaderboard.json`` on the parent run."""
        self.client.log_dict(self.parent_run_id, leaderboard_document(rows), LEADERBOARD_FILE)

    def log_silver_refs(self, refs: Sequence[SilverRef]) -> None:
        """The silver and gold the sweep read, with checksums, as ``lake_refs.json``."""
        document = {
            "refs": [
                {"layer": r.layer, "key": r.key, "path": r.path, "sha256": r.sha256} for r in refs
            ]
        }
        self.client.log_dict(self.parent_run_id, document, LAKE_REFS_FILE)

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """Close the parent run."""
        self.client.set_terminated(self.parent_run_id, status=status)


def silver_ref(lake_dir: Path, pipeline_hash: str) -> SilverRef:
    """The reference to a pipeline's silver in the lake, checksum taken from its manifest."""
    directory = lake_dir / pipeline_hash
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    path = directory / manifest.get("silver_file", SILVER_FILE)
    return SilverRef("silver", pipeline_hash, str(path), manifest["silver_sha256"])
