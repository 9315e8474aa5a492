"""``qmachina workspace chunk-limit`` against a real SQLite store: show, set, clear, audit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qmachina.cli import app
from qmachina.store import repository as repo
from qmachina.store.database import create_store_engine, session_factory

runner = CliRunner()


async def _limit_and_audit(url: str) -> tuple[int | None, list[dict[str, object]]]:
    engine = create_store_engine(url)
    try:
        async with session_factory(engine)() as session:
            workspace = await repo.workspace_by_slug(session, "default")
            assert workspace is not None
            trail = await repo.audit_trail(session, workspace.id)
            return workspace.max_concurrent_chunks, [a.payload for a in trail]
    finally:
        await engine.dispose()


def test_chunk_limit_is_shown_set_cleared_and_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QMACHINA_DATA_DIR", str(tmp_path / "data"))
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'qmachina.sqlite3'}"

    not_migrated = runner.invoke(app, ["workspace", "chunk-limit"])
    assert not_migrated.exit_code == 2
    assert "qmachina db upgrade" in not_migrated.stderr

    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    shown = runner.invoke(app, ["workspace", "chunk-limit"])
    assert shown.exit_code == 0, shown.output
    assert "max concurrent chunks unbounded" in shown.stdout

    assert runner.invoke(app, ["workspace", "chunk-limit", "3"]).exit_code == 0
    assert asyncio.run(_limit_and_audit(url)) == (3, [{"from": None, "to": 3}])
    assert "max concurrent chunks 3" in runner.invoke(app, ["workspace", "chunk-limit"]).stdout

    assert runner.invoke(app, ["workspace", "chunk-limit", "--clear"]).exit_code == 0
    limit, trail = asyncio.run(_limit_and_audit(url))
    assert (limit, trail[-1]) == (None, {"from": 3, "to": None})

    unknown = runner.invoke(app, ["workspace", "chunk-limit", "2", "--workspace", "nope"])
    assert unknown.exit_code == 2
    assert "workspace 'nope' not found" in unknown.stderr
    both = runner.invoke(app, ["workspace", "chunk-limit", "2", "--clear"])
    assert both.exit_code == 2
    assert asyncio.run(_limit_and_audit(url))[0] is None
