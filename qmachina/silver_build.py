"""Build the silver grid of a pipeline into the lake: one directory per pipeline hash.

The directory holds ``silver.parquet`` and ``manifest.json`` (inputs with sha256, the resolved
spec, schema version, counts), so a later stage can prove what it read. The build writes into a
temporary directory and renames it into place only when it has succeeded: a bad input file fails
with an error naming it and leaves whatever was stored before untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from engine.read_ahead import read_ahead
from engine.replay import replay_files
from engine.silver import SILVER_SCHEMA_VERSION, GridConfig, SilverBuilder
from engine.silver_parquet import SilverParquetWriter
from qmachina.specs.identity import canonical_json
from qmachina.specs.pipeline import ResolvedPipeline

SILVER_FILE = "silver.parquet"
MANIFEST_FILE = "manifest.json"
HASH_CHUNK = 1 << 20


@dataclass
class BuildProgress:
    """What a progress display needs while a build runs."""

    events: int = 0
    bins: int = 0
    files_done: int = 0
    files_total: int = 0


@dataclass(frozen=True)
class InputFile:
    name: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SilverBuildResult:
    """The closing summary of a build."""

    output_dir: Path
    pipeline_hash: str
    events: int
    bins: int
    anomalies: dict[str, int]
    grid_counts: dict[str, int]
    seconds: float
    inputs: tuple[InputFile, ...] = field(default=())

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def grid_config_of(pipeline: ResolvedPipeline) -> GridConfig:
    """The engine's grid parameters from a resolved pipeline."""
    engine = pipeline.engine
    return GridConfig(
        tick_size=pipeline.instrument.tick_size_raw,
        n_absolute_ticks=engine.n_absolute_ticks,
        grid_radius_ticks=engine.grid_radius_ticks,
        bin_width_ns=engine.bin_width_ms * 1_000_000,
        bin_clock=engine.bin_clock,
        tau_rest_decay_s=engine.tau_rest_decay_s,
        tau_velocity_s=engine.tau_velocity_s,
        tau_acceleration_s=engine.tau_acceleration_s,
        tau_jerk_s=engine.tau_jerk_s,
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_silver(
    pipeline: ResolvedPipeline,
    lake_root: Path,
    *,
    on_progress: Callable[[BuildProgress], None] | None = None,
) -> SilverBuildResult:
    """Replay the pipeline's files through book and grid into ``lake_root/<pipeline_hash>/``."""
    started = time.perf_counter()
    paths: Sequence[Path] = pipeline.dataset_paths
    inputs = tuple(InputFile(p.name, sha256_of(p), p.stat().st_size) for p in paths)
    config = grid_config_of(pipeline)
    capture = pipeline.spec.capture
    session = pipeline.session
    lake_root.mkdir(parents=True, exist_ok=True)
    final_dir = lake_root / pipeline.pipeline_hash
    work_dir = Path(tempfile.mkdtemp(prefix=f".{pipeline.pipeline_hash[:12]}-", dir=lake_root))
    progress = BuildProgress(files_total=len(paths))
    try:
        builder = SilverBuilder(config, session_start_ns=session.start_ns if session else None)
        batches = replay_files(
            paths,
            instrument_id=capture.instrument_id,
            raw_symbol=capture.raw_symbol,
            end_ns=session.end_ns if session else None,
        )
        with SilverParquetWriter(work_dir / SILVER_FILE, builder.schema) as writer:
            # Decoding the next batches overlaps with building silver from this one.
            for events in read_ahead(batches):
                for batch in builder.feed(events):
                    writer.write(batch)
                progress.events = builder.events_consumed
                progress.bins = builder.bins_emitted
                if on_progress:
                    on_progress(progress)
            for batch in builder.finish(until_ns=session.end_ns if session else None):
                writer.write(batch)
        progress.bins = builder.bins_emitted
        progress.files_done = len(paths)
        if on_progress:
            on_progress(progress)
        anomalies = builder.book.anomalies()
        manifest = {
            "schema_version": SILVER_SCHEMA_VERSION,
            "pipeline_hash": pipeline.pipeline_hash,
            "pipeline": json.loads(canonical_json(pipeline.identity)),
            "grid_config": json.loads(builder.schema.metadata[b"qmachina.grid_config"]),
            "inputs": [vars(i) for i in inputs],
            "counts": {
                "events": builder.events_consumed,
                "bins": builder.bins_emitted,
                "anomalies": anomalies,
                **builder.grid_counts(),
            },
            "silver_file": SILVER_FILE,
            "silver_sha256": sha256_of(work_dir / SILVER_FILE),
            "code_version": version("qmachina"),
        }
        (work_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # Swap directories so a reader sees either the old build or the new one, never half.
        replaced = lake_root / f".replaced-{work_dir.name}"
        if final_dir.exists():
            final_dir.rename(replaced)
        work_dir.rename(final_dir)
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        if work_dir.exists():
            shutil.rmtree(work_dir)
    return SilverBuildResult(
        output_dir=final_dir,
        pipeline_hash=pipeline.pipeline_hash,
        events=builder.events_consumed,
        bins=builder.bins_emitted,
        anomalies=anomalies,
        grid_counts=builder.grid_counts(),
        seconds=time.perf_counter() - started,
        inputs=inputs,
    )
