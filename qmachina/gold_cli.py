"""``qmachina gold``: look at gold features before using them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from engine.gold.preview import OutputStats, SilverFileError, preview_gold, read_silver_sample
from qmachina.cli_errors import fail
from qmachina.specs.errors import SpecError
from qmachina.specs.gold import load_gold_spec
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import default_configs_root

app = typer.Typer(help="Gold features: the VP block and feature graphs in the gold DSL.")
out = Console()

DEFAULT_SPEC = default_configs_root() / "gold" / "vp_default.yaml"


@app.callback()
def gold() -> None:
    """Gold features: the VP block and feature graphs in the gold DSL."""


@app.command()
def preview(
    silver: Annotated[Path, typer.Option(help="A silver.parquet file from the lake.")],
    spec: Annotated[Path, typer.Option(help="A gold spec (YAML or JSON).")] = DEFAULT_SPEC,
    bins: Annotated[int, typer.Option(min=1, help="Bins to run.")] = 6000,
    start: Annotated[int, typer.Option(min=0, help="First bin of the sample.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Run SPEC on BINS bins of SILVER from bin START and print statistics of every output.

    The sample starts cold: windows fill up from its first bin."""
    try:
        gold_spec = load_gold_spec(spec)
        frame = read_silver_sample(silver, bins, start)
        stats = preview_gold(gold_spec.graph(), frame)
    except (SpecError, SilverFileError) as exc:
        raise fail(str(exc)) from None
    digest = spec_hash(gold_spec)
    if as_json:
        document = {
            "spec": str(spec),
            "spec_hash": digest,
            "silver": str(silver),
            "start": start,
            "bins": frame.n_bins,
            "outputs": [item.as_json() for item in stats],
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        title = f"gold preview: {spec.name} ({digest[:12]}), bins {start:,} + {frame.n_bins:,}"
        table = _table(stats, title)
        # At its natural width: a narrow terminal wraps lines rather than truncating numbers.
        natural = Measurement.get(out, out.options.update_width(10_000), table).maximum
        Console(width=max(out.width, natural)).print(table)


def _table(stats: list[OutputStats], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("output", "kind", "count", "nulls", "mean", "std"):
        table.add_column(column, justify="left" if column in ("output", "kind") else "right")
    for q, _ in stats[0].quantiles if stats else ():
        table.add_column({0.0: "min", 1.0: "max"}.get(q, f"p{round(q * 100):02d}"), justify="right")
    table.add_column("zero", justify="right")
    for item in stats:
        table.add_row(
            item.name,
            item.kind.value,
            f"{item.count:,}",
            f"{item.nulls:,}",
            _number(item.mean),
            _number(item.std),
            *(_number(value) for _, value in item.quantiles),
            "-" if math.isnan(item.fraction_zero) else f"{item.fraction_zero:.1%}",
        )
    return table


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"
