"""A slow, obvious L3 book (dicts and lists) that the numba book is proved equal to."""

from __future__ import annotations

from engine.events import (
    ACTION_ADD,
    ACTION_CANCEL,
    ACTION_CLEAR,
    ACTION_MODIFY,
    F_SNAPSHOT,
    SIDE_ASK,
    SIDE_BID,
    UNDEF_PRICE,
)


class ReferenceBook:
    """Databento MBO rules, one record at a time, with no cleverness at all."""

    def __init__(self) -> None:
        self.orders: dict[int, tuple[int, int, int]] = {}  # id -> (side, price, size)
        self.queues: tuple[dict[int, list[int]], dict[int, list[int]]] = ({}, {})
        self.in_snapshot = False
        self.cancel_unknown = 0
        self.cancel_oversize = 0

    def clear(self) -> None:
        self.orders.clear()
        self.queues[0].clear()
        self.queues[1].clear()

    def _remove(self, order_id: int) -> None:
        side, price, _ = self.orders.pop(order_id)
        queue = self.queues[side][price]
        queue.remove(order_id)
        if not queue:
            del self.queues[side][price]

    def _append(self, order_id: int, side: int, price: int, size: int) -> None:
        self.orders[order_id] = (side, price, size)
        self.queues[side].setdefault(price, []).append(order_id)

    def apply(
        self, action: int, side_code: int, price: int, size: int, order_id: int, flags: int
    ) -> None:
        snapshot = bool(flags & F_SNAPSHOT)
        if snapshot and not self.in_snapshot:
            self.clear()
        self.in_snapshot = snapshot
        if action in (ACTION_ADD, ACTION_MODIFY):
            if side_code not in (SIDE_BID, SIDE_ASK) or price == UNDEF_PRICE:
                return
            side = 0 if side_code == SIDE_BID else 1
            if order_id not in self.orders:
                self._append(order_id, side, price, size)
            else:
                old_side, old_price, old_size = self.orders[order_id]
                if old_side != side or old_price != price or size > old_size:
                    self._remove(order_id)
                    self._append(order_id, side, price, size)
                else:
                    self.orders[order_id] = (side, price, size)
                if size == 0:
                    self._remove(order_id)
        elif action == ACTION_CANCEL:
            if order_id not in self.orders:
                self.cancel_unknown += 1
                return
            side, price, resting = self.orders[order_id]
            if size > resting:
                self.cancel_oversize += 1
            if size >= resting:
                self._remove(order_id)
            else:
                self.orders[order_id] = (side, price, resting - size)
        elif action == ACTION_CLEAR:
            self.clear()

    def levels(self, side: int) -> list[tuple[int, int, int, list[tuple[int, int]]]]:
        """``(price, total size, count, [(order_id, size) front first])``, best first."""
        prices = sorted(self.queues[side], reverse=side == 0)
        out = []
        for price in prices:
            queue = [(oid, self.orders[oid][2]) for oid in self.queues[side][price]]
            out.append((price, sum(s for _, s in queue), len(queue), queue))
        return out
