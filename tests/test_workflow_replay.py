"""Recorded histories of every workflow replay against today's workflow code, so a change that
alters the commands a running workflow would issue, without a patch, fails here first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.experiment_sweep import ExperimentSweep
from workflows.live_session import LiveIngestionSession
from workflows.modeling_session import ModelingSession
from workflows.promotion import Promotion

REPLAY_DIR = Path(__file__).resolve().parent / "replay"
HISTORIES = sorted(REPLAY_DIR.glob("*.json"))


@pytest.mark.parametrize(
    "workflow", ["experiment_sweep", "promotion", "modeling_session", "live_session"]
)
def test_histories_are_recorded(workflow: str) -> None:
    assert list(REPLAY_DIR.glob(f"{workflow}_*.json")), (
        f"no {workflow}_*.json in {REPLAY_DIR} (see its README.md)"
    )


@pytest.mark.parametrize("history_file", HISTORIES, ids=[p.name for p in HISTORIES])
def test_recorded_history_replays(history_file: Path) -> None:
    history = WorkflowHistory.from_json(history_file.stem, history_file.read_text())
    asyncio.run(
        Replayer(
            workflows=[ExperimentSweep, Promotion, ModelingSession, LiveIngestionSession]
        ).replay_workflow(history)
    )
