"""Recorded ExperimentSweep histories replay against today's workflow code, so a change that
alters the commands a running sweep would issue, without a patch, fails here first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.experiment_sweep import ExperimentSweep

REPLAY_DIR = Path(__file__).resolve().parent / "replay"
HISTORIES = sorted(REPLAY_DIR.glob("experiment_sweep_*.json"))


def test_histories_are_recorded() -> None:
    assert HISTORIES, f"no experiment_sweep_*.json in {REPLAY_DIR} (see its README.md)"


@pytest.mark.parametrize("history_file", HISTORIES, ids=[p.name for p in HISTORIES])
def test_recorded_history_replays(history_file: Path) -> None:
    history = WorkflowHistory.from_json(history_file.stem, history_file.read_text())
    asyncio.run(Replayer(workflows=[ExperimentSweep]).replay_workflow(history))
