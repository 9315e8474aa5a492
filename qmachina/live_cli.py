"""``qmachina live start|status|stop|list``: live ingestion sessions through the API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console

from qmachina.cli_errors import fail
from qmachina.sweep_cli import ApiOption, TokenOption, call_api, connect_api

LIVE_PATH = "/v1/ingestion/live/sessions"

app = typer.Typer(help="Live ingestion sessions: a Databento Live feed into bronze, until stopped.")
out = Console(soft_wrap=True, highlight=False)

WorkspaceOption = Annotated[str, typer.Option(help="The workspace's slug.")]
SessionArgument = Annotated[str, typer.Argument(help="The session's id.")]


def show_session(view: dict[str, Any]) -> None:
    out.print(
        f"live session {view['id']}: {view['state']} ({view['connection']}), "
        f"{view['dataset']} {','.join(view['symbols'])}"
    )
    lag = view["lag_ns"]
    out.print(
        f"  events {view['events_received']}, written {view['records_written']}, "
        f"duplicates dropped {view['duplicates_dropped']}, reconnects {view['reconnects']}"
        + ("" if lag is None else f", lag {lag / 1e6:.1f} ms")
    )
    calendar = view["roll_calendar"]
    if calendar is not None:
        steps = ", ".join(f"{step['symbol']} from {step['at']}" for step in calendar["schedule"])
        out.print(f"  rolls by calendar {calendar['name']}: {steps}")
    for symbol, contract in view["contracts"].items():
        out.print(f"  {symbol} -> {contract}")
    for checkpoint in view["checkpoint"]:
        out.print(
            f"  checkpoint instrument {checkpoint['instrument_id']}: ts_event "
            f"{checkpoint['ts_event']} (+{checkpoint['taken_at_ts']} taken at it)"
        )
    for roll in view["rolls"]:
        out.print(
            f"  roll {roll['symbol']}: {roll['from_symbol']} -> {roll['to_symbol']} "
            f"at {roll['ts_event']} ({roll['reason']})"
        )
    if view["last_error"]:
        out.print(f"  last fault: {view['last_error']}")
    if view["error"]:
        out.print(f"  failed: {view['error']}")


@app.command("start")
def start(
    symbols: Annotated[list[str], typer.Argument(help="Symbols to subscribe to.")],
    dataset: Annotated[str, typer.Option(help="The Databento dataset.")] = "GLBX.MDP3",
    stype_in: Annotated[
        str, typer.Option(help="raw_symbol, instrument_id, continuous or parent.")
    ] = "raw_symbol",
    replay_from: Annotated[
        datetime | None, typer.Option("--start", help="Replay from this UTC time first.")
    ] = None,
    watchdog_seconds: Annotated[
        float, typer.Option(help="Silence that counts as a fault (> 5 s).")
    ] = 10,
    roll_calendar: Annotated[
        str | None,
        typer.Option(
            help="Roll by a calendar under this name (e.g. ES) instead of the gateway's "
            "mappings; give its steps with --roll-at."
        ),
    ] = None,
    roll_at: Annotated[
        list[str] | None,
        typer.Option(help="A calendar step, WHEN=RAW_SYMBOL (UTC ISO time); repeat per step."),
    ] = None,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Start a session."""
    body: dict[str, Any] = {
        "dataset": dataset,
        "symbols": symbols,
        "stype_in": stype_in,
        "watchdog_seconds": watchdog_seconds,
    }
    if replay_from is not None:
        body["start"] = replay_from.isoformat()
    if roll_calendar is not None or roll_at:
        if roll_calendar is None or not roll_at:
            raise fail("--roll-calendar NAME and at least one --roll-at WHEN=SYMBOL go together")
        body["roll_policy"] = "calendar"
        body["roll_calendar"] = {"name": roll_calendar, "schedule": [_step(s) for s in roll_at]}
    with connect_api(api, token) as client:
        show_session(call_api(client, "POST", LIVE_PATH, workspace, json=body))


def _step(text: str) -> dict[str, str]:
    when, equals, symbol = text.partition("=")
    if not equals or not symbol:
        raise fail(f"--roll-at {text!r}: expected WHEN=RAW_SYMBOL")
    try:
        moment = datetime.fromisoformat(when)
    except ValueError:
        raise fail(f"--roll-at {text!r}: {when!r} is not an ISO 8601 time") from None
    return {"at": moment.isoformat(), "symbol": symbol}


@app.command("status")
def status(
    session: SessionArgument,
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """The session's state, connection, counts, checkpoint, lag and rolls."""
    with connect_api(api, token) as client:
        show_session(call_api(client, "GET", f"{LIVE_PATH}/{session}", workspace))


@app.command("stop")
def stop(
    session: SessionArgument,
    reason: Annotated[str, typer.Option(help="Why.")] = "",
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Ask the session to drain and stop."""
    with connect_api(api, token) as client:
        show_session(
            call_api(
                client, "POST", f"{LIVE_PATH}/{session}/stop", workspace, json={"reason": reason}
            )
        )


@app.command("list")
def list_sessions(
    workspace: WorkspaceOption = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """The workspace's live sessions, newest first."""
    with connect_api(api, token) as client:
        page = call_api(client, "GET", LIVE_PATH, workspace)
    for item in page["items"]:
        out.print(
            f"{item['id']}  {item['created_at']}  {item['dataset']} {','.join(item['symbols'])}"
            f"  by {item['created_by']}"
        )
