"""``qmachina gateway``: serve DBN files over the Databento Live protocol on a local port.

A development and test tool: point ``databento.Live(key=..., gateway="127.0.0.1", port=N)`` at
it. The work happens in :mod:`qmachina.live.gateway`; this module reads the options, prints
where the gateway listens and runs it until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from qmachina.cli_errors import fail
from qmachina.live.gateway import LiveGateway
from qmachina.live.gateway_faults import Fault, FaultSpecError, parse_fault
from qmachina.live.gateway_protocol import parse_timestamp
from qmachina.live.gateway_symbols import SymbolError
from qmachina.live.gateway_tape import Tape, TapeError, load_tape

__all__ = ["app", "build_gateway", "gateway", "parse_speed"]

DEFAULT_PORT = 13000  # Databento's live port
KEY_VARIABLE = "DATABENTO_API_KEY"

FAULT_HELP = (
    "A scheduled fault, KIND@WHEN[,ARG...]; repeat for more. WHEN: a record count (5000: once "
    "a session has sent that many records), +OFFSET of tape time after the clock starts "
    "(+90s, +250ms, +2m; units ns us ms s m h), an ISO 8601 tape time or nsNANOSECONDS. "
    "Kinds: reset@WHEN (TCP reset); close@WHEN (clean close); stall@WHEN,for=SECONDS (send "
    "nothing, not even heartbeats); error@WHEN,msg=TEXT (ErrorMsg, then close); "
    "down@WHEN,for=SECONDS (drop all sessions, refuse connections); "
    "roll@WHEN,SYMBOL=TARGET (continuous SYMBOL maps to TARGET from then on)."
)


def parse_speed(text: str) -> float:
    """``max`` (as fast as possible) or a positive multiple of real time."""
    if text.strip().lower() in ("max", "inf"):
        return math.inf
    try:
        speed = float(text)
    except ValueError:
        raise ValueError(f"--speed {text!r} is neither a number nor 'max'") from None
    if not speed > 0 or not math.isfinite(speed):
        raise ValueError(f"--speed must be > 0, got {text!r}")
    return speed


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        name, eq, target = value.partition("=")
        if not eq or not name.strip() or not target.strip():
            raise ValueError(f"{option} {value!r}: expected NAME=VALUE")
        pairs[name.strip()] = target.strip()
    return pairs


def _keys(keys: list[str], keys_file: Path | None) -> list[str]:
    found = list(keys)
    if keys_file is not None:
        try:
            lines = keys_file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"{keys_file}: cannot read the keys file ({exc.strerror})") from None
        found += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not found and os.environ.get(KEY_VARIABLE):
        found.append(os.environ[KEY_VARIABLE])
    if not found:
        raise ValueError(f"no API key: give --key, --keys-file or set {KEY_VARIABLE}")
    return found


def _start_at(text: str | None, tape: Tape) -> int | None:
    if text is None:
        return None
    if text.startswith("+"):
        # Reuse the fault grammar's offsets: "+30m" is 30 minutes of tape after its start.
        fault = parse_fault(f"close@{text}", tape.start_ns)
        return fault.at_ns
    return parse_timestamp(text)


def build_gateway(
    data: list[Path],
    *,
    keys: list[str],
    keys_file: Path | None,
    host: str,
    port: int,
    speed: str,
    start_at: str | None,
    fault_specs: list[str],
    continuous: list[str],
    symbols: list[str],
    heartbeat: float | None,
    close_at_end: bool,
) -> LiveGateway:
    extra = _pairs(symbols, "--symbol")
    for name, iid in extra.items():
        if not iid.isdigit():
            raise ValueError(f"--symbol {name}={iid}: the instrument id must be an integer")
    tape = load_tape(data, {name: int(iid) for name, iid in extra.items()})
    origin = _start_at(start_at, tape)
    faults: list[Fault] = [
        parse_fault(spec, tape.start_ns if origin is None else origin) for spec in fault_specs
    ]
    return LiveGateway(
        tape,
        keys=_keys(keys, keys_file),
        host=host,
        port=port,
        speed=parse_speed(speed),
        start_at=origin,
        faults=faults,
        continuous=dict(_pairs(continuous, "--continuous")),
        heartbeat_s=heartbeat,
        close_at_end=close_at_end,
    )


async def _serve(gateway: LiveGateway) -> None:
    port = await gateway.start()
    tape = gateway.tape
    sys.stdout.write(
        f"gateway listening on {gateway.host}:{port}: {len(tape)} records of {tape.dataset} "
        f"from {len(tape.files)} file(s); Ctrl-C stops it\n"
    )
    sys.stdout.flush()
    await gateway.serve_forever()


def gateway(
    data: Annotated[
        list[Path],
        typer.Option(
            "--data", "-d", help="A DBN file (.dbn or .dbn.zst) to serve; repeat for more."
        ),
    ],
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one.")
    ] = DEFAULT_PORT,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key",
            help=f"An accepted API key (32 characters, db-...); repeat for more. Default: "
            f"${KEY_VARIABLE}. Prefer --keys-file: arguments are visible to other users.",
        ),
    ] = None,
    keys_file: Annotated[
        Path | None, typer.Option(help="A file of accepted API keys, one per line.")
    ] = None,
    speed: Annotated[
        str, typer.Option(help="Tape time per wall time (60: a minute per second), or 'max'.")
    ] = "1",
    start_at: Annotated[
        str | None,
        typer.Option(
            help="Tape time the clock starts from: ISO 8601, nanoseconds, or +OFFSET after "
            "the first record (+30m). Earlier records are history for start= and snapshots."
        ),
    ] = None,
    fault: Annotated[list[str] | None, typer.Option("--fault", help=FAULT_HELP)] = None,
    continuous: Annotated[
        list[str] | None,
        typer.Option(
            help="A continuous symbol and the contract it starts on, ES.c.0=ESH4 (raw symbol "
            "or instrument id); roll faults move it. Repeat for more."
        ),
    ] = None,
    symbol: Annotated[
        list[str] | None,
        typer.Option(
            "--symbol", help="A raw symbol the files do not name, ESH4=17077. Repeat for more."
        ),
    ] = None,
    heartbeat: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Heartbeat interval in seconds for every session (default: the "
            "client's heartbeat_interval_s, 30 s if it sends none).",
        ),
    ] = None,
    close_at_end: Annotated[
        bool, typer.Option(help="Close sessions cleanly once the tape is exhausted.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every session.")] = False,
) -> None:
    """Serve DBN files over the Databento Live protocol (a local gateway for development and
    tests): CRAM auth against the given keys, subscriptions with start= replay and snapshots,
    heartbeats, symbol mappings, its own market clock and scheduled faults."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        gw = build_gateway(
            data,
            keys=key or [],
            keys_file=keys_file,
            host=host,
            port=port,
            speed=speed,
            start_at=start_at,
            fault_specs=fault or [],
            continuous=continuous or [],
            symbols=symbol or [],
            heartbeat=heartbeat,
            close_at_end=close_at_end,
        )
    except (TapeError, FaultSpecError, SymbolError, ValueError) as exc:
        raise fail(str(exc)) from None
    try:
        asyncio.run(_serve(gw))
    except KeyboardInterrupt:
        sys.stderr.write("gateway stopped\n")
    except OSError as exc:
        raise fail(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


#: The command on its own (``python -m qmachina.gateway_cli``); ``qmachina gateway`` registers
#: :func:`gateway` on the main app.
app = typer.Typer(add_completion=False)
app.command()(gateway)

if __name__ == "__main__":
    app()
