"""A local Databento-compatible Live gateway that serves DBN files, for development and tests."""
