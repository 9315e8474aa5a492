"""MBO snapshots for ``snapshot=1`` subscriptions: the resting orders at a point of the tape.

A per-order dict is enough here (a snapshot is built once per subscription, off the event
loop); the rules are Databento's: only Add, Cancel, Modify and Clear change the book, a price
change or size increase loses queue priority, a size decrease keeps it, a Cancel removes the
size it carries, and a snapshot block (F_SNAPSHOT) replaces the book it starts on.

Snapshot records look like Databento's historical ones: a Clear, then one Add per resting order
in queue-priority order (which keeps every level's FIFO order), all flagged F_SNAPSHOT and
F_BAD_TS_RECV with ``ts_recv`` at the snapshot time, the last one also F_LAST; each Add keeps
the ``ts_event``, ``sequence``, publisher and channel of the record that last set the order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, cast

import databento_dbn
import numpy as np
import numpy.typing as npt
from databento.common.constants import SCHEMA_STRUCT_MAP

from qmachina.live.gateway_tape import Tape, schema_code

__all__ = ["MBO_RECORD_DTYPE", "SnapshotBook", "snapshot_records"]

_MBO: Final = cast("databento_dbn.Schema", databento_dbn.Schema.MBO)
#: One DBN MBO record (56 bytes, the same in DBN v1-v3) with action and side as ASCII codes.
MBO_RECORD_DTYPE: Final = np.dtype(
    [(name, "u1" if code == "S1" else code) for name, code in SCHEMA_STRUCT_MAP[_MBO]._dtypes]
)

_ADD, _CANCEL, _MODIFY, _CLEAR = (ord(c) for c in "ACMR")
_BID, _ASK, _NONE = (ord(c) for c in "BAN")
_F_LAST: Final = 128
_F_SNAPSHOT: Final = 32
_F_BAD_TS_RECV: Final = 8
_UNDEF_PRICE: Final = int(databento_dbn.UNDEF_PRICE)
_MBO_RTYPE: Final = 0xA0


@dataclass
class _Order:
    side: int
    price: int
    size: int
    priority: int
    ts_event: int
    sequence: int
    publisher_id: int
    channel_id: int


class SnapshotBook:
    """The resting orders of one instrument."""

    def __init__(self) -> None:
        self.orders: dict[int, _Order] = {}
        self._next_priority = 0
        self._in_snapshot = False
        self.publisher_id = 0

    def apply(self, records: npt.NDArray[np.void]) -> None:
        """Apply MBO records (``MBO_RECORD_DTYPE``) in order."""
        columns = [
            records[name].tolist()
            for name in (
                "action",
                "side",
                "price",
                "size",
                "order_id",
                "flags",
                "ts_event",
                "sequence",
                "publisher_id",
                "channel_id",
            )
        ]
        orders = self.orders
        for action, side, price, size, oid, flags, ts_event, seq, pub, chan in zip(
            *columns, strict=True
        ):
            self.publisher_id = pub
            snapshot = bool(flags & _F_SNAPSHOT)
            if snapshot and not self._in_snapshot:
                orders.clear()
            self._in_snapshot = snapshot
            if action in (_ADD, _MODIFY):
                if side not in (_BID, _ASK) or price == _UNDEF_PRICE:
                    continue
                order = orders.get(oid)
                if order is None or order.side != side or order.price != price or size > order.size:
                    priority = self._next_priority
                    self._next_priority += 1
                else:
                    priority = order.priority
                if size == 0:
                    orders.pop(oid, None)
                    continue
                orders[oid] = _Order(side, price, size, priority, ts_event, seq, pub, chan)
            elif action == _CANCEL:
                order = orders.get(oid)
                if order is None:
                    continue
                if size >= order.size:
                    del orders[oid]
                else:
                    order.size -= size
            elif action == _CLEAR:
                orders.clear()

    def snapshot(self, instrument_id: int, ts_recv: int) -> bytes:
        """The snapshot block: a Clear, then the resting orders, the last one F_LAST."""
        resting = sorted(self.orders.items(), key=lambda item: item[1].priority)
        out = np.zeros(1 + len(resting), dtype=MBO_RECORD_DTYPE)
        out["length"] = MBO_RECORD_DTYPE.itemsize // 4
        out["rtype"] = _MBO_RTYPE
        out["instrument_id"] = instrument_id
        out["ts_recv"] = ts_recv
        out["flags"] = _F_SNAPSHOT | _F_BAD_TS_RECV
        out["action"] = _ADD
        out["publisher_id"][0] = self.publisher_id
        out["ts_event"][0] = ts_recv
        out["price"][0] = _UNDEF_PRICE
        out["action"][0] = _CLEAR
        out["side"][0] = _NONE
        if resting:
            rest = out[1:]
            rest["order_id"] = [oid for oid, _ in resting]
            for name in (
                "side",
                "price",
                "size",
                "ts_event",
                "sequence",
                "publisher_id",
                "channel_id",
            ):
                rest[name] = [getattr(order, name) for _, order in resting]
        out["flags"][-1] |= _F_LAST
        return out.tobytes()


def snapshot_records(tape: Tape, instrument_ids: list[int], position: int, ts_recv: int) -> bytes:
    """Snapshot blocks, one per instrument, of the book after the first ``position`` records."""
    head = slice(0, position)
    mbo = tape.schema[head] == schema_code("mbo")
    blocks = []
    for instrument_id in instrument_ids:
        rows = np.flatnonzero(mbo & (tape.instrument_id[head] == instrument_id))
        book = SnapshotBook()
        book.apply(np.frombuffer(tape.gather(rows), dtype=MBO_RECORD_DTYPE))
        blocks.append(book.snapshot(instrument_id, ts_recv))
    return b"".join(blocks)
