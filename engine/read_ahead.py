"""Decode ahead on a second thread, so reading a file overlaps with what consumes it.

Replay spends its time in zstd and a numba kernel, the book and silver in numba kernels, and
Parquet writing in Arrow: all of them release the GIL, so on a machine with two cores a
producer thread decoding the next batches while the caller builds silver from the last one
takes the slower of the two stages instead of their sum.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Final, TypeVar

__all__ = ["read_ahead"]

ItemT = TypeVar("ItemT")

_POLL_SECONDS: Final = 0.05  # how often a blocked producer looks for the consumer's stop


class _End:
    """The producer's last message: the source is exhausted, or failed with ``error``."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


def read_ahead(items: Iterable[ItemT], depth: int = 4) -> Iterator[ItemT]:
    """Yield ``items`` in order while a background thread produces up to ``depth`` ahead.

    An exception of the source is raised to the caller after the items before it. A caller
    that stops early (closes the iterator, or breaks out of its loop and drops it) stops the
    producer, which closes the source, so its files are released.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return _consume(iter(items), depth)


def _consume(source: Iterator[ItemT], depth: int) -> Iterator[ItemT]:
    channel: queue.Queue[ItemT | _End] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    producer = threading.Thread(
        target=_produce, args=(source, channel, stop), name="read-ahead", daemon=True
    )
    producer.start()
    try:
        while True:
            item = channel.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting for room
            with contextlib.suppress(queue.Empty):
                channel.get(timeout=_POLL_SECONDS)
        producer.join()


def _produce(
    source: Iterator[ItemT], channel: queue.Queue[ItemT | _End], stop: threading.Event
) -> None:
    end = _End(None)
    try:
        for item in source:
            if not _put(channel, item, stop):
                return
    except BaseException as exc:  # handed to the consumer, raised there
        end = _End(exc)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    _put(channel, end, stop)


def _put(channel: queue.Queue[ItemT | _End], item: ItemT | _End, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer stops first; whether it was put."""
    while not stop.is_set():
        try:
            channel.put(item, timeout=_POLL_SECONDS)
        except queue.Full:
            continue
        return True
    return False
