"""The official ``databento.Live`` client with a raw record path: the gateway's bytes, in blocks.

``databento.Live`` (0.87, pinned) decodes every record into a Python object on its event loop
and hands each one to callbacks, streams and a queue, checking its type and logging on the way:
about 400k records/s is all a core gets through, whatever the consumer does. Ingestion wants
the records exactly as the gateway sent them, so this module keeps the client for everything it
does well (connection, CRAM authentication, subscriptions with ``start=``, the session start,
the DBN metadata, its heartbeat monitor, stop / terminate / ``block_for_close``) and replaces
one step of each connection's protocol: ``_process_dbn(data)``, which
``DatabentoLiveProtocol.buffer_updated`` calls with the bytes of every socket read once the
session is authenticated. The replacement (:class:`_RawPath`) hands the DBN metadata header to
the stock method, so the client decodes it as always (``client.metadata``), and appends every
later byte to a :class:`RawRecordFeed`, which the consumer's thread cuts into
:class:`~qmachina.live.record_block.RecordBlock` s: no Python object per record.

What the stock path did per record and the raw path does not: calling ``add_callback``
callbacks, writing ``add_stream`` streams, filling the iteration queue, the client's symbology
map and logging gateway errors (the consumer decodes the rare control records itself, see
:meth:`RawRecordFeed.decode`). The records keep the gateway's DBN version (the stock decoder
upgrades them to v3): :attr:`RawRecordFeed.version` says which it is.

The hook is installed in one place, :func:`raw_live_client`, after :func:`check_client_shape`
has checked that the pinned client still has the shape it relies on (it raises
:class:`ClientShapeError` naming what changed); ``tests/test_live_raw_client.py`` cross-checks
that the raw path yields exactly the records the stock client decodes.
"""

from __future__ import annotations

import importlib.metadata
import threading
from typing import Any, Final, cast

import databento
import databento_dbn
from databento.live.protocol import DatabentoLiveProtocol
from databento.live.session import LiveSession, _SessionProtocol

from qmachina.live.record_block import RecordBlock

__all__ = [
    "ClientShapeError",
    "RawRecordFeed",
    "RawStreamError",
    "check_client_shape",
    "raw_live_client",
]

_PRELUDE: Final = 8  # b"DBN", version byte, u32 metadata length
_MIN_RECORD: Final = 16  # a record header
_AS_IS: Final = cast("databento_dbn.VersionUpgradePolicy", databento_dbn.VersionUpgradePolicy.AS_IS)
#: What the hook relies on: (class, attribute) pairs of the pinned client.
_SHAPE: Final = (
    (LiveSession, "_create_protocol"),
    (DatabentoLiveProtocol, "_process_dbn"),
    (DatabentoLiveProtocol, "buffer_updated"),
    (DatabentoLiveProtocol, "transport"),
    (_SessionProtocol, "received_metadata"),
)
#: Instance attributes of a ``_SessionProtocol`` the hook reads or sets.
_PROTOCOL_ATTRIBUTES: Final = ("_loop", "_last_msg_loop_time", "_process_dbn")


class ClientShapeError(RuntimeError):
    """The installed ``databento`` client no longer has the shape the raw path relies on."""


class RawStreamError(Exception):
    """The gateway's bytes are not a DBN stream; the message says where they went wrong."""


def check_client_shape(protocol: object | None = None) -> None:
    """Raise :class:`ClientShapeError` unless the client (and ``protocol``, one of its
    connection protocols, if given) still has every method and attribute the hook uses."""
    missing = [f"{cls.__name__}.{name}" for cls, name in _SHAPE if not hasattr(cls, name)]
    if protocol is not None:
        missing += [
            f"{type(protocol).__name__}.{name}"
            for name in _PROTOCOL_ATTRIBUTES
            if not hasattr(protocol, name)
        ]
    if missing:
        raise ClientShapeError(
            f"databento {importlib.metadata.version('databento')}: the raw record path needs "
            f"{', '.join(missing)}; see qmachina/live/raw_client.py"
        )


class RawRecordFeed:
    """The records of one connection as the gateway sent them, from the client's event loop
    (:meth:`begin`, :meth:`receive`) to one consumer thread (:meth:`take`, :meth:`wait`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._chunks: list[bytes] = []
        self._header: bytes | None = None
        self._metadata: databento_dbn.Metadata | None = None
        self._tail = b""  # a torn record, completed by the next read
        self._taken = 0  # stream bytes taken as complete records

    # ------------------------------------------------------------------ the event loop's side

    def begin(self, header: bytes) -> None:
        """The stream's DBN metadata header arrived (raw bytes)."""
        self._header = header
        self._ready.set()

    def receive(self, data: bytes) -> None:
        """Bytes after the header arrived: records, the last one possibly cut short."""
        with self._lock:
            self._chunks.append(data)
        self._ready.set()

    # --------------------------------------------------------------------- the consumer's side

    @property
    def metadata(self) -> databento_dbn.Metadata | None:
        """The gateway's DBN metadata, as sent (not upgraded); None until it has arrived."""
        if self._metadata is None and self._header is not None:
            self._metadata = databento_dbn.Metadata.decode(self._header, upgrade_policy=_AS_IS)
        return self._metadata

    @property
    def version(self) -> int | None:
        """The DBN version of the records (the gateway's); None until the metadata arrived."""
        return None if self._header is None else self._header[3]

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for bytes not taken yet; whether there are some."""
        return self._ready.wait(timeout)

    def take(self) -> RecordBlock:
        """The complete records received since the last call, in stream order.

        Raises :class:`RawStreamError` when the bytes cannot be a record (a length byte under
        the 16-byte record header).
        """
        with self._lock:
            chunks, self._chunks = self._chunks, []
            self._ready.clear()
        if not chunks:
            return RecordBlock.empty()
        data = b"".join([self._tail, *chunks]) if self._tail or len(chunks) > 1 else chunks[0]
        block, end = RecordBlock.parse(data)
        self._tail = data[end:]
        if self._tail and self._tail[0] * 4 < _MIN_RECORD:
            raise RawStreamError(
                f"record {len(block)} of a read at stream byte {self._taken + end} claims "
                f"{self._tail[0] * 4} bytes; a DBN record has at least {_MIN_RECORD}"
            )
        self._taken += end
        return block

    def decode(self, block: RecordBlock) -> list[Any]:
        """``block``'s records as ``databento_dbn`` objects, in the gateway's DBN version (for
        the rare control records: symbol mappings, errors, system messages)."""
        if self._header is None:
            raise RawStreamError("records arrived before the DBN metadata")
        decoder = databento_dbn.DBNDecoder(upgrade_policy=_AS_IS)
        decoded = list(decoder.write_and_decode(self._header + block.data))
        return decoded[1:]  # the metadata first


class _RawPath:
    """Stands in for one protocol's ``_process_dbn``: the metadata header to the stock method,
    everything after it to the feed (runs on the client's event loop)."""

    def __init__(self, protocol: Any, feed: RawRecordFeed) -> None:
        check_client_shape(protocol)
        self._protocol = protocol
        self._stock = protocol._process_dbn
        self._feed = feed
        self._head = b""  # the metadata header so far
        self._in_records = False

    def __call__(self, data: bytes) -> None:
        protocol = self._protocol
        # What the stock path does per record, once per read: the client's heartbeat monitor
        # takes any bytes as a sign of life.
        protocol._last_msg_loop_time = protocol._loop.time()
        if not self._in_records:
            head = self._head + data
            if len(head) >= 4 and head[:3] != b"DBN":
                protocol.transport.close()
                raise RawStreamError(f"the session does not start with DBN metadata: {head[:8]!r}")
            if len(head) < _PRELUDE:
                self._head = head
                return
            end = _PRELUDE + int.from_bytes(head[4:8], "little")
            if len(head) < end:
                self._head = head
                return
            self._stock(head[:end])  # the client decodes its metadata as always
            self._feed.begin(head[:end])
            self._in_records, self._head = True, b""
            data = head[end:]
            if not data:
                return
        self._feed.receive(data)


def raw_live_client(feed: RawRecordFeed, **options: Any) -> databento.Live:
    """A ``databento.Live(**options)`` whose connections hand their records to ``feed``.

    Use one client (and one feed) per connection; the client's own reconnection would send a
    second stream into the same feed, so ``reconnect_policy`` must stay ``"none"``.
    """
    if options.get("reconnect_policy", "none") != "none":
        raise ValueError("the raw record path takes one connection: reconnect_policy='none'")
    check_client_shape()
    client = databento.Live(**options)
    session = client._session
    stock_factory = session._create_protocol

    def create_protocol(dataset: str) -> Any:
        protocol = stock_factory(dataset=dataset)
        protocol._process_dbn = _RawPath(protocol, feed)  # type: ignore[method-assign]
        return protocol

    # The one hook: LiveSession._connect_task builds each connection's protocol through it.
    session._create_protocol = create_protocol  # type: ignore[method-assign]
    return client
