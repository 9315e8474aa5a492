"""Signals: per-bin scores computed from silver and gold, looked up by name in a registry."""
