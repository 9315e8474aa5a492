"""Shared pytest fixtures: where the real Databento sample files live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def sample_data_dir() -> Path:
    """The shared Databento samples: ``$QMACHINA_SAMPLE_DATA`` or ``../shared/data/databento``."""
    override = os.environ.get("QMACHINA_SAMPLE_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "databento"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    path = sample_data_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"sample data directory {path} is missing (set QMACHINA_SAMPLE_DATA)"
        )
    return path
