"""Ports for the servers tests start and stop themselves.

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, the same range
every outgoing connection's local port is drawn from; between picking such a port and a server
binding it (or rebinding it after a restart) another process's connection can take it. These
ports come from below that range, from a block of their own for each pytest-xdist worker, and
are handed out round-robin, so a port a test picked stays free until its own server takes it.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from typing import Final

FIRST_PORT: Final = 20_000
BLOCK: Final = 1_000
EPHEMERAL_FIRST: Final = 32_768
MAX_WORKERS: Final = (EPHEMERAL_FIRST - FIRST_PORT) // BLOCK


def worker_index() -> int:
    """This pytest-xdist worker's number (``gw3`` -> 3); 0 when not under xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(name.removeprefix("gw"))
    if index >= MAX_WORKERS:
        raise RuntimeError(f"tests/ports.py has port blocks for {MAX_WORKERS} workers, not {name}")
    return index


def _block() -> Iterator[int]:
    low = FIRST_PORT + worker_index() * BLOCK
    return itertools.cycle(range(low, low + BLOCK))


_candidates = _block()


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` and nothing lingers there (no ``SO_REUSEADDR``)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports of this worker's block that nothing holds right now."""
    found: list[int] = []
    for _ in range(BLOCK):
        port = next(_candidates)
        if port_is_free(port):
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError(f"fewer than {count} free ports in this worker's block of {BLOCK}")


def free_port() -> int:
    (port,) = free_ports(1)
    return port
