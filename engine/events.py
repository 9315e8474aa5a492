"""The event envelope: one numpy structured dtype shared by replay, live ingestion and the book.

Fields follow Databento's MBO record. ``action`` and ``side`` hold ASCII codes (``ord('A')``) so
numba kernels compare integers; ``price`` is the DBN fixed-point integer (1e-9 units).
"""

from __future__ import annotations

import numpy as np

EVENT_DTYPE = np.dtype(
    [
        ("ts_recv", "<u8"),
        ("ts_event", "<u8"),
        ("order_id", "<u8"),
        ("price", "<i8"),
        ("sequence", "<u4"),
        ("instrument_id", "<u4"),
        ("size", "<u4"),
        ("action", "u1"),
        ("side", "u1"),
        ("flags", "u1"),
        ("channel_id", "u1"),
    ],
    align=True,  # no padding is needed (48 bytes); this lets numba emit aligned loads
)

PRICE_SCALE = 1_000_000_000
UNDEF_PRICE = np.iinfo(np.int64).max

ACTION_ADD = ord("A")
ACTION_CANCEL = ord("C")
ACTION_MODIFY = ord("M")
ACTION_CLEAR = ord("R")
ACTION_TRADE = ord("T")
ACTION_FILL = ord("F")
ACTION_NONE = ord("N")

SIDE_BID = ord("B")
SIDE_ASK = ord("A")
SIDE_NONE = ord("N")

F_LAST = 128
F_TOB = 64
F_SNAPSHOT = 32
F_MBP = 16
F_BAD_TS_RECV = 8
F_MAYBE_BAD_BOOK = 4
