"""The ``qmachina`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.replay import ReplayError
from engine.signals.registry import SignalError
from engine.synthetic import write_synthetic_dbn
from qmachina import (
    authz_cli,
    gateway_cli,
    live_cli,
    local_stack,
    modeling_cli,
    promotion_cli,
    serving_cli,
    stack_cli,
    stream_cli,
    sweep_cli,
    workspace_cli,
)
from qmachina.auth import DevIssuerError, mint_token
from qmachina.auth.client import TOKEN_VARIABLE, local_user
from qmachina.book_report import BookReportError, replay_book_lines
from qmachina.cli_errors import fail, settings_or_fail
from qmachina.experiment_run import run_experiment
from qmachina.gold_cli import app as gold_app
from qmachina.silver_build import BuildProgress, SilverBuildResult, build_silver
from qmachina.specs.errors import SpecError
from qmachina.specs.pipeline import (
    ResolvedPipeline,
    default_configs_root,
    resolve_pipeline,
    with_dataset_files,
)
from qmachina.validate_configs import validate_configs

app = typer.Typer(help="qMachina: event-level market-microstructure research and serving.")
book_app = typer.Typer(help="Reconstruct the L3 order book.")
silver_app = typer.Typer(help="Build silver grids.")
config_app = typer.Typer(help="Check the shipped and your own specs.")
experiment_app = typer.Typer(help="Run experiment sweeps in this process.")
app.add_typer(book_app, name="book")
app.add_typer(silver_app, name="silver")
app.add_typer(config_app, name="config")
app.add_typer(experiment_app, name="experiment")
app.add_typer(gold_app, name="gold")
app.add_typer(sweep_cli.app, name="sweep")
app.add_typer(workspace_cli.app, name="workspace")
app.add_typer(serving_cli.app, name="serving")
app.add_typer(promotion_cli.app, name="promotion")
app.add_typer(modeling_cli.app, name="model")
app.add_typer(live_cli.app, name="live")
app.command("promote")(promotion_cli.promote)
app.command("rollback")(promotion_cli.rollback)
app.command("stream")(stream_cli.stream)
app.command("gateway")(gateway_cli.gateway)
app.add_typer(authz_cli.app, name="authz")
app.add_typer(stack_cli.db_app, name="db")
app.command("up")(stack_cli.up)
app.command("down")(stack_cli.down)
app.command("status")(stack_cli.status)

err = Console(stderr=True)
out = Console()

DEFAULT_LAKE = Path("data/lake")
DEFAULT_CONFIGS = default_configs_root()
DEFAULT_PIPELINE = DEFAULT_CONFIGS / "pipelines" / "es_default.yaml"
DEFAULT_EXPERIMENT = DEFAULT_CONFIGS / "experiments" / "es_derivative_sweep.yaml"
DEMO_OBJECTIVE = "total_pnl_ticks"  # the shipped experiment's objective
DEMO_ALIAS = "es-demo"
DEMO_STREAM_BINS = 30
DEMO_STREAM_SPEED = 1000.0  # times real time: the sample's quiet first hour passes in seconds


@book_app.command("replay")
def book_replay(
    file: Annotated[Path, typer.Argument(help="A .dbn or .dbn.zst MBO file.")],
    instrument: Annotated[
        str | None,
        typer.Option(help="Instrument id or raw symbol; default: every instrument in the file."),
    ] = None,
    levels: Annotated[int, typer.Option(min=1, help="Levels per side to print.")] = 10,
    every_last: Annotated[
        bool, typer.Option("--every-last", help="Print the book after every F_LAST record.")
    ] = False,
    tick_size: Annotated[
        str | None,
        typer.Option(help="Tick size as a decimal (e.g. 0.25); default: inferred from prices."),
    ] = None,
    price_decimals: Annotated[
        int | None, typer.Option(help="Decimals when printing prices; default: the tick's.")
    ] = None,
) -> None:
    """Replay FILE through the L3 book and print JSON lines of the top levels."""
    try:
        for line in replay_book_lines(
            file,
            instrument=instrument,
            depth=levels,
            every_last=every_last,
            tick_size=tick_size,
            price_decimals=price_decimals,
        ):
            sys.stdout.write(json.dumps(line, separators=(", ", ": ")) + "\n")
    except (ReplayError, BookReportError) as exc:
        raise fail(str(exc)) from None


@silver_app.command("build")
def silver_build(
    pipeline: Annotated[Path, typer.Option(help="A PipelineSpec YAML.")] = DEFAULT_PIPELINE,
    input_files: Annotated[
        list[Path] | None,
        typer.Option("--input", help="Input DBN files (default: the pipeline's dataset files)."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Lake directory.")] = DEFAULT_LAKE,
) -> None:
    """Build the silver grid of PIPELINE into OUT/<pipeline hash>/."""
    try:
        resolved = resolve_pipeline(pipeline, check_files=not input_files)
        if input_files:
            resolved = with_dataset_files(resolved, input_files)
        result = _build_with_progress(resolved, out_dir)
    except (SpecError, ReplayError) as exc:
        raise fail(str(exc)) from None
    _print_summary(result)


def _build_with_progress(resolved: ResolvedPipeline, out_dir: Path) -> SilverBuildResult:
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]silver[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.fields[events]:>12,} events  {task.fields[bins]:>9,} bins"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(
            resolved.spec.name, total=len(resolved.dataset_paths), events=0, bins=0
        )

        def show(state: BuildProgress) -> None:
            progress.update(task, completed=state.files_done, events=state.events, bins=state.bins)

        return build_silver(resolved, out_dir, on_progress=show)


def _print_summary(result: SilverBuildResult) -> None:
    table = Table(title="silver build", show_header=False, title_justify="left")
    table.add_row("output", str(result.output_dir))
    table.add_row("pipeline hash", result.pipeline_hash)
    for item in result.inputs:
        table.add_row("input", f"{item.name}  sha256 {item.sha256[:16]}…  {item.bytes:,} bytes")
    table.add_row("events", f"{result.events:,}")
    table.add_row("bins", f"{result.bins:,}")
    table.add_row(
        "grid", ", ".join(f"{name}={count:,}" for name, count in result.grid_counts.items())
    )
    table.add_row("elapsed", f"{result.seconds:.2f} s")
    table.add_row("events/s", f"{result.events_per_second:,.0f}")
    anomalies = {k: v for k, v in result.anomalies.items() if v}
    table.add_row(
        "anomalies",
        ", ".join(f"{k}={v:,}" for k, v in anomalies.items()) if anomalies else "none",
    )
    out.print(table)


@config_app.command("validate")
def config_validate(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Spec files or folders (default: the root).")
    ] = None,
    root: Annotated[
        Path, typer.Option(help="The configs root references resolve against.")
    ] = DEFAULT_CONFIGS,
) -> None:
    """Validate every spec (instruments, pipelines, gold, serving, experiments) with its
    cross-references; exit 1 when any is invalid."""
    report = validate_configs(paths or [], root=root)
    for line in report.deprecations:
        sys.stderr.write(f"deprecated: {line}\n")
    for issue in report.issues:
        sys.stderr.write(f"{issue}\n")
    out.print(f"{len(report.checked)} spec files checked, {len(report.issues)} problems")
    if not report.ok:
        raise typer.Exit(code=1)


@experiment_app.command("run")
def experiment_run(
    experiment: Annotated[
        Path, typer.Argument(help="An ExperimentSpec YAML.")
    ] = DEFAULT_EXPERIMENT,
    lake: Annotated[Path, typer.Option(help="Lake directory (silver is built if missing).")] = (
        DEFAULT_LAKE
    ),
    top: Annotated[int, typer.Option(min=1, help="Leaderboard rows to print.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the leaderboard as JSON.")] = False,
) -> None:
    """Evaluate every point of EXPERIMENT; rank on the training span, report the test span."""
    try:
        with err.status(f"sweeping {experiment.name}"):
            result = run_experiment(experiment, lake_root=lake)
    except (SpecError, ReplayError, SignalError) as exc:
        raise fail(str(exc)) from None
    rows = result.leaderboard[:top]
    if as_json:
        sys.stdout.write(
            json.dumps(
                [
                    {
                        "point_hash": row.point.point_hash,
                        "signal_params": dict(row.point.signal_params),
                        "threshold": row.point.threshold,
                        "tp_ticks": row.point.tp_ticks,
                        "sl_ticks": row.point.sl_ticks,
                        "cooldown_bins": row.point.cooldown_bins,
                        "train": row.train,
                        "test": row.test,
                    }
                    for row in rows
                ],
                allow_nan=True,
            )
            + "\n"
        )
        return
    table = Table(
        title=f"{result.experiment.name}: {len(result.leaderboard)} points, "
        f"ranked on train ({result.experiment.objective}), reported on test",
        title_justify="left",
    )
    for column in (
        "point",
        "params",
        "thr",
        "tp/sl",
        "cool",
        "train pnl",
        "test trades",
        "test hit",
        "test pnl",
        "test dd",
    ):
        table.add_column(column, justify="right")
    swept = {
        name
        for name, _ in result.leaderboard[0].point.signal_params
        if len({dict(r.point.signal_params)[name] for r in result.leaderboard}) > 1
    }
    for row in rows:
        params = " ".join(f"{k}={v}" for k, v in row.point.signal_params if k in swept)
        table.add_row(
            row.point.point_hash[:10],
            params,
            f"{row.point.threshold:g}",
            f"{row.point.tp_ticks}/{row.point.sl_ticks}",
            str(row.point.cooldown_bins),
            f"{row.train['total_pnl_ticks']:.0f}",
            f"{row.test['signals']:.0f}",
            f"{row.test['hit_rate']:.2f}",
            f"{row.test['total_pnl_ticks']:.0f}",
            f"{row.test['max_drawdown_ticks']:.0f}",
        )
    out.print(table)


@app.command()
def synth(
    events: Annotated[int, typer.Option(min=1, help="Number of MBO records.")] = 1_000_000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 1,
    out_file: Annotated[Path, typer.Option("--out", help="Output .dbn or .dbn.zst.")] = Path(
        "data/synthetic.mbo.dbn.zst"
    ),
) -> None:
    """Write a seeded synthetic MBO file (DBN v3) that databento reads."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with err.status(f"generating {events:,} events"):
        write_synthetic_dbn(out_file, events, seed)
    out.print(f"wrote {events:,} events to {out_file} ({out_file.stat().st_size:,} bytes)")


@app.command()
def token(
    user: Annotated[
        str | None,
        typer.Option("--user", help="Whom the token is for (its subject); default: you."),
    ] = None,
    ttl: Annotated[
        int | None,
        typer.Option(
            "--ttl", min=1, help="Seconds it stays valid; default: QMACHINA_TOKEN_TTL_SECONDS."
        ),
    ] = None,
) -> None:
    """Print a bearer token for the API, minted by the local dev issuer from the key in the
    data directory (made on first use). Use it as `Authorization: Bearer <token>` or
    QMACHINA_TOKEN. With an external issuer (QMACHINA_OIDC_ISSUER), get tokens from it."""
    settings = settings_or_fail()
    try:
        minted = mint_token(settings, local_user() if user is None else user, ttl)
    except DevIssuerError as error:
        raise fail(str(error)) from None
    sys.stdout.write(minted + "\n")


@app.command()
def demo(
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for each stack component.")
    ] = local_stack.DEFAULT_TIMEOUT_S,
) -> None:
    """The main job, end to end: start the local stack, build silver from the real ES sample,
    submit the shipped sweep through the API, follow it, print its leaderboard, register its
    best run as a serving version, promote it behind the alias `es-demo`, stream its first bins,
    and leave the stack running (`qmachina down` stops it)."""
    settings = settings_or_fail()
    stack = stack_cli.start_stack(settings, timeout)
    try:
        resolved = resolve_pipeline(DEFAULT_PIPELINE)
        result = _build_with_progress(resolved, settings.lake_dir)
    except (SpecError, ReplayError) as exc:
        raise fail(str(exc)) from None
    _print_summary(result)
    experiment = DEFAULT_EXPERIMENT.relative_to(DEFAULT_CONFIGS).as_posix()
    auth = sweep_cli.client_auth(settings, os.environ.get(TOKEN_VARIABLE))
    with sweep_cli.api_client(local_stack.api_url(settings), auth) as client:
        try:
            job = sweep_cli.submit_job(client, "default", {"experiment": experiment})
            out.print(f"submitted {experiment} as job {job['id']} (workflow {job['workflow_id']})")
            exit_code = sweep_cli.watch_job(client, job["id"], "default")
            page = sweep_cli.runs_page(
                client, job["id"], "default", sort=f"train.{DEMO_OBJECTIVE}", top=10
            )
        except sweep_cli.ApiError as error:
            raise fail(str(error)) from None
        out.print(sweep_cli.runs_table(page))
        out.print("ranked on the training span (first 60 %); test columns are the later 40 %")
        if exit_code == 0 and page["runs"]:
            exit_code = _serve_best_run(client, auth, job["id"], page["runs"][0]["point_hash"])
    out.print("[bold green]the stack keeps running[/] (`qmachina down` stops it):")
    stack_cli.print_endpoints(stack)
    raise typer.Exit(exit_code)


def _serve_best_run(client: httpx.Client, auth: httpx.Auth, job_id: str, point_hash: str) -> int:
    """Register the run, promote it behind the demo alias, stream its first bins; 0 when it
    serves."""
    version = promotion_cli.register_run(client, "default", f"{job_id}:{point_hash}")
    out.print(f"the best run (point {point_hash[:8]}) is serving version {version[:12]}")
    view = promotion_cli.promote_version(
        client,
        "default",
        {"version": version, "alias": DEMO_ALIAS, "reason": "demo: the best training-span run"},
    )
    promotion_cli.show_promotion(view)
    if view["state"] != "promoted":
        return 1
    query = {"serving": DEMO_ALIAS, "workspace": "default", "speed": str(DEMO_STREAM_SPEED)}
    summary = stream_cli.follow_stream(
        str(client.base_url), auth, query, DEMO_STREAM_BINS, echo=False
    )
    out.print(
        f"streamed {summary.bins} bins of {DEMO_ALIAS} (version {summary.version_id[:12]}); "
        f"last score {summary.last_score}"
    )
    return 0


if __name__ == "__main__":
    app()
