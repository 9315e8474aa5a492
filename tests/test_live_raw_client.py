"""The official client's raw record path (qmachina.live.raw_client) against the stock client.

Both connect to the local gateway and take the same subscription once the gateway's market has
released its whole tape (so the gateway's clock, which stamps control records and ``ts_out``,
no longer moves): the raw path must yield exactly the records the stock client decodes, in
the gateway's own DBN version.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from pathlib import Path
from typing import Any, cast

import databento
import databento_dbn
import pytest
from databento.live.protocol import DatabentoLiveProtocol

from qmachina.live.gateway import GatewayThread, LiveGateway
from qmachina.live.raw_client import (
    ClientShapeError,
    RawRecordFeed,
    RawStreamError,
    check_client_shape,
    raw_live_client,
)
from qmachina.live.record_block import CONTROL_RTYPES, RecordBlock
from tests.live_tapes import DATASET, ESH4, ESM4, T0, write_two_contract_tape

KEY = "db-" + "r" * 24 + "tests"
MBO = 0xA0
_UPGRADE = cast(
    "databento_dbn.VersionUpgradePolicy", databento_dbn.VersionUpgradePolicy.UPGRADE_TO_V3
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_two_contract_tape(tmp_path_factory.mktemp("raw-tape"))


def _finished(gateway: LiveGateway) -> LiveGateway:
    deadline = time.monotonic() + 30
    while not gateway.finished:
        assert time.monotonic() < deadline, "the gateway never released its whole tape"
        time.sleep(0.01)
    return gateway


def _stock(port: int, symbols: list[str], start: int, ts_out: bool) -> list[Any]:
    client = databento.Live(key=KEY, gateway="127.0.0.1", port=port, ts_out=ts_out)
    got: list[Any] = []
    client.add_callback(got.append)
    client.subscribe(DATASET, "mbo", symbols, start=start)
    client.start()
    client.block_for_close(timeout=30)
    return got


def _raw(port: int, symbols: list[str], start: int, ts_out: bool) -> tuple[RawRecordFeed, bytes]:
    feed = RawRecordFeed()
    client = raw_live_client(feed, key=KEY, gateway="127.0.0.1", port=port, ts_out=ts_out)
    client.subscribe(DATASET, "mbo", symbols, start=start)
    client.start()
    feed.wait(10)
    # The stock client still decodes the metadata (as v3) and keeps its heartbeat monitor fed.
    deadline = time.monotonic() + 10
    while client.metadata is None or feed.version is None:
        assert time.monotonic() < deadline, "no metadata"
        time.sleep(0.001)
    assert client.metadata.version == 3
    protocol = client._session._protocol
    assert protocol is not None
    assert math.isfinite(protocol._last_msg_loop_time)
    client.block_for_close(timeout=30)
    return feed, feed.take().data


@pytest.mark.parametrize("ts_out", [False, True])
@pytest.mark.parametrize("tape", ["synthetic-v3", "es-v1"])
def test_raw_path_yields_exactly_the_records_the_stock_client_decodes(
    tape: str, ts_out: bool, synthetic: list[Path], sample_dir: Path
) -> None:
    if tape == "es-v1":
        paths, symbols = [sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst"], ["ESH4"]
        version = 1
    else:
        paths, symbols, version = synthetic, ["ESH4", "ESM4"], 3
    options: dict[str, Any] = {"keys": [KEY], "speed": math.inf, "close_at_end": True}
    if tape == "synthetic-v3":
        options["symbols"] = {"ESH4": ESH4, "ESM4": ESM4}
    with GatewayThread(LiveGateway.from_files(paths, **options)) as gw:
        _finished(gw)
        start = gw.tape.start_ns
        stock = _stock(gw.port, symbols, start, ts_out)
        feed, raw = _raw(gw.port, symbols, start, ts_out)
    assert feed.version == version
    metadata = feed.metadata
    assert metadata is not None
    assert (metadata.version, metadata.ts_out) == (version, ts_out)
    # Decoded and upgraded as the stock client does it, the raw bytes are its records.
    decoder = databento_dbn.DBNDecoder(upgrade_policy=_UPGRADE)
    upgraded = list(decoder.write_and_decode(bytes(metadata.encode()) + raw))[1:]
    assert len(stock) > 5000
    assert [bytes(r) for r in upgraded] == [bytes(r) for r in stock]
    # The control records are there, and MBO records are the same bytes in every version.
    block, end = RecordBlock.parse(raw)
    assert end == len(raw)
    assert set(block.rtype.tolist()) & set(CONTROL_RTYPES)
    mbo = [block.record(i) for i in range(len(block)) if block.rtype[i] == MBO]
    assert mbo == [bytes(r) for r in stock if isinstance(r, databento_dbn.MBOMsg)]


def _stream(n: int) -> bytes:
    """``n`` records of mixed sizes: MBO (56 bytes) and heartbeats (SystemMsg)."""
    rng = random.Random(n)
    out = bytearray()
    for i in range(n):
        if rng.random() < 0.2:
            out += bytes(databento_dbn.SystemMsg(ts_event=T0 + i, msg="Heartbeat"))
        else:
            record = bytearray(56)
            record[0], record[1] = 14, MBO
            record[4:8] = ESH4.to_bytes(4, "little")
            record[8:16] = (T0 + i).to_bytes(8, "little")
            out += record
    return bytes(out)


def test_the_feed_cuts_reads_into_whole_records_wherever_they_tear() -> None:
    stream = _stream(500)
    reference, _ = RecordBlock.parse(stream)
    rng = random.Random(7)
    feed = RawRecordFeed()
    assert not feed.wait(0)
    feed.begin(b"DBN\x03" + bytes(4))
    assert feed.version == 3
    got: list[bytes] = []
    pos = 0
    while pos < len(stream):
        cut = min(len(stream), pos + rng.randrange(1, 300))
        feed.receive(stream[pos:cut])
        pos = cut
        if rng.random() < 0.5:
            assert feed.wait(0)
            got += feed.take().records()
    got += feed.take().records()
    assert got == reference.records()
    assert len(got) == 500


def test_the_feed_names_where_the_stream_stops_being_dbn() -> None:
    feed = RawRecordFeed()
    feed.begin(b"DBN\x03" + bytes(4))
    stream = _stream(3)
    feed.receive(stream + b"\x02" + bytes(30))
    with pytest.raises(RawStreamError, match=f"stream byte {len(stream)} claims 8 bytes"):
        feed.take()


def test_the_pinned_client_has_the_shape_the_hook_needs() -> None:
    check_client_shape()
    # The hook replaces the step buffer_updated hands every authenticated read to.
    assert "self._process_dbn(data)" in inspect.getsource(DatabentoLiveProtocol.buffer_updated)

    class Changed:
        _loop = None

    with pytest.raises(ClientShapeError, match=r"Changed\._last_msg_loop_time, Changed\._proc"):
        check_client_shape(Changed())
    with pytest.raises(ValueError, match="reconnect_policy"):
        raw_live_client(RawRecordFeed(), key=KEY, reconnect_policy="reconnect")
