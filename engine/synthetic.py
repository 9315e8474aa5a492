"""Seeded synthetic MBO flow for one instrument, written as real DBN v3.

The generator keeps a full L3 book in flat arrays inside one numba kernel and emits records that are
valid under Databento's MBO rules, shaped like CME Globex (GLBX.MDP3) data:

- a snapshot block: a Clear (``R``) record, then resting Adds with ``F_SNAPSHOT`` listed bids best
  to worst, then asks best to worst, each level in queue order; its last record carries F_LAST;
- live flow around a latent random-walk fair price: Adds near the touch (geometric distance,
  filling a spread wider than one tick), partial and full Cancels, Modifies (price change and size
  increase lose priority, size decrease keeps it) and aggressive limit orders. An aggressive order
  is published as CME does: per price level a Trade (side = aggressor, order_id = aggressor) then
  one Fill per resting order hit (side and order_id of the resting order), then a Cancel (fully
  filled) or Modify (partially filled, reduced size) per resting order, then an Add of the unfilled
  residual if the order rests. A group shares ts_event; only its last record carries F_LAST.

Prices are int64 in 1e-9 units on the tick grid; ts_recv never decreases; ts_event <= ts_recv;
sequence strictly increases; order ids are unique. The same arguments give byte-identical output.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import zstandard
from databento.common.publishers import Publisher
from databento_dbn import Metadata, Schema, SType
from databento_dbn.metadata import MappingInterval

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
    SIDE_NONE,
    UNDEF_PRICE,
)

__all__ = [
    "DBN_MBO_DTYPE",
    "encode_mbo_records",
    "generate_events",
    "write_dbn",
    "write_synthetic_dbn",
]

#: The DBN (v1-v3) MBO record, byte for byte: RecordHeader (length in 4-byte words, rtype 0xA0,
#: publisher_id, instrument_id, ts_event) then the MBO body. 56 bytes, no padding.
DBN_MBO_DTYPE = np.dtype(
    [
        ("length", "u1"),
        ("rtype", "u1"),
        ("publisher_id", "<u2"),
        ("instrument_id", "<u4"),
        ("ts_event", "<u8"),
        ("order_id", "<u8"),
        ("price", "<i8"),
        ("size", "<u4"),
        ("flags", "u1"),
        ("channel_id", "u1"),
        ("action", "u1"),
        ("side", "u1"),
        ("ts_recv", "<u8"),
        ("ts_in_delta", "<i4"),
        ("sequence", "<u4"),
    ]
)
assert DBN_MBO_DTYPE.itemsize == 56

RTYPE_MBO = 0xA0
DBN_VERSION = 3

# ---- generator tuning (all probabilities per live event) --------------------------------------
_N_LEVELS = 1 << 17  # absolute tick window of the internal book, centred on the start price
_ORDER_ID_BASE = 6_412_000_000_000  # CME-like order id magnitude
_SEQUENCE_BASE = 1_000
_GROUP_MAX = 64  # records an aggressive-order group may need (3 * _MAX_HITS + 1 < 64)
_MAX_HITS = 16  # resting orders one aggressive order may hit
_MIN_SIDE = 8  # never cancel/fill a side below this many orders
_P_AGGRESS = 0.07
_P_MODIFY = 0.22
_P_SAME_TS = 0.03  # an event (group) shares ts_event/ts_recv with the previous one
_FAIR_STEP = 0.05  # the latent fair price moves +-this many ticks per live event
_AGG_PULL = 0.6  # aggressor-side bias per tick of fair price away from the mid
_P_IMPROVE = 0.85  # an Add improves a spread wider than one tick
_P_STALE = 0.35  # a cancel/modify hits a best level left on the wrong side of the fair price
_P_PARTIAL_CANCEL = 0.2
_P_PICK_NEAR = 0.25  # a cancel/modify targets an order near the touch (else uniform)
_PICK_NEAR_P = 0.5  # geometric distance (ticks) from the best for such targets
_P_IOC = 0.4  # an aggressive order's unfilled residual is not rested
_ADD_DIST_P = 0.15  # geometric distance (ticks) from the own-side best for live Adds
_SNAP_DIST_P = 0.04  # geometric distance for snapshot orders
_SNAP_FAR_P = 0.12  # share of snapshot orders spread uniformly far from the touch
_SNAP_MAX_DIST = 400
_LATENCY_MIN_NS = 20_000.0
_LATENCY_MEAN_NS = 30_000.0
_GROUP_RECV_STEP_MIN = 2_000.0  # T/F then book updates of one group: ts_recv steps (CME-like)
_GROUP_RECV_STEP_MEAN = 6_000.0

# order table columns
_OID = 0
_TICK = 1
_SIZE = 2
_SIDE = 3
_PREV = 4
_NEXT = 5
_LPOS = 6
_N_OCOLS = 7
# level table columns
_HEAD = 0
_TAIL = 1
_CNT = 2
# counters
_C_NFREE = 0
_C_NLIVE = 1  # +side
_C_BEST = 3  # +side
_C_VOL = 5  # +side
_C_NEXT_OID = 7
_N_CTR = 8

_INV_2_53 = 1.0 / 9007199254740992.0
_SIDE_CODE = (SIDE_BID, SIDE_ASK)


# ---- random numbers: xoshiro256** (bit-exact, independent of numpy/numba RNG versions) -------
@numba.njit(cache=True, inline="always")
def _rotl(x: Any, k: int) -> Any:
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@numba.njit(cache=True)
def _next_u64(s: np.ndarray) -> Any:
    result = _rotl(s[1] * np.uint64(5), 7) * np.uint64(9)
    t = s[1] << np.uint64(17)
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = _rotl(s[3], 45)
    return result


@numba.njit(cache=True)
def _uniform(s: np.ndarray) -> float:
    return float((_next_u64(s) >> np.uint64(11)) * _INV_2_53)


@numba.njit(cache=True)
def _randint(s: np.ndarray, n: int) -> int:
    k = int(_uniform(s) * n)
    return k if k < n else n - 1


@numba.njit(cache=True)
def _geometric(s: np.ndarray, p: float) -> int:
    """Failures before the first success (>= 0)."""
    return int(math.log(1.0 - _uniform(s)) / math.log(1.0 - p))


@numba.njit(cache=True)
def _exponential(s: np.ndarray, mean: float) -> float:
    return -mean * math.log(1.0 - _uniform(s))


@numba.njit(cache=True)
def _order_size(s: np.ndarray) -> int:
    """ES-like lot sizes: mostly 1-3, a tail of tens, rare hundreds."""
    u = _uniform(s)
    if u < 0.5:
        return 1
    if u < 0.93:
        return 2 + _geometric(s, 0.45)
    if u < 0.995:
        return 5 + _randint(s, 46)
    return 100 + _randint(s, 401)


def _seed_state(seed: int) -> np.ndarray:
    """xoshiro256** state from a seed via splitmix64."""
    mask = (1 << 64) - 1
    x = seed & mask
    out = np.empty(4, dtype=np.uint64)
    for k in range(4):
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out[k] = z ^ (z >> 31)
    return out


# ---- flat-array L3 book --------------------------------------------------------------------
@numba.njit(cache=True)
def _link_tail(orders: np.ndarray, lv: np.ndarray, slot: int, side: int, i: int) -> None:
    t = lv[side, i, _TAIL]
    orders[slot, _TICK] = i
    orders[slot, _PREV] = t
    orders[slot, _NEXT] = -1
    if t >= 0:
        orders[t, _NEXT] = slot
    else:
        lv[side, i, _HEAD] = slot
    lv[side, i, _TAIL] = slot
    lv[side, i, _CNT] += 1


@numba.njit(cache=True)
def _unlink(orders: np.ndarray, lv: np.ndarray, slot: int) -> None:
    side = orders[slot, _SIDE]
    i = orders[slot, _TICK]
    p = orders[slot, _PREV]
    n = orders[slot, _NEXT]
    if p >= 0:
        orders[p, _NEXT] = n
    else:
        lv[side, i, _HEAD] = n
    if n >= 0:
        orders[n, _PREV] = p
    else:
        lv[side, i, _TAIL] = p
    lv[side, i, _CNT] -= 1


@numba.njit(cache=True)
def _improve_best(ctr: np.ndarray, side: int, i: int) -> None:
    b = ctr[_C_BEST + side]
    if b < 0 or (side == 0 and i > b) or (side == 1 and i < b):
        ctr[_C_BEST + side] = i


@numba.njit(cache=True)
def _repair_best(lv: np.ndarray, ctr: np.ndarray, side: int) -> None:
    """Move the best price away from the touch past empty levels (side must be non-empty)."""
    i = ctr[_C_BEST + side]
    step = -1 if side == 0 else 1
    n = lv.shape[1]
    while 0 <= i < n and lv[side, i, _CNT] == 0:
        i += step
    ctr[_C_BEST + side] = i if 0 <= i < n else -1


@numba.njit(cache=True)
def _new_order(
    orders: np.ndarray,
    lv: np.ndarray,
    live: np.ndarray,
    free: np.ndarray,
    ctr: np.ndarray,
    side: int,
    i: int,
    size: int,
    oid: int,
) -> int:
    ctr[_C_NFREE] -= 1
    slot = free[ctr[_C_NFREE]]
    orders[slot, _OID] = oid
    orders[slot, _SIZE] = size
    orders[slot, _SIDE] = side
    _link_tail(orders, lv, slot, side, i)
    k = ctr[_C_NLIVE + side]
    live[side, k] = slot
    orders[slot, _LPOS] = k
    ctr[_C_NLIVE + side] = k + 1
    ctr[_C_VOL + side] += size
    _improve_best(ctr, side, i)
    return int(slot)


@numba.njit(cache=True)
def _remove_order(
    orders: np.ndarray,
    lv: np.ndarray,
    live: np.ndarray,
    free: np.ndarray,
    ctr: np.ndarray,
    slot: int,
) -> None:
    side = orders[slot, _SIDE]
    i = orders[slot, _TICK]
    _unlink(orders, lv, slot)
    ctr[_C_VOL + side] -= orders[slot, _SIZE]
    k = orders[slot, _LPOS]
    last = ctr[_C_NLIVE + side] - 1
    moved = live[side, last]
    live[side, k] = moved
    orders[moved, _LPOS] = k
    ctr[_C_NLIVE + side] = last
    free[ctr[_C_NFREE]] = slot
    ctr[_C_NFREE] += 1
    if lv[side, i, _CNT] == 0 and ctr[_C_BEST + side] == i:
        _repair_best(lv, ctr, side)


@numba.njit(cache=True)
def _pick_order(
    rng: np.ndarray,
    orders: np.ndarray,
    lv: np.ndarray,
    live: np.ndarray,
    ctr: np.ndarray,
    side: int,
    stale: bool,
) -> int:
    """A live order of ``side`` (non-empty): often near the touch (mostly when the best is
    stale), else uniformly at random."""
    if stale and _uniform(rng) < _P_STALE:
        i = ctr[_C_BEST + side]
        slot = lv[side, i, _HEAD]
        for _ in range(_randint(rng, lv[side, i, _CNT])):
            slot = orders[slot, _NEXT]
        return int(slot)
    if _uniform(rng) < _P_PICK_NEAR:
        step = -1 if side == 0 else 1
        i = ctr[_C_BEST + side] + step * _geometric(rng, _PICK_NEAR_P)
        if not 0 <= i < lv.shape[1] or lv[side, i, _CNT] == 0:
            i = ctr[_C_BEST + side]
        slot = lv[side, i, _HEAD]
        for _ in range(_randint(rng, lv[side, i, _CNT])):
            slot = orders[slot, _NEXT]
        return int(slot)
    return int(live[side, _randint(rng, ctr[_C_NLIVE + side])])


@numba.njit(cache=True)
def _emit(
    out_recv: np.ndarray,
    out_event: np.ndarray,
    out_oid: np.ndarray,
    out_price: np.ndarray,
    out_size: np.ndarray,
    out_action: np.ndarray,
    out_side: np.ndarray,
    out_flags: np.ndarray,
    pos: int,
    ts_recv: int,
    ts_event: int,
    oid: int,
    price: int,
    size: int,
    action: int,
    side: int,
    flags: int,
) -> None:
    out_recv[pos] = ts_recv
    out_event[pos] = ts_event
    out_oid[pos] = oid
    out_price[pos] = price
    out_size[pos] = size
    out_action[pos] = action
    out_side[pos] = side
    out_flags[pos] = flags


@numba.njit(cache=True)
def _generate_kernel(
    out_recv: np.ndarray,
    out_event: np.ndarray,
    out_oid: np.ndarray,
    out_price: np.ndarray,
    out_size: np.ndarray,
    out_action: np.ndarray,
    out_side: np.ndarray,
    out_flags: np.ndarray,
    rng: np.ndarray,
    n_snap: int,
    tick_size: int,
    start_tick: int,
    start_ts: int,
    mean_gap_ns: float,
    capacity: int,
) -> None:
    n = out_recv.shape[0]
    L = _N_LEVELS
    base_tick = start_tick - L // 2  # absolute tick of level index 0
    lo_i = max(1, 1 - base_tick)  # lowest index with a positive price
    hi_i = L - 2
    centre = L // 2

    orders = np.zeros((capacity, _N_OCOLS), dtype=np.int64)
    lv = np.zeros((2, L, 3), dtype=np.int64)
    lv[:, :, _HEAD] = -1
    lv[:, :, _TAIL] = -1
    live = np.zeros((2, capacity), dtype=np.int64)
    free = np.empty(capacity, dtype=np.int64)
    for k in range(capacity):
        free[k] = capacity - 1 - k
    ctr = np.zeros(_N_CTR, dtype=np.int64)
    ctr[_C_NFREE] = capacity
    ctr[_C_BEST] = -1
    ctr[_C_BEST + 1] = -1
    ctr[_C_NEXT_OID] = _ORDER_ID_BASE
    hits = np.zeros(_MAX_HITS, dtype=np.int64)
    hit_fill = np.zeros(_MAX_HITS, dtype=np.int64)

    if n == 0:
        return
    # ---- snapshot: Clear, then bids best->worst, asks best->worst, queue order per level -----
    pos = 0
    _emit(out_recv, out_event, out_oid, out_price, out_size, out_action, out_side, out_flags,
          pos, start_ts, start_ts, 0, UNDEF_PRICE, 0, ACTION_CLEAR, SIDE_NONE,
          F_SNAPSHOT | (F_LAST if n == 1 else 0))  # fmt: skip
    pos += 1
    counts = np.zeros(_SNAP_MAX_DIST + 1, dtype=np.int64)
    for side in range(2):
        n_side = n_snap // 2 if side == 0 else n_snap - n_snap // 2
        counts[:] = 0
        for k in range(n_side):
            if k == 0:
                d = 0
            elif _uniform(rng) < _SNAP_FAR_P:
                d = _randint(rng, _SNAP_MAX_DIST + 1)
            else:
                d = min(_geometric(rng, _SNAP_DIST_P), _SNAP_MAX_DIST)
            counts[d] += 1
        for d in range(_SNAP_MAX_DIST + 1):
            i = centre - d if side == 0 else centre + 1 + d
            i = min(max(i, lo_i), hi_i)
            for _ in range(counts[d]):
                oid = ctr[_C_NEXT_OID]
                ctr[_C_NEXT_OID] += 1
                size = _order_size(rng)
                _new_order(orders, lv, live, free, ctr, side, i, size, oid)
                flags = F_SNAPSHOT | (F_LAST if pos == n_snap else 0)
                _emit(out_recv, out_event, out_oid, out_price, out_size, out_action, out_side,
                      out_flags, pos, start_ts, start_ts, oid, (base_tick + i) * tick_size, size,
                      ACTION_ADD, _SIDE_CODE[side], flags)  # fmt: skip
                pos += 1

    # ---- live flow --------------------------------------------------------------------------
    target = max(n_snap // 2, _MIN_SIDE * 2)
    ts_event = start_ts
    ts_recv = start_ts
    group_start = pos
    fair = centre + 0.5  # latent fair price (level index): fair bid = floor(fair)
    while pos < n:
        remaining = n - pos
        side = 0 if _uniform(rng) < 0.5 else 1
        u = _uniform(rng)
        # time: an event advances the clock (in proportion to the records of the previous group,
        # so records arrive at mean_gap_ns on average) unless it shares the previous timestamps
        k_prev = pos - group_start
        group_start = pos
        if _uniform(rng) >= _P_SAME_TS:
            ts_event += 1 + int(_exponential(rng, mean_gap_ns * k_prev))
            lat = _LATENCY_MIN_NS + _exponential(rng, _LATENCY_MEAN_NS)
            ts_recv = max(ts_recv, ts_event + int(lat))
        bb = ctr[_C_BEST]
        ba = ctr[_C_BEST + 1]
        fair += _FAIR_STEP if _uniform(rng) < 0.5 else -_FAIR_STEP
        if fair < lo_i + 1.0:  # reflect off the edges of the tick window
            fair = 2.0 * (lo_i + 1.0) - fair
        elif fair > hi_i - 1.0:
            fair = 2.0 * (hi_i - 1.0) - fair
        fair_bid = math.floor(fair)
        stale = fair_bid < bb if side == 0 else fair_bid + 1 > ba

        if u < _P_AGGRESS and remaining >= _GROUP_MAX:
            # the aggressor leans towards the fair price: buys when it is above the mid
            p_buy = 0.5 + min(max(_AGG_PULL * (fair - 0.5 * (bb + ba)), -0.45), 0.45)
            aside = 0 if _uniform(rng) < p_buy else 1
            opp = 1 - aside
            qty = _order_size(rng)
            qty = min(qty, ctr[_C_VOL + opp] - 1)
            if qty > 0 and ctr[_C_NLIVE + opp] > _MIN_SIDE:
                k_lim = _geometric(rng, 0.6)
                if aside == 0:
                    lim = min(ba + k_lim, hi_i)
                    step = 1
                else:
                    lim = max(bb - k_lim, lo_i)
                    step = -1
                aoid = ctr[_C_NEXT_OID]
                ctr[_C_NEXT_OID] += 1
                r1 = ts_recv
                filled = 0
                nh = 0
                i = ctr[_C_BEST + opp]
                while filled < qty and nh < _MAX_HITS and (i - lim) * step <= 0:
                    slot = lv[opp, i, _HEAD]
                    if slot >= 0:
                        price = (base_tick + i) * tick_size
                        tpos = pos
                        pos += 1
                        lvl_fill = 0
                        while slot >= 0 and filled < qty and nh < _MAX_HITS:
                            f = min(orders[slot, _SIZE], qty - filled)
                            _emit(out_recv, out_event, out_oid, out_price, out_size, out_action,
                                  out_side, out_flags, pos, r1, ts_event, orders[slot, _OID],
                                  price, f, ACTION_FILL, _SIDE_CODE[opp], 0)  # fmt: skip
                            pos += 1
                            hits[nh] = slot
                            hit_fill[nh] = f
                            nh += 1
                            filled += f
                            lvl_fill += f
                            slot = orders[slot, _NEXT]
                        _emit(out_recv, out_event, out_oid, out_price, out_size, out_action,
                              out_side, out_flags, tpos, r1, ts_event, aoid, price, lvl_fill,
                              ACTION_TRADE, _SIDE_CODE[aside], 0)  # fmt: skip
                    i += step
                if nh == _MAX_HITS:
                    qty = filled
                # book updates follow the trade report a few microseconds later
                ts_recv = r1 + int(_GROUP_RECV_STEP_MIN + _exponential(rng, _GROUP_RECV_STEP_MEAN))
                for h in range(nh):
                    slot = hits[h]
                    f = hit_fill[h]
                    oid = orders[slot, _OID]
                    price = (base_tick + orders[slot, _TICK]) * tick_size
                    size = orders[slot, _SIZE]
                    if f == size:
                        _remove_order(orders, lv, live, free, ctr, slot)
                        _emit(out_recv, out_event, out_oid, out_price, out_size, out_action,
                              out_side, out_flags, pos, ts_recv, ts_event, oid, price, f,
                              ACTION_CANCEL, _SIDE_CODE[opp], 0)  # fmt: skip
                    else:
                        orders[slot, _SIZE] = size - f
                        ctr[_C_VOL + opp] -= f
                        _emit(out_recv, out_event, out_oid, out_price, out_size, out_action,
                              out_side, out_flags, pos, ts_recv, ts_event, oid, price, size - f,
                              ACTION_MODIFY, _SIDE_CODE[opp], 0)  # fmt: skip
                    pos += 1
                residual = qty - filled
                if residual > 0 and _uniform(rng) >= _P_IOC:
                    # all opposite liquidity up to the limit is gone: resting there cannot cross
                    _new_order(orders, lv, live, free, ctr, aside, lim, residual, aoid)
                    _emit(out_recv, out_event, out_oid, out_price, out_size, out_action,
                          out_side, out_flags, pos, ts_recv, ts_event, aoid,
                          (base_tick + lim) * tick_size, residual, ACTION_ADD,
                          _SIDE_CODE[aside], 0)  # fmt: skip
                    pos += 1
                out_flags[pos - 1] = F_LAST
                continue
            u = 1.0  # not enough liquidity to take: fall through to add/cancel

        n_side = ctr[_C_NLIVE + side]
        if u < _P_AGGRESS + _P_MODIFY and n_side > 0:
            slot = _pick_order(rng, orders, lv, live, ctr, side, stale)
            oid = orders[slot, _OID]
            i = orders[slot, _TICK]
            size = orders[slot, _SIZE]
            kind = _uniform(rng)
            new_i = i
            if kind < 0.4:
                # price change: loses priority; never crosses, stays in the window
                if side == 0:
                    lo = lo_i
                    hi = ba - 1
                else:
                    lo = bb + 1
                    hi = hi_i
                delta = 1 + _geometric(rng, 0.5)
                new_i = i + delta if _uniform(rng) < 0.5 else i - delta
                new_i = min(max(new_i, lo), hi)
                if new_i == i:
                    new_i = i - 1 if side == 0 else i + 1
                    if new_i < lo or new_i > hi:
                        new_i = i
            if new_i != i:
                _unlink(orders, lv, slot)
                _link_tail(orders, lv, slot, side, new_i)
                _improve_best(ctr, side, new_i)
                if lv[side, i, _CNT] == 0 and ctr[_C_BEST + side] == i:
                    _repair_best(lv, ctr, side)
                new_size = size
            elif size > 1 and kind < 0.75:
                new_size = 1 + _randint(rng, size - 1)  # size down: keeps priority
            else:
                new_size = size + 1 + _geometric(rng, 0.5)  # size up: loses priority
                _unlink(orders, lv, slot)
                _link_tail(orders, lv, slot, side, i)
            orders[slot, _SIZE] = new_size
            ctr[_C_VOL + side] += new_size - size
            _emit(out_recv, out_event, out_oid, out_price, out_size, out_action, out_side,
                  out_flags, pos, ts_recv, ts_event, oid, (base_tick + new_i) * tick_size,
                  new_size, ACTION_MODIFY, _SIDE_CODE[side], F_LAST)  # fmt: skip
            pos += 1
            continue

        ratio = n_side / target
        do_add = _uniform(rng) < 1.0 / (1.0 + ratio * ratio)
        if n_side <= _MIN_SIDE:
            do_add = True
        if ctr[_C_NFREE] < 4:
            do_add = False
        if do_add:
            # quotes around the fair price, never crossing the opposite best
            if ba - bb > 1 and _uniform(rng) < _P_IMPROVE:
                # a wide spread fills in quickly, towards the fair price
                if side == 0:
                    i = min(max(fair_bid, bb + 1), ba - 1)
                else:
                    i = max(min(fair_bid + 1, ba - 1), bb + 1)
            elif side == 0:
                i = min(max(fair_bid - _geometric(rng, _ADD_DIST_P), lo_i), ba - 1)
            else:
                i = max(min(fair_bid + 1 + _geometric(rng, _ADD_DIST_P), hi_i), bb + 1)
            oid = ctr[_C_NEXT_OID]
            ctr[_C_NEXT_OID] += 1
            size = _order_size(rng)
            _new_order(orders, lv, live, free, ctr, side, i, size, oid)
            _emit(out_recv, out_event, out_oid, out_price, out_size, out_action, out_side,
                  out_flags, pos, ts_recv, ts_event, oid, (base_tick + i) * tick_size, size,
                  ACTION_ADD, _SIDE_CODE[side], F_LAST)  # fmt: skip
        else:
            slot = _pick_order(rng, orders, lv, live, ctr, side, stale)
            oid = orders[slot, _OID]
            price = (base_tick + orders[slot, _TICK]) * tick_size
            size = orders[slot, _SIZE]
            if size > 1 and _uniform(rng) < _P_PARTIAL_CANCEL:
                c = 1 + _randint(rng, size - 1)  # partial cancel: keeps priority
                orders[slot, _SIZE] = size - c
                ctr[_C_VOL + side] -= c
            else:
                c = size
                _remove_order(orders, lv, live, free, ctr, slot)
            _emit(out_recv, out_event, out_oid, out_price, out_size, out_action, out_side,
                  out_flags, pos, ts_recv, ts_event, oid, price, c, ACTION_CANCEL,
                  _SIDE_CODE[side], F_LAST)  # fmt: skip
        pos += 1


def generate_events(
    n_events: int,
    seed: int,
    *,
    instrument_id: int = 17077,
    tick_size: int = 250_000_000,
    start_price: int = 4800 * 10**9,
    start_ts_ns: int = 1_703_548_800_000_000_000,
    events_per_second: float = 20_000.0,
    snapshot_orders: int = 2000,
) -> np.ndarray:
    """Exactly ``n_events`` synthetic MBO records (``EVENT_DTYPE``): a snapshot, then live flow.

    ``events_per_second`` is the mean record rate of the live flow (its groups are spaced in
    proportion to their record counts); the snapshot is stamped ``start_ts_ns``. Prices are
    ``start_price`` +- whole ticks; ``snapshot_orders`` is also the book size the flow keeps.
    """
    if n_events < 0:
        raise ValueError("n_events must be >= 0")
    if n_events >= 2**32 - _SEQUENCE_BASE:
        raise ValueError("n_events must fit the u32 sequence")
    if tick_size <= 0 or start_price <= 0 or start_price % tick_size != 0:
        raise ValueError("start_price must be a positive multiple of tick_size")
    if snapshot_orders < 2 * _MIN_SIDE:
        raise ValueError(f"snapshot_orders must be >= {2 * _MIN_SIDE}")
    if events_per_second <= 0:
        raise ValueError("events_per_second must be > 0")
    if not 0 <= instrument_id < 2**32:
        raise ValueError("instrument_id must fit u32")
    start_tick = start_price // tick_size
    max_tick = (np.iinfo(np.int64).max // 2) // tick_size
    if start_tick + _N_LEVELS > max_tick:
        raise ValueError("start_price too large for int64 prices")
    ev = np.zeros(n_events, dtype=EVENT_DTYPE)
    n_snap = min(snapshot_orders, max(n_events - 1, 0))
    capacity = 4 * snapshot_orders + 4 * _GROUP_MAX
    _generate_kernel(
        ev["ts_recv"],
        ev["ts_event"],
        ev["order_id"],
        ev["price"],
        ev["size"],
        ev["action"],
        ev["side"],
        ev["flags"],
        _seed_state(seed),
        n_snap,
        tick_size,
        start_tick,
        start_ts_ns,
        1e9 / events_per_second,
        capacity,
    )
    ev["sequence"] = np.arange(_SEQUENCE_BASE, _SEQUENCE_BASE + n_events, dtype=np.uint32)
    ev["instrument_id"] = instrument_id
    return ev


@dataclass
class _MappingInterval:
    """A ``databento_dbn.MappingInterval``."""

    start_date: dt.date
    end_date: dt.date
    symbol: str


@dataclass
class _SymbolMapping:
    """A ``databento_dbn.SymbolMapping``."""

    raw_symbol: str
    intervals: Sequence[MappingInterval]


def _publisher_id(dataset: str) -> int:
    for publisher in Publisher:
        if str(publisher.dataset) == dataset:
            return int(publisher.to_int())
    raise ValueError(f"no Databento publisher for dataset {dataset!r}")


def encode_mbo_records(events: np.ndarray, publisher_id: int) -> np.ndarray:
    """The events as DBN MBO records (``DBN_MBO_DTYPE``, 56 bytes each)."""
    rec = np.empty(len(events), dtype=DBN_MBO_DTYPE)
    rec["length"] = DBN_MBO_DTYPE.itemsize // 4
    rec["rtype"] = RTYPE_MBO
    rec["publisher_id"] = publisher_id
    for name in (
        "instrument_id",
        "ts_event",
        "order_id",
        "price",
        "size",
        "flags",
        "channel_id",
        "action",
        "side",
        "ts_recv",
        "sequence",
    ):
        rec[name] = events[name]
    # ts_in_delta (ts_recv - exchange send time) is not in the envelope: bound it by the latency
    delta = events["ts_recv"].astype(np.int64) - events["ts_event"].astype(np.int64)
    rec["ts_in_delta"] = np.clip(delta, 0, np.iinfo(np.int32).max)
    return rec


def write_dbn(
    events: np.ndarray,
    path: Path,
    *,
    dataset: str = "GLBX.MDP3",
    symbol: str = "ESH4",
) -> None:
    """Write one instrument's ``EVENT_DTYPE`` events as DBN v3 MBO (zstd if the path ends .zst)."""
    path = Path(path)
    if events.dtype != EVENT_DTYPE:
        raise TypeError("events must have EVENT_DTYPE")
    if len(events) == 0:
        raise ValueError("cannot write an empty DBN file")
    iid = int(events["instrument_id"][0])
    if not (events["instrument_id"] == iid).all():
        raise ValueError("events must hold exactly one instrument_id")
    start = int(events["ts_recv"][0])
    last = int(events["ts_recv"][-1])
    start_date = dt.datetime.fromtimestamp(start / 1e9, tz=dt.UTC).date()
    end_date = dt.datetime.fromtimestamp(last / 1e9, tz=dt.UTC).date() + dt.timedelta(days=1)
    mapping = _SymbolMapping(
        raw_symbol=symbol,
        intervals=[_MappingInterval(start_date, end_date, str(iid))],
    )
    metadata = Metadata(
        dataset=dataset,
        start=start,
        stype_in=SType.from_str("raw_symbol"),
        stype_out=SType.from_str("instrument_id"),
        schema=Schema.from_str("mbo"),
        symbols=[symbol],
        partial=[],
        not_found=[],
        mappings=[mapping],
        end=last + 1,
        ts_out=False,
        version=DBN_VERSION,
    )
    header = bytes(metadata.encode())
    records = encode_mbo_records(events, _publisher_id(dataset))
    chunk = 1 << 18  # records per write (~14 MiB)
    with path.open("wb") as fh:
        if path.name.endswith(".zst"):
            cctx = zstandard.ZstdCompressor(level=3)
            with cctx.stream_writer(fh, closefd=False) as zw:
                zw.write(header)
                for k in range(0, len(records), chunk):
                    zw.write(records[k : k + chunk].tobytes())
        else:
            fh.write(header)
            for k in range(0, len(records), chunk):
                fh.write(records[k : k + chunk].tobytes())


def write_synthetic_dbn(path: Path, n_events: int, seed: int, **kw: Any) -> None:
    """Generate ``n_events`` with ``seed`` (``kw`` go to generate_events) and write them as DBN."""
    write_kw = {k: kw.pop(k) for k in ("dataset", "symbol") if k in kw}
    write_dbn(generate_events(n_events, seed, **kw), path, **write_kw)
