"""Shared pytest fixtures: where the real Databento sample files live, and the sweep setup."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from qmachina.store.database import default_sqlite_url, upgrade_to_head
from tests.sweep_stack import Roots, make_roots

REPO_ROOT = Path(__file__).resolve().parents[1]

# pytest-xdist gives its workers COLUMNS=80. A rich Console created at import (the CLI modules')
# takes COLUMNS as a fixed width and then ignores the width a test's CliRunner asks for; with no
# COLUMNS it measures at print time.
os.environ.pop("COLUMNS", None)


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


@pytest.fixture(scope="session")
def sweep_roots(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Roots:
    """The ES twenty-minute configs and their silver, built once for every sweep test."""
    return make_roots(tmp_path_factory.mktemp("sweep"), sample_dir)


@pytest.fixture
def sweep_store_url(tmp_path: Path) -> str:
    """A fresh SQLite store at head, for one test."""
    url = default_sqlite_url(tmp_path)
    asyncio.run(upgrade_to_head(url))
    return url
