"""Numba kernel of replay: raw DBN MBO records, checked and copied into the event envelope.

One pass per record does what used to take a dozen numpy passes per chunk (length and rtype
guard, action and side bytes, ``ts_recv`` order, the window end, the instrument filter, the
field-by-field copy into :data:`engine.events.EVENT_DTYPE`). The kernel stops at the first record
it cannot take and says why; :mod:`engine.replay` turns that into an error naming the file.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from engine.jit import hot_kernel

# Outcomes of convert_mbo_records: the first two mean "call again", the rest stop reading.
CONVERT_DONE = 0  # every raw record was taken
CONVERT_FULL = 1  # the output batch is full; resume at the returned raw index
CONVERT_END = 2  # the record at the returned index is at or after the window end
BAD_RECORD = 3  # its length or rtype is not an MBO record's
BAD_ACTION = 4
BAD_SIDE = 5
GOES_BACK = 6  # its ts_recv is below the previous record's (``last_ts[0]``)

MBO_RTYPE = 0xA0
NO_END = np.uint64(np.iinfo(np.uint64).max)


@nb.njit(nogil=True, cache=True, inline="always")
def _valid_action(action: int) -> bool:
    return (
        action == 65  # A
        or action == 67  # C
        or action == 77  # M
        or action == 82  # R
        or action == 84  # T
        or action == 70  # F
        or action == 78  # N
    )


@nb.njit(nogil=True, cache=True, inline="always")
def _valid_side(side: int) -> bool:
    return side == 65 or side == 66 or side == 78  # A, B, N


@nb.njit(nogil=True, cache=True, inline="always")
def _wanted(instrument_id: int, ids: np.ndarray) -> bool:
    # A plain loop: numba does not compile any() over a generator.
    for k in range(ids.shape[0]):  # noqa: SIM110
        if ids[k] == instrument_id:
            return True
    return False


@hot_kernel
def convert_mbo_records(
    raw: np.ndarray,
    start: int,
    record_bytes: int,
    out: np.ndarray,
    filled: int,
    ids: np.ndarray,
    filter_ids: bool,
    end_ns: np.uint64,
    check_order: bool,
    last_ts: np.ndarray,
) -> tuple[int, int, int]:
    """Check ``raw[start:]`` and copy the records to keep into ``out[filled:]``.

    ``raw`` is a structured array of DBN MBO records of ``record_bytes`` bytes each. A record is
    kept when ``ts_recv < end_ns`` and, with ``filter_ids``, its instrument is in ``ids``.
    ``last_ts[0]`` carries the last ``ts_recv`` seen across calls (and files). Returns
    ``(outcome, raw_index, filled)``: for a stop, ``raw_index`` is the offending record's.
    """
    n = raw.shape[0]
    capacity = out.shape[0]
    previous = last_ts[0]
    for i in range(start, n):
        rec = raw[i]
        if np.int64(rec.length) * 4 != record_bytes or rec.rtype != MBO_RTYPE:
            last_ts[0] = previous
            return BAD_RECORD, i, filled
        if not _valid_action(rec.action):
            last_ts[0] = previous
            return BAD_ACTION, i, filled
        if not _valid_side(rec.side):
            last_ts[0] = previous
            return BAD_SIDE, i, filled
        ts = rec.ts_recv
        if check_order and ts < previous:
            last_ts[0] = previous
            return GOES_BACK, i, filled
        if ts >= end_ns:
            last_ts[0] = previous
            return CONVERT_END, i, filled
        previous = ts
        if filter_ids and not _wanted(rec.instrument_id, ids):
            continue
        ev = out[filled]
        ev.ts_recv = ts
        ev.ts_event = rec.ts_event
        ev.order_id = rec.order_id
        ev.price = rec.price
        ev.sequence = rec.sequence
        ev.instrument_id = rec.instrument_id
        ev.size = rec.size
        ev.action = rec.action
        ev.side = rec.side
        ev.flags = rec.flags
        ev.channel_id = rec.channel_id
        filled += 1
        if filled == capacity:
            last_ts[0] = previous
            return CONVERT_FULL, i + 1, filled
    last_ts[0] = previous
    return CONVERT_DONE, n, filled
