"""The numba L3 book against the plain-Python reference, on random streams and real files."""

from __future__ import annotations

from pathlib import Path

import databento as db
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.book import OrderBook, price_text
from engine.book_kernel import tick_of
from engine.events import (
    ACTION_ADD,
    ACTION_CANCEL,
    ACTION_CLEAR,
    ACTION_FILL,
    ACTION_MODIFY,
    ACTION_TRADE,
    EVENT_DTYPE,
    F_LAST,
    F_MAYBE_BAD_BOOK,
    F_SNAPSHOT,
    SIDE_ASK,
    SIDE_BID,
    SIDE_NONE,
)
from engine.replay import replay_files
from tests.reference_book import ReferenceBook

TICK = 250_000_000
BASE_PRICE = 4800 * 1_000_000_000


def assert_books_equal(book: OrderBook, ref: ReferenceBook, where: str) -> None:
    for side in (0, 1):
        expected = ref.levels(side)
        got = book.top(side, len(expected) + 1)
        assert [(lv.tick * TICK, lv.size, lv.count) for lv in got] == [
            (price, size, count) for price, size, count, _ in expected
        ], f"{where}: side {side} levels differ"
        for price, _, _, queue in expected:
            assert book.queue(side, price // TICK) == queue, f"{where}: queue at {price} differs"
    assert book.order_count == len(ref.orders), where


@st.composite
def mbo_streams(draw: st.DrawFn) -> np.ndarray:
    """Random streams that mix every action, snapshot blocks, clears and far-away prices."""
    n = draw(st.integers(min_value=1, max_value=250))
    events = np.zeros(n, dtype=EVENT_DTYPE)
    live: list[int] = []
    next_id = 1
    in_snapshot = False
    for i in range(n):
        kind = draw(
            st.sampled_from(
                ["add"] * 6 + ["cancel"] * 3 + ["modify"] * 3 + ["tf", "clear", "snapshot", "bad"]
            )
        )
        flags = F_LAST if draw(st.booleans()) else 0
        side = draw(st.sampled_from([SIDE_BID, SIDE_ASK]))
        far = draw(st.integers(0, 20)) == 0
        offset = draw(st.integers(-6000, 6000)) if far else draw(st.integers(-8, 8))
        price = BASE_PRICE + offset * TICK
        size = draw(st.integers(1, 50))
        order_id = 0
        action = ACTION_ADD
        if kind == "snapshot" or (in_snapshot and draw(st.booleans())):
            in_snapshot = True
            flags |= F_SNAPSHOT
            order_id = next_id
            next_id += 1
            live.append(order_id)
        elif kind == "add" or (not live and kind in ("cancel", "modify")):
            order_id = next_id
            next_id += 1
            live.append(order_id)
        elif kind == "cancel":
            action = ACTION_CANCEL
            order_id = draw(st.sampled_from(live))
            size = draw(st.integers(1, 60))
        elif kind == "modify":
            action = ACTION_MODIFY
            order_id = draw(st.sampled_from([*live, next_id + 1000]))
            size = draw(st.integers(0, 60))
        elif kind == "tf":
            action = draw(st.sampled_from([ACTION_TRADE, ACTION_FILL]))
            order_id = draw(st.sampled_from([0, *live]))
        elif kind == "clear":
            action = ACTION_CLEAR
            side = SIDE_NONE
        else:
            action = draw(st.sampled_from([ACTION_CANCEL, ACTION_ADD]))
            order_id = 10**9 + i
            side = SIDE_NONE if action == ACTION_ADD else side
        if not flags & F_SNAPSHOT:
            in_snapshot = False
        events[i] = (i, i, order_id, price, i, 1, size, action, side, flags, 0)
    events[-1]["flags"] |= F_LAST
    return events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mbo_streams())
def test_book_equals_reference_after_every_last(events: np.ndarray) -> None:
    book = OrderBook(TICK, order_capacity=4)  # tiny capacity: growth is exercised too
    ref = ReferenceBook()
    index = 0
    while index < len(events):
        stop = book.apply_until_last(events, index)
        for record in events[index:stop]:
            ref.apply(
                int(record["action"]),
                int(record["side"]),
                int(record["price"]),
                int(record["size"]),
                int(record["order_id"]),
                int(record["flags"]),
            )
        index = stop
        assert book.consistent
        assert_books_equal(book, ref, f"after record {index - 1}")
    anomalies = book.anomalies()
    assert anomalies["cancel_unknown_order"] == ref.cancel_unknown
    assert anomalies["cancel_larger_than_order"] == ref.cancel_oversize


def _event(
    action: int, side: int, price_ticks: int, size: int, order_id: int, flags: int = F_LAST
) -> tuple[int, ...]:
    return (0, 0, order_id, BASE_PRICE + price_ticks * TICK, 0, 1, size, action, side, flags, 0)


def _book_of(*records: tuple[int, ...]) -> OrderBook:
    book = OrderBook(TICK)
    book.apply(np.array(list(records), dtype=EVENT_DTYPE))
    return book


def test_queue_priority_rules() -> None:
    book = _book_of(
        _event(ACTION_ADD, SIDE_BID, 0, 5, 1),
        _event(ACTION_ADD, SIDE_BID, 0, 5, 2),
        _event(ACTION_ADD, SIDE_BID, 0, 5, 3),
        _event(ACTION_MODIFY, SIDE_BID, 0, 3, 1),  # size decrease keeps priority
        _event(ACTION_MODIFY, SIDE_BID, 0, 9, 2),  # size increase loses it
    )
    assert book.queue(0, BASE_PRICE // TICK) == [(1, 3), (3, 5), (2, 9)]
    moved = _book_of(
        _event(ACTION_ADD, SIDE_ASK, 1, 5, 1),
        _event(ACTION_ADD, SIDE_ASK, 1, 5, 2),
        _event(ACTION_MODIFY, SIDE_ASK, 2, 5, 1),  # price change loses priority
        _event(ACTION_MODIFY, SIDE_ASK, 1, 4, 1),  # and coming back joins the back again
    )
    assert moved.queue(1, BASE_PRICE // TICK + 1) == [(2, 5), (1, 4)]
    assert moved.top(1, 5)[0].count == 2


def test_modify_of_unknown_order_is_an_add_and_trades_fills_do_not_change_the_book() -> None:
    book = _book_of(
        _event(ACTION_MODIFY, SIDE_BID, 0, 7, 42),
        _event(ACTION_TRADE, SIDE_ASK, 0, 7, 0),
        _event(ACTION_FILL, SIDE_BID, 0, 7, 42),
    )
    assert book.queue(0, BASE_PRICE // TICK) == [(42, 7)]
    assert book.anomalies()["modify_of_unknown_order"] == 1


def test_snapshot_without_clear_replaces_the_book() -> None:
    book = _book_of(
        _event(ACTION_ADD, SIDE_BID, 0, 5, 1),
        _event(ACTION_ADD, SIDE_ASK, 4, 5, 2),
        _event(ACTION_ADD, SIDE_BID, -1, 2, 3, F_SNAPSHOT),
        _event(ACTION_ADD, SIDE_ASK, 3, 2, 4, F_SNAPSHOT | F_LAST),
    )
    assert book.order_count == 2
    assert (book.best_tick(0), book.best_tick(1)) == (
        BASE_PRICE // TICK - 1,
        BASE_PRICE // TICK + 3,
    )


def test_anomalies_are_counted_not_fatal() -> None:
    book = _book_of(
        _event(ACTION_CANCEL, SIDE_BID, 0, 1, 99),
        _event(ACTION_ADD, SIDE_BID, 0, 5, 1),
        _event(ACTION_CANCEL, SIDE_BID, 0, 9, 1),
        _event(ACTION_ADD, SIDE_BID, 5, 5, 2),
        _event(ACTION_ADD, SIDE_ASK, 4, 5, 3, F_LAST | F_MAYBE_BAD_BOOK),
        _event(ACTION_FILL, SIDE_ASK, 4, 5, 77),
        _event(ACTION_ADD, SIDE_NONE, 4, 5, 4),
    )
    anomalies = book.anomalies()
    assert anomalies["cancel_unknown_order"] == 1
    assert anomalies["cancel_larger_than_order"] == 1
    assert anomalies["crossed_book_after_last"] == 3  # stays crossed for three F_LASTs
    assert anomalies["maybe_bad_book_flag"] == 1
    assert anomalies["fill_of_unknown_order"] == 1
    assert anomalies["bad_side"] == 1
    assert book.order_count == 2


def test_off_tick_price_is_counted() -> None:
    record = list(_event(ACTION_ADD, SIDE_BID, 0, 5, 1))
    record[3] += 1
    book = _book_of(tuple(record))
    assert book.anomalies()["price_off_tick"] == 1


def test_price_text_is_exact() -> None:
    assert price_text(4_810_250_000_000, 2) == "4810.25"
    assert price_text(-1_500_000_000, 1) == "-1.5"
    assert price_text(7_000_000_000, 0) == "7"


def read_file(path: Path) -> np.ndarray:
    return np.concatenate(list(replay_files([path])))


def _reference_of(events: np.ndarray) -> ReferenceBook:
    ref = ReferenceBook()
    for action, side, price, size, oid, flags in zip(
        events["action"].tolist(),
        events["side"].tolist(),
        events["price"].tolist(),
        events["size"].tolist(),
        events["order_id"].tolist(),
        events["flags"].tolist(),
        strict=True,
    ):
        ref.apply(action, side, price, size, oid, flags)
    return ref


def test_real_es_file_final_book(sample_dir: Path) -> None:
    events = read_file(sample_dir / "esh4-glbx-mdp3-20231225.mbo.dbn.zst")
    book = OrderBook(TICK)
    book.apply(events)
    assert book.order_count == 11_217
    assert price_text(book.best_price(0) or 0, 2) == "4810.00"
    assert price_text(book.best_price(1) or 0, 2) == "4810.25"
    assert_books_equal(book, _reference_of(events), "end of esh4-glbx-mdp3-20231225")


MBO_FILES = [
    "dbn_test_data.mbo.v1.dbn.zst",
    "dbn_test_data.mbo.v2.dbn",
    "dbn_test_data.mbo.v3.dbn",
    "esh4-glbx-mdp3-20231224.mbo.dbn.zst",
    "esm4-glbx-mdp3-20240508-0000-0002.mbo.dbn.zst",
    "glbx.mdp3_test_data.mbo.dbn.zst",
    "ifeu.impact_test_data.mbo.dbn.zst",
    "xnas.itch_test_data.mbo.dbn.zst",
]


@pytest.mark.parametrize("name", MBO_FILES)
def test_every_sample_file_replays_equal_to_reference(sample_dir: Path, name: str) -> None:
    events = read_file(sample_dir / name)
    assert len(events) == len(db.DBNStore.from_file(sample_dir / name).to_ndarray())
    for instrument in np.unique(events["instrument_id"]):
        mine = events[events["instrument_id"] == instrument]
        tick = int(np.gcd.reduce(mine["price"][mine["price"] != np.iinfo(np.int64).max])) or 1
        book = OrderBook(tick)
        book.apply(mine)
        ref = _reference_of(mine)
        for side in (0, 1):
            expected = ref.levels(side)
            got = book.top(side, len(expected) + 1)
            assert [(lv.tick * tick, lv.size, lv.count) for lv in got] == [
                (p, s, c) for p, s, c, _ in expected
            ], f"{name} instrument {instrument} side {side}"


@pytest.mark.parametrize("tick_size", [1, 7, 250_000_000, 10_000_000])
def testtick_of_is_floor_division(tick_size: int) -> None:
    prices = [0, 1, -1, tick_size, -tick_size, tick_size - 1, 4_810_250_000_000, -3 * tick_size - 1]
    prices += [2**52 + 5, -(2**52) - 5, 2**62 + 3]
    for price in prices:
        assert tick_of(price, tick_size, 1.0 / tick_size) == price // tick_size, price
