"""Preview a gold graph on a sample of silver: per-output statistics for a first look.

Statistics count the values where silver has data: every bin for a series, and for a grid the
cells inside each bin's silver window (outside it a grid is NaN by construction, not missing).
A NaN there is a *null* (a window still filling, a zero denominator); the other statistics are
over the defined values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.gold.graph import GoldGraph, Kind
from engine.gold.runtime import GoldFrame, run_gold
from engine.silver import SILVER_SCHEMA_VERSION
from engine.silver_frame import SilverFrame

QUANTILES = (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0)


class SilverFileError(ValueError):
    """A file that is not a readable silver table."""


@dataclass(frozen=True)
class OutputStats:
    """Statistics of one gold output over a sample."""

    name: str
    kind: Kind
    count: int  # defined values
    nulls: int  # NaN where silver has data
    mean: float
    std: float  # population (ddof 0)
    quantiles: tuple[tuple[float, float], ...]  # (q, value), linear interpolation
    fraction_zero: float  # of the defined values

    def as_json(self) -> dict[str, object]:
        """Plain JSON types; NaN (no defined values) becomes null."""

        def number(value: float) -> float | None:
            return None if np.isnan(value) else value

        return {
            "name": self.name,
            "kind": self.kind.value,
            "count": self.count,
            "nulls": self.nulls,
            "mean": number(self.mean),
            "std": number(self.std),
            "quantiles": {str(q): number(value) for q, value in self.quantiles},
            "fraction_zero": number(self.fraction_zero),
        }


def window_mask(frame: SilverFrame) -> np.ndarray:
    """``[n_bins, n_ticks]`` True inside each bin's silver window."""
    counts = frame.table["window_ticks"].to_numpy()
    firsts = frame.table["window_first_tick"].to_numpy() - frame.first_tick
    columns = np.arange(frame.n_ticks)[None, :]
    mask: np.ndarray = (columns >= firsts[:, None]) & (columns < (firsts + counts)[:, None])
    return mask


def output_stats(gold: GoldFrame, frame: SilverFrame) -> list[OutputStats]:
    """Statistics of every output of ``gold`` (computed over ``frame``), in output order."""
    inside = window_mask(frame)
    stats = []
    for name, values in gold.outputs.items():
        kind = gold.kinds[name]
        sample = values[inside] if kind is Kind.GRID else values
        defined = sample[~np.isnan(sample)]
        empty = defined.size == 0
        stats.append(
            OutputStats(
                name=name,
                kind=kind,
                count=int(defined.size),
                nulls=int(sample.size - defined.size),
                mean=np.nan if empty else float(np.mean(defined)),
                std=np.nan if empty else float(np.std(defined)),
                quantiles=tuple(
                    (q, np.nan if empty else float(np.quantile(defined, q))) for q in QUANTILES
                ),
                fraction_zero=np.nan if empty else float(np.mean(defined == 0.0)),
            )
        )
    return stats


def preview_gold(graph: GoldGraph, frame: SilverFrame) -> list[OutputStats]:
    """Run ``graph`` over ``frame`` and return the statistics of its outputs."""
    return output_stats(run_gold(graph, frame), frame)


def read_silver_sample(path: Path, n_bins: int | None = None, start: int = 0) -> SilverFrame:
    """Bins ``start`` to ``start + n_bins`` (to the end when None) of a silver Parquet file as a
    frame; only the row groups that hold them are read."""
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise SilverFileError(f"{path}: file not found") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise SilverFileError(f"{path}: not a Parquet file ({exc})") from None
    metadata = parquet.schema_arrow.metadata or {}
    version = metadata.get(b"qmachina.schema_version", b"").decode()
    if version != SILVER_SCHEMA_VERSION:
        raise SilverFileError(
            f"{path}: schema version {version or 'missing'}, expected {SILVER_SCHEMA_VERSION}"
        )
    tick_size = int(json.loads(metadata[b"qmachina.grid_config"])["tick_size"])
    total = parquet.metadata.num_rows
    if not 0 <= start < total:
        raise SilverFileError(f"{path}: has {total:,} bins; cannot start at bin {start:,}")
    stop = total if n_bins is None else min(total, start + n_bins)
    row_groups = range(parquet.num_row_groups)
    sizes = np.array([parquet.metadata.row_group(g).num_rows for g in row_groups])
    ends = np.cumsum(sizes)
    starts = ends - sizes
    groups = [g for g in row_groups if starts[g] < stop and ends[g] > start]
    table = parquet.read_row_groups(groups)
    return SilverFrame(table.slice(start - int(starts[groups[0]]), stop - start), tick_size)
