"""``qmachina stream SERVING``: follow a serving stream from the terminal.

Opens ``WS /v1/stream`` for an alias or version, prints its ``runtime_config`` in one line, then
one line per bin (its sequence number and the signal's score) until ``--bins`` bins or the end of
the replay. The token travels in the ``Authorization`` header, as for every other command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
import typer
from rich.console import Console
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException
from websockets.sync.client import connect

from qmachina.auth.client import StaticBearer
from qmachina.cli_errors import fail, settings_or_fail
from qmachina.serving.wire import FrameType, decode_frame
from qmachina.sweep_cli import ApiOption, TokenOption, api_base_url, client_auth

STREAM_PATH = "/v1/stream"
SCORE_FIELD = "score"
out = Console(soft_wrap=True, highlight=False)


@dataclass
class StreamSummary:
    """What a followed stream delivered."""

    version_id: str
    bins: int
    last_score: float | None
    end: dict[str, Any] | None


def authorization(auth: httpx.Auth) -> str:
    """The ``Authorization`` header value ``auth`` would send (a minted token is fresh)."""
    request = httpx.Request("GET", "http://qmachina.invalid/")
    next(auth.auth_flow(request))
    return request.headers["Authorization"]


def follow_stream(
    api: str, auth: httpx.Auth, query: dict[str, str], bins: int, *, echo: bool = True
) -> StreamSummary:
    """Read the stream until ``bins`` gold updates (0: to its end); a refusal or a failure
    exits 2 with the close code and reason."""
    url = api.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    url = f"{url}{STREAM_PATH}?{urlencode(query)}"
    summary = StreamSummary("", 0, None, None)
    try:
        with connect(
            url, additional_headers={"Authorization": authorization(auth)}, open_timeout=30
        ) as ws:
            for message in ws:
                if isinstance(message, str):
                    control = json.loads(message)
                    if control["type"] == "runtime_config":
                        summary.version_id = control["serving"]["version_id"]
                        if echo:
                            _print_config(control)
                    elif control["type"] == "stream_end":
                        summary.end = control
                    continue
                frame = decode_frame(message)
                if frame.type != FrameType.GOLD_UPDATE:
                    continue
                summary.bins += 1
                if SCORE_FIELD in frame.batch.schema.names:
                    summary.last_score = frame.batch.column(SCORE_FIELD)[0].as_py()
                if echo:
                    out.print(f"bin {frame.bin_seq}: {SCORE_FIELD} {summary.last_score}")
                if bins and summary.bins >= bins:
                    break
    except ConnectionClosed as closed:
        received = closed.rcvd
        if received is None or received.code != 1000:
            detail = "no close frame" if received is None else f"{received.code} {received.reason}"
            raise fail(f"the stream at {url} was closed: {detail}") from None
    except (OSError, InvalidURI, WebSocketException) as error:
        raise fail(f"cannot open the stream at {url}: {error}") from None
    return summary


def _print_config(config: dict[str, Any]) -> None:
    serving, grid = config["serving"], config["grid"]
    outputs = ", ".join(output["field"] for output in config["gold_outputs"])
    out.print(
        f"serving {serving['alias'] or serving['version_id'][:12]} "
        f"(version {serving['version_id'][:12]}, model {serving['model_id']}): "
        f"{config['instrument']['symbol']}, {config['bin_width_ms']} ms bins, "
        f"{grid['max_window_ticks']}-tick window; gold {outputs}"
    )


def stream(
    serving: Annotated[str, typer.Argument(help="A serving alias, or a version id (or prefix).")],
    bins: Annotated[int, typer.Option(min=0, help="Stop after this many bins (0: the end).")] = 20,
    source: Annotated[
        str,
        typer.Option(
            help="replay: the version's own dataset; live:SESSION_ID: a live session's data "
            "as it arrives."
        ),
    ] = "replay",
    speed: Annotated[
        float | None,
        typer.Option(min=0.001, help="Replay speed, times real time (default 1; not for live)."),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(
            help="ISO-8601 time to stream from; without an offset, the instrument's local time."
        ),
    ] = None,
    workspace: Annotated[str, typer.Option(help="The workspace's slug.")] = "default",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Follow a serving stream: its runtime config, then each bin's signal score."""
    if speed is not None and source != "replay":
        raise fail("--speed is for a replay: a live source runs in real time")
    auth = StaticBearer(token) if token else client_auth(settings_or_fail(), None)
    query = {"serving": serving, "workspace": workspace, "source": source}
    if speed is not None:
        query["speed"] = str(speed)
    if start is not None:
        query["start"] = start
    summary = follow_stream(api_base_url(api), auth, query, bins)
    out.print(f"{summary.bins} bins of version {summary.version_id}")
