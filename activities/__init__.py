"""Temporal activities: thin, retry-safe adapters over the engine and the store."""
