"""The synthetic MBO generator: DBN round trip, determinism, validity under Databento book rules."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import databento as db
import numpy as np
import pytest
from databento_dbn import SType

from engine.events import (
    ACTION_ADD,
    ACTION_CANCEL,
    ACTION_CLEAR,
    ACTION_FILL,
    ACTION_MODIFY,
    ACTION_TRADE,
    EVENT_DTYPE,
    F_LAST,
    F_SNAPSHOT,
    SIDE_ASK,
    SIDE_BID,
    UNDEF_PRICE,
)
from engine.synthetic import (
    DBN_MBO_DTYPE,
    encode_mbo_records,
    generate_events,
    write_dbn,
    write_synthetic_dbn,
)

N_EVENTS = 60_000
SEED = 7
TICK = 250_000_000
SNAPSHOT = 2000


@pytest.fixture(scope="module")
def events() -> np.ndarray:
    return generate_events(N_EVENTS, SEED)


@dataclass
class Stats:
    """What the reference book saw while replaying the events."""

    kinds: Counter[str] = field(default_factory=Counter)
    mids: list[float] = field(default_factory=list)
    shared_ts_groups: int = 0


class ReferenceBook:
    """A plain dict book applying Databento MBO rules; raises AssertionError on invalid flow."""

    def __init__(self) -> None:
        self.orders: dict[int, tuple[int, int, int]] = {}  # order_id -> (side, price, size)
        self.depth: dict[int, Counter[int]] = {SIDE_BID: Counter(), SIDE_ASK: Counter()}

    def _put(self, oid: int, side: int, price: int, size: int) -> None:
        self.orders[oid] = (side, price, size)
        self.depth[side][price] += 1

    def _drop(self, oid: int) -> tuple[int, int, int]:
        side, price, size = self.orders.pop(oid)
        self.depth[side][price] -= 1
        if self.depth[side][price] == 0:
            del self.depth[side][price]
        return side, price, size

    def apply(self, action: int, side: int, oid: int, price: int, size: int) -> int:
        """Apply one record; return how much it reduced an existing order's size."""
        if action == ACTION_CLEAR:
            self.orders.clear()
            self.depth = {SIDE_BID: Counter(), SIDE_ASK: Counter()}
        elif action == ACTION_ADD:
            assert oid not in self.orders, f"duplicate add of {oid}"
            assert size > 0
            self._put(oid, side, price, size)
        elif action == ACTION_CANCEL:
            assert oid in self.orders, f"cancel of unknown order {oid}"
            o_side, o_price, o_size = self.orders[oid]
            assert (o_side, o_price) == (side, price), "cancel with wrong side/price"
            assert 0 < size <= o_size, f"cancel {size} larger than order {o_size}"
            if size == o_size:
                self._drop(oid)
            else:
                self.orders[oid] = (side, price, o_size - size)
            return size
        elif action == ACTION_MODIFY:
            assert oid in self.orders, f"modify of unknown order {oid}"
            o_side, _, o_size = self._drop(oid)
            assert o_side == side
            assert size > 0
            self._put(oid, side, price, size)
            return o_size - size
        return 0

    def best(self) -> tuple[int, int]:
        assert self.depth[SIDE_BID], "the bid side of the book is empty"
        assert self.depth[SIDE_ASK], "the ask side of the book is empty"
        return max(self.depth[SIDE_BID]), min(self.depth[SIDE_ASK])


def replay(ev: np.ndarray) -> Stats:
    """Replay through the reference book checking every rule; return what was seen."""
    book = ReferenceBook()
    stats = Stats()
    acts = ev["action"].tolist()
    sides = ev["side"].tolist()
    oids = ev["order_id"].tolist()
    prices = ev["price"].tolist()
    sizes = ev["size"].tolist()
    flags = ev["flags"].tolist()
    ts = list(zip(ev["ts_event"].tolist(), ev["ts_recv"].tolist(), strict=True))
    seen_ids: set[int] = set()
    fills: Counter[int] = Counter()
    reductions: Counter[int] = Counter()
    trade_side = 0
    trade_left = 0
    prev_group_ts = (-1, -1)
    in_snapshot = True
    for k, (act, side, oid, price, size, flag) in enumerate(
        zip(acts, sides, oids, prices, sizes, flags, strict=True)
    ):
        if act != ACTION_CLEAR:
            assert price % TICK == 0, f"record {k}: price {price} off tick"
            assert price > 0, f"record {k}: price {price} not positive"
        if act == ACTION_ADD:
            assert oid not in seen_ids, f"record {k}: order id reused"
            seen_ids.add(oid)
        if act == ACTION_TRADE:
            assert trade_left == 0, f"record {k}: previous trade not covered by fills"
            trade_side, trade_left = side, size
            stats.kinds["T"] += 1
            continue
        if act == ACTION_FILL:
            assert side != trade_side, f"record {k}: fill on the aggressor's side"
            assert trade_left >= size, f"record {k}: fills exceed their trade"
            trade_left -= size
            fills[oid] += size
            stats.kinds["F"] += 1
            continue
        assert trade_left == 0, f"record {k}: trade not covered by its fills"
        if act == ACTION_CANCEL:
            stats.kinds["C full" if book.orders[oid][2] == size else "C partial"] += 1
        elif act == ACTION_MODIFY:
            _, o_price, o_size = book.orders[oid]
            if o_price != price:
                stats.kinds["M price"] += 1
            else:
                stats.kinds["M down" if size < o_size else "M up"] += 1
        elif act == ACTION_ADD:
            stats.kinds["A"] += 1
        elif act == ACTION_CLEAR:
            stats.kinds["R"] += 1
        reductions[oid] += book.apply(act, side, oid, price, size)
        if flag & F_LAST:
            assert not fills or {o: reductions[o] for o in fills} == dict(fills), (
                f"record {k}: fills not matched by cancels/modifies of the same orders"
            )
            fills.clear()
            reductions.clear()
            if not in_snapshot:
                bid, ask = book.best()
                assert bid < ask, f"record {k}: book crossed after F_LAST"
                stats.mids.append((bid + ask) / 2 / TICK)
            in_snapshot = False
            if ts[k] == prev_group_ts:
                stats.shared_ts_groups += 1
            prev_group_ts = ts[k]
        else:
            assert flag in (0, F_SNAPSHOT), f"record {k}: non-last flags {flag}"
    assert not fills, "stream ends inside a fill group"
    assert trade_left == 0, "stream ends inside a trade"
    return stats


def test_record_layout_matches_real_dbn(sample_dir: Path) -> None:
    store = db.DBNStore.from_file(sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst")
    arr = store.to_ndarray()
    for k, rec in enumerate(store):
        if k in (0, 9650, 9651, 9716, 30_000):
            ours = np.zeros(1, dtype=DBN_MBO_DTYPE)
            for name in DBN_MBO_DTYPE.names or ():
                value = arr[k][name]
                ours[name] = ord(value) if isinstance(value, bytes) else value
            assert ours.tobytes() == bytes(rec)
        if k > 30_000:
            break


def test_encode_writes_header_fields(events: np.ndarray) -> None:
    rec = encode_mbo_records(events[:10], publisher_id=1)
    assert rec.dtype.itemsize == 56
    assert (rec["length"] == 14).all()
    assert (rec["rtype"] == 0xA0).all()
    assert (rec["publisher_id"] == 1).all()


@pytest.mark.parametrize("suffix", [".dbn.zst", ".dbn"])
def test_dbn_round_trip(events: np.ndarray, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"syn{suffix}"
    write_dbn(events, path)
    store = db.DBNStore.from_file(path)
    meta = store.metadata
    assert meta.version == 3
    assert meta.dataset == "GLBX.MDP3"
    assert meta.schema == "mbo"
    assert meta.stype_in == SType.from_str("raw_symbol")
    assert meta.stype_out == SType.from_str("instrument_id")
    assert meta.symbols == ["ESH4"]
    assert meta.start == int(events["ts_recv"][0])
    assert meta.end == int(events["ts_recv"][-1]) + 1
    assert meta.mappings["ESH4"][0]["symbol"] == "17077"
    got = store.to_ndarray()
    assert len(got) == len(events)
    assert (got["rtype"] == 0xA0).all()
    assert (got["publisher_id"] == 1).all()
    for name in EVENT_DTYPE.names or ():
        want = events[name]
        have = got[name]
        if name in ("action", "side"):
            have = have.view(np.uint8)
        np.testing.assert_array_equal(have, want, err_msg=name)


def test_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.dbn.zst", tmp_path / "b.dbn.zst", tmp_path / "c.dbn.zst"
    write_synthetic_dbn(a, 20_000, 11)
    write_synthetic_dbn(b, 20_000, 11)
    write_synthetic_dbn(c, 20_000, 12)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert generate_events(20_000, 11).tobytes() != generate_events(20_000, 12).tobytes()


def test_exact_count_and_envelope(events: np.ndarray) -> None:
    assert len(events) == N_EVENTS
    assert events.dtype == EVENT_DTYPE
    assert (events["instrument_id"] == 17077).all()
    assert (np.diff(events["ts_recv"].astype(np.int64)) >= 0).all()
    assert (events["ts_event"] <= events["ts_recv"]).all()
    assert (np.diff(events["sequence"].astype(np.int64)) > 0).all()
    assert events["flags"][-1] & F_LAST
    for n in (0, 1, 5, 100, 2500):
        small = generate_events(n, 3)
        assert len(small) == n
        if n:
            assert small["flags"][-1] & F_LAST
            replay(small)


def test_snapshot_block(events: np.ndarray) -> None:
    snap = events[: SNAPSHOT + 1]
    assert snap["action"][0] == ACTION_CLEAR
    assert snap["price"][0] == UNDEF_PRICE
    assert (snap["action"][1:] == ACTION_ADD).all()
    assert (snap["flags"] & F_SNAPSHOT).all()
    assert (snap["flags"][:-1] & F_LAST == 0).all()
    assert snap["flags"][-1] & F_LAST
    assert not (events["flags"][SNAPSHOT + 1 :] & F_SNAPSHOT).any()


def test_valid_under_book_rules(events: np.ndarray) -> None:
    stats = replay(events)
    for kind in ("A", "C full", "C partial", "M price", "M down", "M up", "T", "F", "R"):
        assert stats.kinds[kind] > 0, kind
    assert stats.shared_ts_groups > 0
    mids = np.array(stats.mids)
    assert mids.max() - mids.min() >= 4, "spot does not move"


def test_trade_and_fill_conventions(events: np.ndarray) -> None:
    trades = np.flatnonzero(events["action"] == ACTION_TRADE)
    assert len(trades) > 100
    for t in trades[:200]:
        trade, fill = events[t], events[t + 1]
        assert fill["action"] == ACTION_FILL
        assert trade["side"] in (SIDE_BID, SIDE_ASK)
        assert fill["side"] != trade["side"]
        assert trade["price"] == fill["price"]
        assert trade["ts_event"] == fill["ts_event"]
        assert trade["flags"] == 0
        assert fill["flags"] == 0
        assert trade["order_id"] != fill["order_id"]
    # the aggressor's order id is the one of its resting residual, when it rests
    adds = events["order_id"][events["action"] == ACTION_ADD]
    assert np.isin(events["order_id"][trades], adds).any()
    assert (events["action"] == ACTION_CANCEL).any()
    assert (events["action"] == ACTION_MODIFY).any()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of tick_size"):
        generate_events(10, 1, start_price=4800 * 10**9 + 1)
    with pytest.raises(ValueError, match="n_events"):
        generate_events(-1, 1)
    ev = generate_events(10, 1)
    ev["instrument_id"][3] = 5
    with pytest.raises(ValueError, match="one instrument_id"):
        write_dbn(ev, Path("/nonexistent/x.dbn"))
