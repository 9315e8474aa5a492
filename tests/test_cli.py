"""The ``qmachina`` command line, run in-process through typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

import databento as db
import numpy as np
from typer.testing import CliRunner

from engine.events import F_LAST
from qmachina.cli import app

runner = CliRunner()
ES_FILE = "esh4-glbx-mdp3-20231225.mbo.dbn.zst"


def test_book_replay_prints_the_final_book(sample_dir: Path) -> None:
    result = runner.invoke(app, ["book", "replay", str(sample_dir / ES_FILE), "--levels", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    book = json.loads(lines[0])
    assert book["instrument_id"] == 17077
    assert book["bids"][0][0] == "4810.00"
    assert book["asks"][0][0] == "4810.25"
    assert len(book["bids"]) == len(book["asks"]) == 2
    records = db.DBNStore.from_file(sample_dir / ES_FILE).to_ndarray()
    assert book["ts_recv"] == int(records["ts_recv"][-1])
    assert book["sequence"] == int(records["sequence"][-1])


def test_book_replay_every_last_prints_one_line_per_f_last(sample_dir: Path) -> None:
    path = sample_dir / "esm4-glbx-mdp3-20240508-0000-0002.mbo.dbn.zst"
    result = runner.invoke(
        app, ["book", "replay", str(path), "--every-last", "--levels", "1", "--instrument", "ESM4"]
    )
    assert result.exit_code == 0, result.output
    records = db.DBNStore.from_file(path).to_ndarray()
    mine = records[records["instrument_id"] == 5602]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == int(((mine["flags"] & F_LAST) != 0).sum())
    last = json.loads(lines[-1])
    assert last["ts_recv"] == int(mine["ts_recv"][-1])


def test_book_replay_of_a_non_mbo_file_names_it(sample_dir: Path) -> None:
    path = sample_dir / "glbx.mdp3_test_data.mbp-1.dbn.zst"
    result = runner.invoke(app, ["book", "replay", str(path)])
    assert result.exit_code == 2
    assert "glbx.mdp3_test_data.mbp-1.dbn.zst" in result.stderr
    assert "mbo" in result.stderr


def test_book_replay_unknown_symbol_lists_the_known_ones(sample_dir: Path) -> None:
    result = runner.invoke(
        app, ["book", "replay", str(sample_dir / ES_FILE), "--instrument", "NQH4"]
    )
    assert result.exit_code == 2
    assert "NQH4" in result.stderr
    assert "ESH4" in result.stderr


def test_synth_writes_a_file_databento_reads(tmp_path: Path) -> None:
    out = tmp_path / "s.mbo.dbn.zst"
    result = runner.invoke(app, ["synth", "--events", "3000", "--seed", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = db.DBNStore.from_file(out).to_ndarray()
    assert len(records) == 3000
    assert np.all(np.diff(records["ts_recv"].astype(np.int64)) >= 0)
