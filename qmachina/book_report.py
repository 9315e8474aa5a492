"""``qmachina book replay``: the top of the L3 book as JSON-ready dictionaries."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from engine.book import OrderBook, price_text
from engine.events import ACTION_ADD, ACTION_MODIFY, EVENT_DTYPE, PRICE_SCALE, UNDEF_PRICE
from engine.replay import file_summary, replay_files


class BookReportError(ValueError):
    """The request cannot be answered from this file (unknown instrument, bad tick size)."""


def tick_size_raw(text: str) -> int:
    """A decimal tick size (``"0.25"``) in raw 1e-9 price units, exactly."""
    try:
        value = Decimal(text) * PRICE_SCALE
    except InvalidOperation:
        raise BookReportError(f"tick size {text!r} is not a decimal number") from None
    if value <= 0 or value != value.to_integral_value():
        raise BookReportError(f"tick size {text!r} must be positive and a multiple of 1e-9")
    return int(value)


def inferred_tick_size(events: np.ndarray) -> int:
    """The largest price unit every order price is a multiple of (the gcd of the prices)."""
    prices = events["price"][
        ((events["action"] == ACTION_ADD) | (events["action"] == ACTION_MODIFY))
        & (events["price"] != UNDEF_PRICE)
    ]
    tick = int(np.gcd.reduce(np.abs(prices))) if len(prices) else PRICE_SCALE
    return tick or PRICE_SCALE


def decimals_of(tick: int) -> int:
    """How many decimals print a price on a ``tick`` grid exactly (0.25 → 2)."""
    exponent = (Decimal(tick) / PRICE_SCALE).normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def _instrument_ids(path: Path, instrument: str | None, present: np.ndarray) -> list[int]:
    if instrument is None:
        return [int(i) for i in np.unique(present)]
    if instrument.isdigit():
        return [int(instrument)]
    symbols = file_summary(path).symbols
    if instrument not in symbols:
        known = ", ".join(sorted(symbols)) or "none"
        raise BookReportError(f"{path}: no symbol {instrument!r} in the file (symbols: {known})")
    return sorted(set(symbols[instrument]) & {int(i) for i in np.unique(present)})


def _line(
    book: OrderBook, last: np.void, instrument_id: int, depth: int, decimals: int
) -> dict[str, Any]:
    """The book after record ``last``."""

    def side(s: int) -> list[list[Any]]:
        tick = book.tick_size
        return [
            [price_text(lv.tick * tick, decimals), lv.size, lv.count] for lv in book.top(s, depth)
        ]

    return {
        "instrument_id": instrument_id,
        "ts_recv": int(last["ts_recv"]),
        "sequence": int(last["sequence"]),
        "bids": side(0),
        "asks": side(1),
    }


def replay_book_lines(
    path: Path,
    *,
    instrument: str | None,
    depth: int,
    every_last: bool,
    tick_size: str | None,
    price_decimals: int | None,
) -> Iterator[dict[str, Any]]:
    """One line per instrument at the end, or one after every F_LAST with ``every_last``."""
    batches = list(replay_files([path]))
    events = np.concatenate(batches) if batches else np.zeros(0, dtype=EVENT_DTYPE)
    ids = _instrument_ids(path, instrument, events["instrument_id"])
    if not ids:
        raise BookReportError(f"{path}: no records for instrument {instrument}")
    for instrument_id in ids:
        mine = events[events["instrument_id"] == instrument_id]
        if not len(mine):
            raise BookReportError(f"{path}: no records for instrument {instrument_id}")
        tick = tick_size_raw(tick_size) if tick_size else inferred_tick_size(mine)
        decimals = price_decimals if price_decimals is not None else decimals_of(tick)
        book = OrderBook(tick)
        if every_last:
            index = 0
            while index < len(mine):
                index = book.apply_until_last(mine, index)
                if book.consistent:
                    yield _line(book, mine[index - 1], instrument_id, depth, decimals)
        else:
            book.apply(mine)
            yield _line(book, mine[-1], instrument_id, depth, decimals)
