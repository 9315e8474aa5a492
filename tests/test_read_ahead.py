"""Tests for engine.read_ahead: order, errors and early stops across the producer thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.read_ahead import read_ahead
from engine.replay import TruncatedFileError, replay_files

ES_DEC25 = "esh4-glbx-mdp3-20231225.mbo.dbn.zst"


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_batches_come_out_in_order_and_equal(sample_dir: Path) -> None:
    direct = list(replay_files([sample_dir / ES_DEC25], batch_size=5_000))
    ahead = list(read_ahead(replay_files([sample_dir / ES_DEC25], batch_size=5_000), depth=2))
    assert [len(b) for b in ahead] == [len(b) for b in direct]
    np.testing.assert_array_equal(np.concatenate(ahead), np.concatenate(direct))
    assert not _read_ahead_threads()


def test_a_source_error_comes_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise KeyError("broken at 3")

    stream = read_ahead(source(), depth=1)
    assert [next(stream), next(stream)] == [1, 2]
    with pytest.raises(KeyError, match="broken at 3"):
        next(stream)


def test_a_damaged_file_raises_its_replay_error_through_the_thread(
    sample_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "cut.dbn.zst"
    path.write_bytes((sample_dir / ES_DEC25).read_bytes()[:-1])
    with pytest.raises(TruncatedFileError, match="after 68792 records") as info:
        list(read_ahead(replay_files([path], batch_size=1_000)))
    assert info.value.path == path


def test_stopping_early_stops_the_producer_and_closes_the_source() -> None:
    closed = threading.Event()
    produced: list[int] = []

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                produced.append(n)
                yield n
                n += 1
        finally:
            closed.set()

    stream = read_ahead(endless(), depth=3)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()  # type: ignore[attr-defined]
    assert closed.is_set()
    assert not _read_ahead_threads()
    assert len(produced) <= 5 + 3 + 2  # bounded: what was taken, the queue, one in hand


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        read_ahead([1], depth=0)
