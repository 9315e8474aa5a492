"""Previews for the first two modeling steps: the silver a pipeline gives, and gold over it.

Sections arrive as plain mappings, the content of a spec file. A pipeline section resolves
exactly like a pipeline file (it is written to a scratch file and read by ``resolve_pipeline``,
so defaults, overrides, the instrument reference and the hash are the same), and its silver comes
from the lake under its pipeline hash: built there first when missing, read back otherwise. Both
functions block for the length of a build or a gold run; callers in an event loop run them in a
worker thread. Results are pydantic models of plain JSON values (a missing number is ``None``).
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict

from engine.gold.graph import Kind
from engine.gold.preview import window_mask
from engine.gold.runtime import run_gold
from engine.replay import ReplayError
from engine.silver import BIN_FIELDS, SILVER_SCHEMA_VERSION
from engine.silver_frame import SilverFrame
from qmachina.silver_build import MANIFEST_FILE, SILVER_FILE, build_silver
from qmachina.specs.errors import SpecError, SpecIssue
from qmachina.specs.gold import GoldSpec, SourceOp, validate_gold_document
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import ResolvedPipeline, resolve_pipeline
from qmachina.specs.yaml_loader import YamlDocument

PIPELINE_SECTION = "pipeline"
GOLD_SECTION = "gold"
DEFAULT_SAMPLES = 20

# Bin-level columns a sample shows, and per-tick depth columns it totals over the window.
_SAMPLE_COLUMNS = (
    "bin_start_ns",
    "event_count",
    "best_bid",
    "best_ask",
    "spot",
    "book_valid",
    "bbo_labels_valid",
    "window_ticks",
)
_DEPTH_COLUMNS = ("rest_depth", "bid_depth", "ask_depth")


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SilverBinSample(_Result):
    """One bin of silver; prices are decimals, ``None`` where the book had no such price."""

    bin_index: int
    bin_start_ns: int
    spot: float | None
    best_bid: float | None
    best_ask: float | None
    book_valid: bool
    bbo_labels_valid: bool
    event_count: int
    window_ticks: int
    resting_depth: int
    """Total resting size over the bin's silver window, both sides."""
    bid_depth: int
    ask_depth: int


class SilverPreview(_Result):
    """A pipeline's silver at a glance: its extent and bins sampled across the whole session."""

    pipeline_hash: str
    silver_built: bool
    """True when this call built the silver (it was not in the lake yet)."""
    events: int
    bins_total: int
    bin_width_ms: int
    first_bin_start_ns: int
    last_bin_start_ns: int
    ticks_per_bin: int
    """The widest silver window: ``2 * grid_radius_ticks + 1`` ticks around spot."""
    valid_bins: int
    """Bins whose book was valid at the bin end."""
    samples: list[SilverBinSample]


class OutputStats(_Result):
    """Distribution of one gold output where silver has data.

    ``count`` is every cell inside the bins' silver windows (a grid output) or every bin (a
    series output); ``finite`` of them hold a number, and the statistics are over those
    (population std; quantiles by linear interpolation), ``None`` when there are none.
    """

    output: str
    kind: Literal["grid", "series"]
    count: int
    finite: int
    mean: float | None
    std: float | None
    min: float | None
    p05: float | None
    p50: float | None
    p95: float | None
    max: float | None


class GoldPreview(_Result):
    """Statistics of every gold output, in the spec's output order."""

    pipeline_hash: str
    gold_hash: str
    silver_built: bool
    bins: int
    """Bins the gold ran over: the first ``max_bins`` of the session, or all of them."""
    bins_total: int
    outputs: list[OutputStats]


class PreviewError(ValueError):
    """A section that does not validate, or data the preview needs that is missing or unreadable.

    ``issues`` locate each problem: ``file`` is the section name (``pipeline``, ``gold``) or the
    file at fault, ``field`` the path inside it.
    """

    def __init__(self, issues: Iterable[SpecIssue]) -> None:
        self.issues: tuple[SpecIssue, ...] = tuple(issues)
        if not self.issues:
            raise ValueError("PreviewError needs at least one issue")
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @classmethod
    def single(cls, file: str, field: str, message: str) -> PreviewError:
        return cls([SpecIssue(file=file, line=None, field=field, message=message)])


# --------------------------------------------------------------------------- public functions


def preview_silver(
    pipeline: Mapping[str, object],
    *,
    configs_root: Path,
    data_root: Path,
    lake_root: Path,
    samples: int = DEFAULT_SAMPLES,
) -> SilverPreview:
    """Silver of the pipeline (from the lake, built there first if missing); ``samples`` bins
    evenly spaced over the whole session, the first and the last included."""
    if samples < 2:
        raise ValueError(f"samples must be at least 2 (first and last bin), got {samples}")
    resolved = resolve_pipeline_section(pipeline, configs_root=configs_root, data_root=data_root)
    directory, built = ensure_silver(resolved, lake_root)
    manifest = _manifest(directory)
    parquet = _open_silver(_silver_file(directory, manifest))
    bins = parquet.read(columns=list(_SAMPLE_COLUMNS))
    total = bins.num_rows
    if total == 0:
        raise _no_bins(resolved)
    indices = evenly_spaced(total, samples)
    chosen = bins.take(pa.array(indices))
    depths = parquet.read(columns=list(_DEPTH_COLUMNS)).take(pa.array(indices))
    scale = resolved.instrument.price_scale
    starts = bins["bin_start_ns"]
    return SilverPreview(
        pipeline_hash=resolved.pipeline_hash,
        silver_built=built,
        events=int(manifest.get("counts", {}).get("events", 0)),
        bins_total=total,
        bin_width_ms=resolved.engine.bin_width_ms,
        first_bin_start_ns=starts[0].as_py(),
        last_bin_start_ns=starts[total - 1].as_py(),
        ticks_per_bin=2 * resolved.engine.grid_radius_ticks + 1,
        valid_bins=int(np.count_nonzero(bins["book_valid"].to_numpy(zero_copy_only=False))),
        samples=[
            _bin_sample(index, row, depth, scale)
            for index, row, depth in zip(
                indices, chosen.to_pylist(), _depth_totals(depths), strict=True
            )
        ],
    )


def preview_gold(
    pipeline: Mapping[str, object],
    gold: Mapping[str, object],
    *,
    configs_root: Path,
    data_root: Path,
    lake_root: Path,
    max_bins: int | None = None,
) -> GoldPreview:
    """Distribution statistics of every gold output over the pipeline's silver (every cell of
    the silver windows for a per-tick output, every bin for a per-bin output).

    With ``max_bins`` only the session's first bins are used; windows fill up from bin 0 either
    way, as they do in a sweep."""
    if max_bins is not None and max_bins < 1:
        raise ValueError(f"max_bins must be at least 1, got {max_bins}")
    gold_spec = validate_gold_section(gold)  # cheap: fail on it before any build
    resolved = resolve_pipeline_section(pipeline, configs_root=configs_root, data_root=data_root)
    directory, built = ensure_silver(resolved, lake_root)
    parquet = _open_silver(_silver_file(directory, _manifest(directory)))
    total = parquet.metadata.num_rows
    if total == 0:
        raise _no_bins(resolved)
    frame = _silver_frame(parquet, gold_spec, resolved.instrument.tick_size_raw, max_bins)
    frame_gold = run_gold(gold_spec.graph(), frame)
    inside = window_mask(frame)
    outputs = []
    for name, values in frame_gold.outputs.items():
        kind = frame_gold.kinds[name]
        outputs.append(output_stats(name, kind, values[inside] if kind is Kind.GRID else values))
    return GoldPreview(
        pipeline_hash=resolved.pipeline_hash,
        gold_hash=spec_hash(gold_spec),
        silver_built=built,
        bins=frame.n_bins,
        bins_total=total,
        outputs=outputs,
    )


# ------------------------------------------------------------------------------ the sections


def resolve_pipeline_section(
    pipeline: Mapping[str, object], *, configs_root: Path, data_root: Path
) -> ResolvedPipeline:
    """Resolve a pipeline section as ``resolve_pipeline`` resolves a file; every dataset file
    must exist. Problems are a ``PreviewError`` whose issues name the section's fields."""
    if not isinstance(pipeline, Mapping):
        raise PreviewError.single(
            PIPELINE_SECTION, "", f"expected a mapping of fields, got {type(pipeline).__name__}"
        )
    try:
        text = yaml.safe_dump(dict(pipeline), sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as exc:
        raise PreviewError.single(
            PIPELINE_SECTION, "", f"not plain JSON-like data: {exc}"
        ) from None
    # resolve_pipeline reads a file; a scratch copy keeps it the one code path for both.
    with tempfile.TemporaryDirectory(prefix="qmachina-preview-") as scratch:
        spec_file = Path(scratch) / "pipeline.yaml"
        spec_file.write_text(text, encoding="utf-8")
        try:
            return resolve_pipeline(spec_file, configs_root, data_root)
        except SpecError as exc:
            raise _section_error(exc, str(spec_file), PIPELINE_SECTION) from None


def validate_gold_section(gold: Mapping[str, object]) -> GoldSpec:
    """Validate a gold section into a GoldSpec; problems name the section's fields."""
    document = YamlDocument(file=GOLD_SECTION, data=gold, lines={})
    try:
        return validate_gold_document(document)
    except SpecError as exc:
        raise _section_error(exc, GOLD_SECTION, GOLD_SECTION) from None


def _section_error(error: SpecError, file: str, section: str) -> PreviewError:
    """The issues of ``file`` reported against ``section``, without lines (a section has none);
    issues of other files (the instrument config) keep theirs."""
    return PreviewError(
        SpecIssue(file=section, line=None, field=issue.field, message=issue.message)
        if issue.file == file
        else issue
        for issue in error.issues
    )


# ------------------------------------------------------------------------------------ the lake

_build_locks: dict[tuple[str, str], threading.Lock] = {}
_build_locks_guard = threading.Lock()


def ensure_silver(pipeline: ResolvedPipeline, lake_root: Path) -> tuple[Path, bool]:
    """The pipeline's lake directory, and whether this call built it.

    Concurrent previews of one new pipeline in this process build it once: the others wait for
    that build and read it."""
    directory = lake_root / pipeline.pipeline_hash
    if (directory / MANIFEST_FILE).is_file():
        return directory, False
    key = (str(lake_root.resolve()), pipeline.pipeline_hash)
    with _build_locks_guard:
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:
        if (directory / MANIFEST_FILE).is_file():
            return directory, False
        try:
            build_silver(pipeline, lake_root)
        except ReplayError as exc:
            raise _replay_error(exc, pipeline) from None
    return directory, True


def _replay_error(error: ReplayError, pipeline: ResolvedPipeline) -> PreviewError:
    """A dataset file that cannot be replayed, named by its place in the section."""
    paths = [path.resolve() for path in pipeline.dataset_paths]
    culprit = error.path.resolve()
    field = f"capture.dataset_files[{paths.index(culprit)}]" if culprit in paths else "capture"
    return PreviewError.single(PIPELINE_SECTION, field, str(error))


def _no_bins(pipeline: ResolvedPipeline) -> PreviewError:
    capture = pipeline.spec.capture
    where = "the session window" if capture.session is not None else "the dataset files"
    selector = capture.raw_symbol if capture.raw_symbol is not None else capture.instrument_id
    return PreviewError.single(
        PIPELINE_SECTION,
        "capture.session" if capture.session is not None else "capture.dataset_files",
        f"no silver bins: {where} hold no book data for instrument {selector}",
    )


def _manifest(directory: Path) -> dict[str, Any]:
    """The lake directory's manifest (what was built from what, and the counts)."""
    manifest_file = directory / MANIFEST_FILE
    try:
        manifest: dict[str, Any] = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as exc:
        raise PreviewError.single(str(manifest_file), "", f"unreadable manifest ({exc})") from None
    return manifest


def _silver_file(directory: Path, manifest: Mapping[str, Any]) -> Path:
    return directory / str(manifest.get("silver_file", SILVER_FILE))


def _open_silver(path: Path) -> pq.ParquetFile:
    """The lake's silver file, checked to be of the schema version this code reads."""
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise PreviewError.single(str(path), "", "silver file not found in the lake") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise PreviewError.single(str(path), "", f"not a Parquet file ({exc})") from None
    metadata = parquet.schema_arrow.metadata or {}
    found = metadata.get(b"qmachina.schema_version", b"").decode()
    if found != SILVER_SCHEMA_VERSION:
        raise PreviewError.single(
            str(path),
            "",
            f"silver schema version {found or 'missing'}, expected {SILVER_SCHEMA_VERSION}",
        )
    return parquet


def _silver_frame(
    parquet: pq.ParquetFile, gold: GoldSpec, tick_size: int, max_bins: int | None
) -> SilverFrame:
    """The first ``max_bins`` bins (all when None) as a frame, with the per-tick fields the gold
    spec reads only: the other twenty-odd list columns would take most of the time to read."""
    sources = sorted({node.field for node in gold.nodes.values() if isinstance(node, SourceOp)})
    total = parquet.metadata.num_rows
    stop = total if max_bins is None else min(total, max_bins)
    groups: list[int] = []
    covered = 0
    for group in range(parquet.num_row_groups):
        if covered >= stop:
            break
        groups.append(group)
        covered += parquet.metadata.row_group(group).num_rows
    columns = [field.name for field in BIN_FIELDS] + sources
    return SilverFrame(parquet.read_row_groups(groups, columns=columns).slice(0, stop), tick_size)


# ------------------------------------------------------------------------------ the contents


def evenly_spaced(total: int, samples: int) -> list[int]:
    """``samples`` indices spread over ``0 .. total - 1``, both ends included (every index when
    there are fewer); neighbouring gaps differ by at most one."""
    if total <= samples:
        return list(range(total))
    return [i * (total - 1) // (samples - 1) for i in range(samples)]


def _depth_totals(depths: pa.Table) -> list[tuple[int, int, int]]:
    sums = [
        [int(sum(values)) for values in depths[column].to_pylist()] for column in _DEPTH_COLUMNS
    ]
    return list(zip(*sums, strict=True))


def _bin_sample(
    index: int, row: Mapping[str, Any], depth: tuple[int, int, int], scale: int
) -> SilverBinSample:
    def price(name: str) -> float | None:
        raw = row[name]
        return None if raw is None else int(raw) / scale

    resting, bid, ask = depth
    return SilverBinSample(
        bin_index=index,
        bin_start_ns=int(row["bin_start_ns"]),
        spot=price("spot"),
        best_bid=price("best_bid"),
        best_ask=price("best_ask"),
        book_valid=bool(row["book_valid"]),
        bbo_labels_valid=bool(row["bbo_labels_valid"]),
        event_count=int(row["event_count"]),
        window_ticks=int(row["window_ticks"]),
        resting_depth=resting,
        bid_depth=bid,
        ask_depth=ask,
    )


def output_stats(name: str, kind: Kind, values: np.ndarray) -> OutputStats:
    """Statistics of ``values`` (the output where silver has data, flattened or not)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        mean = std = low = p05 = p50 = p95 = high = None
    else:
        mean, std = _number(np.mean(finite)), _number(np.std(finite))
        low, high = _number(np.min(finite)), _number(np.max(finite))
        p05, p50, p95 = (_number(q) for q in np.quantile(finite, (0.05, 0.5, 0.95)))
    return OutputStats(
        output=name,
        kind="grid" if kind is Kind.GRID else "series",
        count=int(values.size),
        finite=int(finite.size),
        mean=mean,
        std=std,
        min=low,
        p05=p05,
        p50=p50,
        p95=p95,
        max=high,
    )


def _number(value: float | np.floating) -> float | None:
    """A JSON number; an overflow to infinity becomes ``None``."""
    number = float(value)
    return number if math.isfinite(number) else None
