"""The silver and gold a worker process evaluated last, shared by every chunk it runs.

A sweep's chunks all read the same dataset with the same gold spec; loading the silver and
computing the gold once per worker process instead of once per chunk takes that work off every
chunk after the first. The lake is content-addressed (a pipeline hash names immutable silver), so
a cached frame can never be stale. One dataset is held at a time to bound memory.
"""

from __future__ import annotations

import threading
from pathlib import Path

from engine.gold.graph import GoldGraph
from engine.gold.runtime import GoldFrame, run_gold
from engine.silver_frame import SilverFrame
from qmachina.experiment_run import silver_frame_of
from qmachina.specs.pipeline import ResolvedPipeline

SilverKey = tuple[str, str]
"""(lake root, pipeline hash)."""


class LakeFrames:
    """Thread-safe: chunks evaluate in worker threads; a second chunk needing the frame being
    loaded waits for it instead of loading it again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._silver_key: SilverKey | None = None
        self._silver: SilverFrame | None = None
        self._gold_hash: str | None = None
        self._gold: GoldFrame | None = None

    def silver(self, pipeline: ResolvedPipeline, lake_root: Path) -> SilverFrame:
        """The pipeline's silver, read from the lake unless it is the one held."""
        key = (str(lake_root.resolve()), pipeline.pipeline_hash)
        with self._lock:
            if self._silver_key != key or self._silver is None:
                # Drop the old dataset before reading the new one: one in memory at a time.
                self._silver_key, self._silver = None, None
                self._gold_hash, self._gold = None, None
                self._silver = silver_frame_of(pipeline, lake_root)
                self._silver_key = key
            return self._silver

    def gold(self, gold_hash: str, graph: GoldGraph, silver: SilverFrame) -> GoldFrame:
        """The gold of ``graph`` (canonical hash ``gold_hash``) over ``silver``, computed unless
        it is the one held for that silver."""
        with self._lock:
            if silver is not self._silver:
                return run_gold(graph, silver)  # not the held silver: nothing to share
            if self._gold_hash != gold_hash or self._gold is None:
                self._gold_hash, self._gold = None, None
                self._gold = run_gold(graph, silver)
                self._gold_hash = gold_hash
            return self._gold
