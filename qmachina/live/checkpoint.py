"""Where a bronze stream stands, per instrument, and the filter that drops replayed duplicates.

The rule: for each instrument, the ``ts_event`` of the last record taken and how many records
with exactly that ``ts_event`` were taken (the trailing run). Records of one instrument arrive
with non-decreasing ``ts_event`` (checked on the shared ES file: no decrease in 68,792 records),
so what has been taken of an instrument is exactly: every record with an earlier ``ts_event``
plus the first ``count`` records at ``ts_event``. A replay from ``start <= ts_event`` sends that
prefix again; :class:`ReplayFilter` drops it and lets everything after it through.

The checkpoint is never stored on its own: :class:`qmachina.live.bronze.Bronze` derives it from
its files, so the files and the checkpoint cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from qmachina.live.record_block import RecordBlock

__all__ = ["Checkpoint", "CheckpointTracker", "ReplayFilter"]


@dataclass(frozen=True)
class Checkpoint:
    """Per instrument ``(last ts_event taken, records taken with that ts_event)``.

    ``records``: market records in bronze. ``session_start``: the start the session's first
    subscription asked for (or the gateway's session start when it asked for live data): where
    a resumed session replays from while it has not taken a record yet.
    """

    instruments: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    records: int = 0
    session_start: int | None = None

    def resume_start(self, margin_ns: int = 0) -> int | None:
        """The ``start=`` a new subscription needs so nothing after the checkpoint is missed.

        The earliest last ``ts_event`` over instruments, moved ``margin_ns`` earlier and never
        before the session start (no record yet: the session start). The margin is for
        instruments bronze has not seen yet: the stream is in ``ts_recv`` order, so the first
        record of a new instrument may carry a ``ts_event`` a little earlier than the last
        ``ts_event`` of another; the filter drops whatever the margin repeats.
        """
        if not self.instruments:
            return self.session_start
        start = min(ts for ts, _ in self.instruments.values()) - margin_ns
        return start if self.session_start is None else max(start, self.session_start)

    @property
    def last_ts_event(self) -> int | None:
        """The latest ``ts_event`` taken, over instruments."""
        if not self.instruments:
            return None
        return max(ts for ts, _ in self.instruments.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form (instrument ids as strings), e.g. for heartbeat details."""
        return {
            "instruments": {str(k): [ts, n] for k, (ts, n) in sorted(self.instruments.items())},
            "records": self.records,
            "session_start": self.session_start,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Checkpoint:
        """The inverse of :meth:`to_json`."""
        instruments = {int(k): (int(v[0]), int(v[1])) for k, v in value["instruments"].items()}
        start = value.get("session_start")
        return cls(instruments, int(value["records"]), None if start is None else int(start))


def _trailing_runs(
    iid: npt.NDArray[np.uint32], ts: npt.NDArray[np.uint64]
) -> tuple[list[int], list[int], list[int], list[bool]]:
    """Per instrument in the block: its last ts_event, the length of the trailing run of records
    with that ts_event, and whether the run is all of its records in the block."""
    n = len(iid)
    if bool((iid == iid[0]).all()):
        # One instrument: the common case, no sort needed.
        last = ts[-1]
        differ = np.flatnonzero(ts != last)
        run = n - (int(differ[-1]) + 1 if len(differ) else 0)
        return [int(iid[0])], [int(last)], [run], [run == n]
    order = np.argsort(iid, kind="stable")
    s_iid, s_ts = iid[order], ts[order]
    starts = np.flatnonzero(np.r_[True, s_iid[1:] != s_iid[:-1]])
    ends = np.r_[starts[1:], n]
    last = s_ts[ends - 1]
    differ = s_ts != np.repeat(last, ends - starts)
    marker = np.where(differ, np.arange(n), -1)
    run_from = np.maximum(np.maximum.reduceat(marker, starts) + 1, starts)
    runs = ends - run_from
    return (
        s_iid[starts].tolist(),
        last.tolist(),
        runs.tolist(),
        (runs == ends - starts).tolist(),
    )


class CheckpointTracker:
    """A checkpoint moved forward block by block (cost: a few numpy calls per block)."""

    def __init__(self, start: Checkpoint | None = None) -> None:
        start = start or Checkpoint()
        self._last: dict[int, tuple[int, int]] = dict(start.instruments)
        self._records = start.records
        self.session_start = start.session_start

    @property
    def records(self) -> int:
        """Records taken so far."""
        return self._records

    def advance(self, block: RecordBlock) -> None:
        """Take ``block`` (market records, in stream order)."""
        self.advance_columns(block.instrument_id, block.ts_event)

    def advance_columns(
        self, instrument_id: npt.NDArray[np.uint32], ts_event: npt.NDArray[np.uint64]
    ) -> None:
        """Take records given by their instrument ids and ts_events, in stream order."""
        if len(instrument_id) == 0:
            return
        last = self._last
        for iid, ts, run, whole in zip(*_trailing_runs(instrument_id, ts_event), strict=True):
            prior = last.get(iid)
            if whole and prior is not None and prior[0] == ts:
                last[iid] = (ts, prior[1] + run)
            else:
                last[iid] = (ts, run)
        self._records += len(instrument_id)

    def checkpoint(self) -> Checkpoint:
        """A frozen copy of where the stream stands."""
        return Checkpoint(dict(self._last), self._records, self.session_start)


class ReplayFilter:
    """Drops what a replay sends again, for one connection.

    For each instrument of the checkpoint, the records at or before its checkpoint are dropped
    until the first one after it arrives; from then on that instrument passes untouched.
    Instruments the checkpoint does not know always pass. Once every instrument has passed,
    :attr:`active` is false and blocks go through without any work.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        # instrument -> [checkpoint ts_event, records at that ts_event still to drop]
        self._pending: dict[int, list[int]] = {
            iid: [ts, count] for iid, (ts, count) in checkpoint.instruments.items()
        }
        self._ids = np.asarray(sorted(self._pending), dtype=np.uint32)

    @property
    def active(self) -> bool:
        """Whether some instrument may still receive duplicates."""
        return bool(self._pending)

    def apply(self, block: RecordBlock) -> tuple[RecordBlock, int]:
        """The block without duplicates, and how many records were dropped."""
        if not self._pending or len(block) == 0:
            return block, 0
        hit = np.isin(block.instrument_id, self._ids)
        if not hit.any():
            return block, 0
        drop = np.zeros(len(block), dtype=np.bool_)
        passed: list[int] = []
        for iid in np.unique(block.instrument_id[hit]).tolist():
            ts, remaining = self._pending[iid]
            rows = np.flatnonzero(block.instrument_id == iid)
            events = block.ts_event[rows]
            at = events == np.uint64(ts)
            dup = (events < np.uint64(ts)) | (at & (np.cumsum(at) <= remaining))
            fresh = np.flatnonzero(~dup)
            cut = int(fresh[0]) if len(fresh) else len(rows)
            drop[rows[:cut]] = True
            if len(fresh):
                passed.append(iid)
            else:
                self._pending[iid][1] = remaining - int(np.count_nonzero(at))
        for iid in passed:
            del self._pending[iid]
        if passed:
            self._ids = np.asarray(sorted(self._pending), dtype=np.uint32)
        dropped = int(np.count_nonzero(drop))
        return (block.select(~drop) if dropped else block), dropped
