"""Scheduled faults for the gateway, and their command-line spelling.

A fault fires once. It is scheduled either on tape time (``at_ns``: when the gateway's clock
reaches it) or on a record count (``after_records``: when one session has sent that many tape
records). Connection faults scheduled on tape time hit every session streaming at that moment,
each right after it has sent the records before that time; counted ones hit the session that
reached the count.

Command-line form: ``KIND@WHEN[,ARG...]``

* ``WHEN`` is a record count (``5000``), a tape-time offset from where the gateway's clock
  starts (``+90s``, ``+250ms``, ``+1.5m``, ``+2h``; units ns, us, ms, s, m, h) or an absolute
  tape time in ISO 8601 (``2023-12-26T14:30:00Z``; no zone means UTC) or nanoseconds
  (``ns1703601000000000000``).
* ``reset@WHEN``               abort the connection (TCP reset)
* ``close@WHEN``               close the connection cleanly
* ``stall@WHEN,for=SECONDS``   send nothing, not even heartbeats, for SECONDS of wall time
* ``error@WHEN[,msg=TEXT]``    send an ErrorMsg with TEXT, then close
* ``down@WHEN,for=SECONDS``    drop every session and refuse connections for SECONDS
* ``roll@WHEN,SYMBOL=TARGET``  the continuous SYMBOL maps to TARGET (raw symbol or instrument
  id) from then on; rolls are scheduled on tape time only
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from qmachina.live.gateway_protocol import parse_timestamp

__all__ = ["Fault", "FaultKind", "FaultSpecError", "parse_fault"]

DEFAULT_ERROR_MESSAGE: Final = "qMachina gateway: scheduled error"
_UNITS_NS: Final = {
    "ns": 1,
    "us": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_OFFSET = re.compile(r"^\+(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)$")


class FaultKind(StrEnum):
    """What a fault does."""

    RESET = "reset"
    CLOSE = "close"
    STALL = "stall"
    ERROR = "error"
    DOWN = "down"
    ROLL = "roll"


#: Faults that act on one connection (the others act on the whole gateway).
CONNECTION_FAULTS: Final = frozenset(
    {FaultKind.RESET, FaultKind.CLOSE, FaultKind.STALL, FaultKind.ERROR}
)


class FaultSpecError(ValueError):
    """A fault that cannot be scheduled; the message quotes the offending text or field."""


@dataclass(frozen=True)
class Fault:
    """One scheduled fault (see the module docstring for what each kind does)."""

    kind: FaultKind
    at_ns: int | None = None
    after_records: int | None = None
    seconds: float = 0.0
    message: str = DEFAULT_ERROR_MESSAGE
    symbol: str | None = None
    to: str | None = None

    def __post_init__(self) -> None:
        if (self.at_ns is None) == (self.after_records is None):
            raise FaultSpecError(f"{self.kind} fault: give exactly one of at_ns, after_records")
        if self.after_records is not None and self.after_records < 0:
            raise FaultSpecError(f"{self.kind} fault: after_records must be >= 0")
        if self.kind in (FaultKind.STALL, FaultKind.DOWN) and not self.seconds > 0:
            raise FaultSpecError(f"{self.kind} fault: seconds must be > 0")
        if self.kind is FaultKind.ROLL:
            if self.at_ns is None:
                raise FaultSpecError("roll fault: a contract roll is scheduled on tape time")
            if not self.symbol or self.to is None:
                raise FaultSpecError("roll fault: give the continuous symbol and its new target")

    def describe(self) -> str:
        """A short text for logs."""
        when = f"at {self.at_ns}" if self.at_ns is not None else f"after {self.after_records}"
        extra = ""
        if self.kind in (FaultKind.STALL, FaultKind.DOWN):
            extra = f" for {self.seconds:g}s"
        elif self.kind is FaultKind.ROLL:
            extra = f" {self.symbol}->{self.to}"
        return f"{self.kind}{extra} {when}"


def _when(text: str, origin_ns: int, spec: str) -> tuple[int | None, int | None]:
    """(at_ns, after_records) from the WHEN part."""
    if text.isdigit():
        return None, int(text)
    offset = _OFFSET.match(text)
    if offset:
        value, unit = offset.groups()
        return origin_ns + round(float(value) * _UNITS_NS[unit]), None
    if text.startswith("ns") and text[2:].isdigit():
        return int(text[2:]), None
    try:
        return parse_timestamp(text), None
    except ValueError:
        raise FaultSpecError(
            f"{spec!r}: WHEN {text!r} is not a record count, +OFFSET (e.g. +90s), "
            "nsNANOSECONDS or an ISO 8601 time"
        ) from None


def parse_fault(spec: str, origin_ns: int) -> Fault:
    """A fault from its command-line form; ``origin_ns`` is where ``+OFFSET`` counts from."""
    head, _, rest = spec.partition(",")
    kind_text, at_sign, when_text = head.partition("@")
    if not at_sign or not when_text:
        raise FaultSpecError(f"{spec!r}: expected KIND@WHEN[,ARG...]")
    try:
        kind = FaultKind(kind_text.strip().lower())
    except ValueError:
        kinds = ", ".join(k.value for k in FaultKind)
        raise FaultSpecError(f"{spec!r}: unknown fault kind {kind_text!r} ({kinds})") from None
    at_ns, after_records = _when(when_text.strip(), origin_ns, spec)
    args: dict[str, str] = {}
    if rest:
        # msg= takes the rest of the spec, so an error text may contain commas.
        before, msg_sep, message = rest.partition("msg=")
        for token in before.split(","):
            if not token.strip():
                continue
            key, eq, value = token.partition("=")
            if not eq:
                raise FaultSpecError(f"{spec!r}: argument {token!r} is not NAME=VALUE")
            args[key.strip()] = value.strip()
        if msg_sep:
            args["msg"] = message
    seconds = 0.0
    symbol: str | None = None
    to: str | None = None
    if "for" in args:
        try:
            seconds = float(args.pop("for"))
        except ValueError:
            raise FaultSpecError(f"{spec!r}: for= must be a number of seconds") from None
    message = args.pop("msg", DEFAULT_ERROR_MESSAGE)
    if kind is FaultKind.ROLL:
        if len(args) != 1:
            raise FaultSpecError(f"{spec!r}: a roll takes one SYMBOL=TARGET argument")
        ((symbol, to),) = args.items()
        args.clear()
    if args:
        raise FaultSpecError(f"{spec!r}: unexpected argument(s) {', '.join(sorted(args))}")
    try:
        return Fault(
            kind=kind,
            at_ns=at_ns,
            after_records=after_records,
            seconds=seconds,
            message=message,
            symbol=symbol,
            to=to,
        )
    except FaultSpecError as exc:
        raise FaultSpecError(f"{spec!r}: {exc}") from None
