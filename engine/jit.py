"""The numba decorator of the engine's per-event entry points.

They compile without numba's reference-counting runtime (the ``_nrt`` target option): array
arguments are then passed without an atomic incref/decref at every inlined helper, which took the
book from about 17 M to about 39 M events/s on the benchmark. The price is that such a kernel,
and everything inlined into it, must not allocate; callers pass every buffer in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numba as nb

KernelT = TypeVar("KernelT", bound=Callable[..., Any])


def hot_kernel(function: KernelT) -> KernelT:
    """``njit`` for allocation-free kernels: nogil, cached, no reference counting."""
    compiled: KernelT = nb.njit(nogil=True, cache=True, _nrt=False)(function)  # type: ignore[call-overload]
    return compiled
