"""The Databento Live (Raw API) wire format, gateway side.

Control lines are ``key=value|key=value\\n`` in UTF-8. The gateway greets with
``lsg_version=...`` and ``cram=<challenge>``; the client answers
``auth=<sha256("{cram}|{key}") hex>-<last 5 chars of the key>|dataset=...|encoding=dbn|...``;
the gateway replies ``success=1|session_id=...`` or ``success=0|error=...``. Then the client
sends subscription lines and ``start_session``, after which the gateway sends DBN: metadata
followed by records. The official ``databento`` client (``databento.live.gateway``) parses each
gateway line into a dataclass whose fields must match exactly, so the lines here carry no other
keys and no trailing ``|``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, cast

import databento_dbn
import numpy as np
from databento_dbn import ErrorCode, SType, SystemCode

from qmachina.live.record_block import walk_records

__all__ = [
    "BUCKET_ID_LENGTH",
    "HEARTBEAT",
    "INTERNAL_ERROR",
    "INVALID_SUBSCRIPTION",
    "KEY_LENGTH",
    "KEY_PREFIX",
    "LSG_VERSION",
    "REPLAY_COMPLETED",
    "SUBSCRIPTION_ACK",
    "SYMBOL_RESOLUTION_FAILED",
    "AuthRequest",
    "KeyRing",
    "ProtocolError",
    "SubscriptionRequest",
    "auth_failure_line",
    "auth_success_line",
    "challenge_line",
    "cram_response",
    "error_record",
    "greeting_line",
    "metadata_header",
    "parse_auth_request",
    "parse_control_line",
    "parse_subscription",
    "parse_timestamp",
    "symbol_mapping_record",
    "system_record",
    "with_ts_out",
]

#: What the gateway reports as its version in the greeting (the client only logs it).
LSG_VERSION: Final = "0.0.0+qmachina"
#: Databento API keys: 32 characters starting with ``db-``; the last 5 are the bucket id that
#: the client sends in the clear so the gateway knows which keys to try.
KEY_PREFIX: Final = "db-"
KEY_LENGTH: Final = 32
BUCKET_ID_LENGTH: Final = 5
ALL_SYMBOLS: Final = "ALL_SYMBOLS"
START_SESSION: Final = "start_session"
SUPPORTED_COMPRESSION: Final = frozenset({"none", "zstd"})
_UNSET_STYPE: Final = 0xFF
_TS_OUT_WORDS: Final = 2  # the 8-byte send time grows a record by two 4-byte words

# The stub types enum members as their values; these are the members, typed as such.
_RAW_SYMBOL: Final = cast("SType", SType.RAW_SYMBOL)
_INSTRUMENT_ID: Final = cast("SType", SType.INSTRUMENT_ID)
HEARTBEAT: Final = cast("SystemCode", SystemCode.HEARTBEAT)
SUBSCRIPTION_ACK: Final = cast("SystemCode", SystemCode.SUBSCRIPTION_ACK)
REPLAY_COMPLETED: Final = cast("SystemCode", SystemCode.REPLAY_COMPLETED)
INVALID_SUBSCRIPTION: Final = cast("ErrorCode", ErrorCode.INVALID_SUBSCRIPTION)
SYMBOL_RESOLUTION_FAILED: Final = cast("ErrorCode", ErrorCode.SYMBOL_RESOLUTION_FAILED)
INTERNAL_ERROR: Final = cast("ErrorCode", ErrorCode.INTERNAL_ERROR)


class ProtocolError(Exception):
    """A control line from the client that the gateway cannot accept."""


# ------------------------------------------------------------------------------------ auth


def cram_response(challenge: str, key: str) -> str:
    """What a client holding ``key`` answers to ``challenge``."""
    digest = hashlib.sha256(f"{challenge}|{key}".encode()).hexdigest()
    return f"{digest}-{key[-BUCKET_ID_LENGTH:]}"


class KeyRing:
    """The API keys a gateway accepts, grouped by bucket id. Keys are never shown."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._by_bucket: dict[str, list[str]] = {}
        for index, key in enumerate(keys):
            if not (key.startswith(KEY_PREFIX) and len(key) == KEY_LENGTH and key.isascii()):
                raise ValueError(
                    f"key #{index + 1} is not a Databento API key ({KEY_LENGTH} ASCII "
                    f"characters starting with {KEY_PREFIX!r})"
                )
            if any(c in key for c in "|=\n "):
                raise ValueError(f"key #{index + 1} contains a character the protocol reserves")
            self._by_bucket.setdefault(key[-BUCKET_ID_LENGTH:], []).append(key)
        if not self._by_bucket:
            raise ValueError("the gateway needs at least one API key")

    def __repr__(self) -> str:
        return f"KeyRing({sum(len(v) for v in self._by_bucket.values())} keys)"

    def accepts(self, challenge: str, response: str) -> bool:
        """True when ``response`` answers ``challenge`` with one of the keys."""
        _, _, bucket = response.rpartition("-")
        return any(
            hmac.compare_digest(cram_response(challenge, key), response)
            for key in self._by_bucket.get(bucket, ())
        )


def new_challenge() -> str:
    """A fresh random CRAM challenge."""
    return secrets.token_urlsafe(24)


# ---------------------------------------------------------------------------- control lines


def _line(fields: Mapping[str, object]) -> bytes:
    return ("|".join(f"{k}={v}" for k, v in fields.items()) + "\n").encode()


def greeting_line() -> bytes:
    """The first line the gateway sends."""
    return _line({"lsg_version": LSG_VERSION})


def challenge_line(challenge: str) -> bytes:
    """The CRAM challenge line."""
    return _line({"cram": challenge})


def auth_success_line(session_id: str) -> bytes:
    """The reply to a valid authentication request."""
    return _line({"success": 1, "session_id": session_id})


def auth_failure_line(error: str) -> bytes:
    """The reply to a refused authentication request; the client raises ``error``."""
    return _line({"success": 0, "error": error.replace("|", "/").replace("\n", " ")})


def parse_control_line(line: bytes) -> dict[str, str]:
    """``key=value|...`` into a dict; raise ProtocolError on anything else."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("control line is not UTF-8") from None
    text = text.rstrip("\r\n")
    if not text:
        raise ProtocolError("empty control line")
    fields: dict[str, str] = {}
    for token in text.split("|"):
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ProtocolError(f"control line token {token!r} is not key=value")
        fields[key] = value
    return fields


@dataclass(frozen=True)
class AuthRequest:
    """What the client asks for when it authenticates."""

    response: str
    dataset: str
    encoding: str
    compression: str
    ts_out: bool
    heartbeat_interval_s: int | None
    client: str


def parse_auth_request(fields: Mapping[str, str]) -> AuthRequest:
    """Validate the client's authentication line."""
    for required in ("auth", "dataset"):
        if required not in fields:
            raise ProtocolError(f"authentication request has no {required}")
    encoding = fields.get("encoding", "dbn").lower()
    if encoding != "dbn":
        raise ProtocolError(f"encoding {encoding!r} is not supported (only dbn)")
    compression = fields.get("compression", "none").lower()
    if compression not in SUPPORTED_COMPRESSION:
        raise ProtocolError(f"compression {compression!r} is not supported (none, zstd)")
    ts_out = fields.get("ts_out", "0")
    if ts_out not in ("0", "1"):
        raise ProtocolError(f"ts_out must be 0 or 1, got {ts_out!r}")
    heartbeat: int | None = None
    if "heartbeat_interval_s" in fields:
        try:
            heartbeat = int(fields["heartbeat_interval_s"])
        except ValueError:
            raise ProtocolError("heartbeat_interval_s must be an integer") from None
        if heartbeat <= 0:
            raise ProtocolError("heartbeat_interval_s must be positive")
    return AuthRequest(
        response=fields["auth"],
        dataset=fields["dataset"],
        encoding=encoding,
        compression=compression,
        ts_out=ts_out == "1",
        heartbeat_interval_s=heartbeat,
        client=fields.get("client", ""),
    )


def parse_timestamp(text: str) -> int:
    """Nanoseconds since the epoch from an integer or an ISO 8601 time (naive means UTC)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither nanoseconds nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


@dataclass(frozen=True)
class SubscriptionRequest:
    """One subscription line (the client splits long symbol lists over several)."""

    schema: str
    stype_in: str
    symbols: tuple[str, ...]
    start: int | None
    snapshot: bool
    request_id: int | None
    is_last: bool


def parse_subscription(fields: Mapping[str, str]) -> SubscriptionRequest:
    """Validate a subscription line."""
    if "schema" not in fields:
        raise ProtocolError("subscription has no schema")
    try:
        schema = str(databento_dbn.Schema.from_str(fields["schema"]))
    except databento_dbn.DBNError:
        raise ProtocolError(f"unknown schema {fields['schema']!r}") from None
    try:
        stype_in = str(databento_dbn.SType.from_str(fields.get("stype_in", "raw_symbol")))
    except databento_dbn.DBNError:
        raise ProtocolError(f"unknown stype_in {fields.get('stype_in')!r}") from None
    symbols = tuple(s.strip() for s in fields.get("symbols", ALL_SYMBOLS).split(",") if s.strip())
    if not symbols:
        raise ProtocolError("subscription has no symbols")
    start: int | None = None
    if fields.get("start"):
        try:
            start = parse_timestamp(fields["start"])
        except ValueError as exc:
            raise ProtocolError(f"start: {exc}") from None
    snapshot = fields.get("snapshot", "0") == "1"
    if snapshot and start is not None:
        raise ProtocolError("a subscription with snapshot=1 cannot have a start")
    request_id: int | None = None
    if fields.get("id"):
        try:
            request_id = int(fields["id"])
        except ValueError:
            raise ProtocolError(f"subscription id {fields['id']!r} is not an integer") from None
    return SubscriptionRequest(
        schema=schema,
        stype_in=stype_in,
        symbols=symbols,
        start=start,
        snapshot=snapshot,
        request_id=request_id,
        is_last=fields.get("is_last", "1") != "0",
    )


# ------------------------------------------------------------------------------ DBN records


def metadata_header(dataset: str, start: int, version: int, ts_out: bool) -> bytes:
    """The DBN metadata that opens a live session.

    As Databento's live gateway: the schema and ``stype_in`` are unset (a session may mix
    schemas and symbologies), ``stype_out`` is instrument_id, no symbols and no mappings
    (those arrive as ``SymbolMappingMsg`` records).
    """
    metadata = databento_dbn.Metadata(
        dataset=dataset,
        start=start,
        stype_in=None,
        stype_out=_INSTRUMENT_ID,
        schema=None,
        symbols=[],
        partial=[],
        not_found=[],
        mappings=[],
        ts_out=ts_out,
        version=version,
    )
    return bytes(metadata.encode())


def symbol_mapping_record(
    version: int, instrument_id: int, ts_event: int, in_symbol: str, out_symbol: str
) -> bytes:
    """A live ``SymbolMappingMsg``: the subscribed symbol and the instrument's raw symbol."""
    undefined = databento_dbn.UNDEF_TIMESTAMP
    if version == 1:
        return bytes(
            databento_dbn.SymbolMappingMsgV1(
                publisher_id=0,
                instrument_id=instrument_id,
                ts_event=ts_event,
                stype_in_symbol=in_symbol,
                stype_out_symbol=out_symbol,
                start_ts=undefined,
                end_ts=undefined,
            )
        )
    record = bytearray(
        bytes(
            databento_dbn.SymbolMappingMsg(
                publisher_id=0,
                instrument_id=instrument_id,
                ts_event=ts_event,
                stype_in=_RAW_SYMBOL,
                stype_in_symbol=in_symbol,
                stype_out=_RAW_SYMBOL,
                stype_out_symbol=out_symbol,
                start_ts=undefined,
                end_ts=undefined,
            )
        )
    )
    # Databento's live gateway leaves both stype bytes unset (0xFF; seen in a recorded
    # session), so the records here are byte-identical to the real ones.
    record[16] = _UNSET_STYPE
    record[17 + databento_dbn.SYMBOL_CSTR_LEN_V2] = _UNSET_STYPE
    return bytes(record)


def system_record(version: int, ts_event: int, message: str, code: SystemCode) -> bytes:
    """A ``SystemMsg`` (heartbeat, subscription acknowledgement, replay completed)."""
    if version == 1:
        return bytes(databento_dbn.SystemMsgV1(ts_event=ts_event, msg=message))
    return bytes(databento_dbn.SystemMsg(ts_event=ts_event, msg=message, code=code))


def error_record(version: int, ts_event: int, message: str, code: ErrorCode) -> bytes:
    """An ``ErrorMsg``; the client raises its text when the connection then closes."""
    if version == 1:
        return bytes(databento_dbn.ErrorMsgV1(ts_event=ts_event, err=message[:63]))
    return bytes(databento_dbn.ErrorMsg(ts_event=ts_event, err=message[:301], code=code))


def with_ts_out(records: bytes, ts_out: int) -> bytes:
    """Append the send time to every record and grow its length, as for ``ts_out=1``.

    Raises ``ValueError`` when ``records`` do not end on a record boundary or a record is too
    long to grow (its length byte would pass 255 words).
    """
    raw = np.frombuffer(records, dtype=np.uint8)
    offsets, end = walk_records(raw)
    n = len(offsets) - 1
    if end != len(raw):
        raise ValueError(f"records end with a torn record at byte {end} of {len(raw)}")
    if n == 0:
        return b""
    stamp = np.frombuffer(ts_out.to_bytes(8, "little"), dtype=np.uint8)
    sizes = np.diff(offsets)
    if int(raw[offsets[:-1]].max()) > 255 - _TS_OUT_WORDS:
        raise ValueError("a record is too long to append ts_out to (255 words at most)")
    if bool((sizes == sizes[0]).all()):
        size = int(sizes[0])
        table = np.empty((n, size + 8), dtype=np.uint8)
        table[:, :size] = raw.reshape(n, size)
        table[:, size:] = stamp
        table[:, 0] += _TS_OUT_WORDS
        return table.tobytes()
    # Mixed sizes: record i moves 8 * i bytes on; its stamp follows it.
    shift = 8 * np.arange(n, dtype=np.int64)
    out = np.empty(len(raw) + 8 * n, dtype=np.uint8)
    out[np.arange(len(raw), dtype=np.int64) + np.repeat(shift, sizes)] = raw
    out[(offsets[1:] + shift)[:, None] + np.arange(8)] = stamp
    out[offsets[:-1] + shift] += _TS_OUT_WORDS
    return out.tobytes()
