"""The signals qMachina ships; each module registers its signal when imported."""

from __future__ import annotations

import importlib

BUILTIN_SIGNAL_MODULES = (
    "engine.signals.derivative",
    "engine.signals.flow_threshold",
    "engine.signals.ema_ensemble",
    "engine.signals.ml",
)


def load_builtin_signals() -> None:
    """Import every shipped signal module (importing again is a no-op), filling the registry."""
    for module in BUILTIN_SIGNAL_MODULES:
        importlib.import_module(module)
