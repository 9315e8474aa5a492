"""The control-plane store on SQLite (in a temp dir) and on a throwaway PostgreSQL database.

Schemas are created only through the Alembic migrations. PostgreSQL tests use one fresh database
per test session (random name, created and dropped through the ``postgres`` admin database) and
fail, never skip, when the server is down.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qmachina.store import governance
from qmachina.store import repository as repo
from qmachina.store.database import (
    create_store_engine,
    default_sqlite_url,
    downgrade_to_base,
    session_factory,
    upgrade_to_head,
)
from qmachina.store.models import Base, ExperimentJob, JobEvent, Workspace
from tests.postgres import scratch_database

STORE_TABLES = {
    "workspace",
    "workspace_member",
    "experiment_job",
    "job_event",
    "job_artifact",
    "experiment_run",
    "audit_event",
    "resource_share",
    "serving_version",
    "serving_alias",
    "serving_alias_event",
    "modeling_session",
    "live_session",
    "contract_roll_event",
}
SPEC_HASH = "e" * 64

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test session, dropped at the end."""
    with scratch_database("qmachina_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL with no store tables (PostgreSQL: the session database, downgraded)."""
    if request.param == "sqlite":
        return default_sqlite_url(tmp_path)
    url: str = request.getfixturevalue("postgres_url")
    asyncio.run(downgrade_to_base(url))
    return url


@pytest.fixture
def store_url(empty_url: str) -> str:
    """A database URL migrated to head."""
    asyncio.run(upgrade_to_head(empty_url))
    return empty_url


def run_with_sessions(url: str, scenario: Callable[[Sessions], Awaitable[None]]) -> None:
    """Run ``scenario`` with a session factory on a fresh engine, disposed afterwards."""

    async def main() -> None:
        engine = create_store_engine(url)
        try:
            await scenario(session_factory(engine))
        finally:
            await engine.dispose()

    asyncio.run(main())


def _schema_state(connection: Connection) -> tuple[set[str], list[object]]:
    tables = set(sa.inspect(connection).get_table_names()) - {"alembic_version"}
    drift = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    return tables, drift


async def _inspect(url: str) -> tuple[set[str], list[object]]:
    engine = create_store_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_schema_state)
    finally:
        await engine.dispose()


def test_migrations_upgrade_downgrade_upgrade(empty_url: str) -> None:
    tables, _ = asyncio.run(_inspect(empty_url))
    assert tables == set()

    asyncio.run(upgrade_to_head(empty_url))
    tables, drift = asyncio.run(_inspect(empty_url))
    assert tables == STORE_TABLES
    assert drift == [], "models and migrations disagree"

    asyncio.run(downgrade_to_base(empty_url))
    assert asyncio.run(_inspect(empty_url))[0] == set()

    asyncio.run(upgrade_to_head(empty_url))
    assert asyncio.run(_inspect(empty_url))[0] == STORE_TABLES


async def _two_workspaces(sessions: Sessions) -> tuple[str, str]:
    async with sessions.begin() as session:
        suffix = uuid.uuid4().hex[:8]
        first = await repo.create_workspace(session, f"a-{suffix}", "Desk A")
        second = await repo.create_workspace(session, f"b-{suffix}", "Desk B")
        return first.id, second.id


async def _job(sessions: Sessions, workspace_id: str, name: str = "es-sweep") -> str:
    async with sessions.begin() as session:
        return (await repo.create_job(session, workspace_id, name, SPEC_HASH)).id


def test_queries_never_cross_workspaces(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws_a, ws_b = await _two_workspaces(sessions)
        job_a = await _job(sessions, ws_a)
        async with sessions.begin() as session:
            await repo.add_member(session, ws_a, "alice", "owner")
            await repo.add_member(session, ws_b, "bob", "viewer")
            await repo.append_job_event(session, ws_a, job_a, "started", {})
            await repo.record_run(
                session,
                ws_a,
                job_a,
                "p" * 64,
                params={},
                metrics={"sharpe": 1.0},
                status="succeeded",
                spec_hashes={},
            )

        async with sessions() as session:
            assert [j.id for j in await repo.list_jobs(session, ws_a)] == [job_a]
            assert await repo.list_jobs(session, ws_b) == []
            assert [m.subject for m in await repo.list_members(session, ws_b)] == ["bob"]
            assert await repo.job_events_after(session, ws_b, job_a, 0) == []
            assert await repo.list_runs(session, ws_b, job_a, order_by="sharpe") == []
            with pytest.raises(
                repo.JobNotFoundError, match=f"{job_a} not found in workspace {ws_b}"
            ):
                await repo.get_job(session, ws_b, job_a)
            with pytest.raises(repo.JobNotFoundError):
                await repo.set_job_status(session, ws_b, job_a, "running")
            with pytest.raises(repo.JobNotFoundError):
                await repo.append_job_event(session, ws_b, job_a, "started", {})
            with pytest.raises(repo.JobNotFoundError):
                await repo.record_run(
                    session,
                    ws_b,
                    job_a,
                    "q" * 64,
                    params={},
                    metrics={},
                    status="failed",
                    spec_hashes={},
                )

        # Below the repository, the composite foreign key refuses a row whose workspace differs
        # from its job's.
        async with sessions() as session:
            session.add(JobEvent(workspace_id=ws_b, job_id=job_a, seq=99, kind="x", payload={}))
            with pytest.raises(sa.exc.IntegrityError):
                await session.flush()

    run_with_sessions(store_url, scenario)


def test_job_status_transitions(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        finished = await _job(sessions, ws)
        async with sessions.begin() as session:
            job = await repo.set_job_status(session, ws, finished, "running")
            assert job.started_at is not None
            assert job.started_at.tzinfo is not None
            job = await repo.set_job_status(session, ws, finished, "succeeded")
            assert job.finished_at is not None

        async with sessions() as session:
            job = await repo.get_job(session, ws, finished)
            assert job.status == "succeeded"
            assert job.finished_at is not None
            assert job.finished_at.utcoffset() is not None
            assert job.started_at is not None
            assert job.started_at <= job.finished_at
            for later in ("running", "failed", "queued"):
                with pytest.raises(repo.InvalidJobTransitionError) as error:
                    await repo.set_job_status(session, ws, finished, later)
                assert str(error.value) == (
                    f"experiment job {finished} cannot go from 'succeeded' to {later!r}; "
                    "allowed from 'succeeded': none (terminal)"
                )

        queued = await _job(sessions, ws, "queued-one")
        async with sessions.begin() as session:
            with pytest.raises(repo.InvalidJobTransitionError, match="'queued' to 'succeeded'"):
                await repo.set_job_status(session, ws, queued, "succeeded")
            with pytest.raises(repo.InvalidJobTransitionError, match="'queued' to 'bogus'"):
                await repo.set_job_status(session, ws, queued, "bogus")
            await repo.set_job_status(session, ws, queued, "canceled")

        failed = await _job(sessions, ws, "failing")
        async with sessions.begin() as session:
            await repo.set_job_status(session, ws, failed, "running")
            job = await repo.set_job_status(session, ws, failed, "failed", error="worker lost")
        assert (job.status, job.error) == ("failed", "worker lost")

        # The CHECK constraint guards the column even below the repository.
        async with sessions() as session:
            with pytest.raises(sa.exc.IntegrityError):
                await session.execute(
                    sa.update(ExperimentJob)
                    .where(ExperimentJob.id == failed)
                    .values(status="bogus")
                )

    run_with_sessions(store_url, scenario)


def test_event_seq_is_monotonic_per_job(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        job = await _job(sessions, ws)
        other = await _job(sessions, ws, "other")

        async def append(n: int) -> int:
            async with sessions.begin() as session:
                event = await repo.append_job_event(session, ws, job, "progress", {"n": n})
                return event.seq

        # Concurrent appends, each in its own transaction, never share a number.
        seqs = await asyncio.gather(*(append(n) for n in range(8)))
        assert sorted(seqs) == list(range(1, 9))

        async with sessions.begin() as session:
            first_of_other = await repo.append_job_event(session, ws, other, "started", {})
        assert first_of_other.seq == 1

        async with sessions() as session:
            resumed = await repo.job_events_after(session, ws, job, 5)
            assert [e.seq for e in resumed] == [6, 7, 8]
            assert all(e.job_id == job for e in resumed)
            assert [e.seq for e in await repo.job_events_after(session, ws, job, 0, limit=2)] == [
                1,
                2,
            ]
            assert await repo.job_events_after(session, ws, job, 8) == []

    run_with_sessions(store_url, scenario)


def test_record_run_is_idempotent_and_keeps_the_latest_result(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        job = await _job(sessions, ws)
        point = "a" * 64
        params = {"signal": "obi", "threshold": 0.5}
        hashes = {"experiment": SPEC_HASH}

        async with sessions.begin() as session:
            first = await repo.record_run(
                session,
                ws,
                job,
                point,
                params=params,
                metrics={"sharpe": 1.5},
                status="succeeded",
                spec_hashes=hashes,
            )
        async with sessions.begin() as session:
            again = await repo.record_run(
                session,
                ws,
                job,
                point,
                params=params,
                metrics={"sharpe": 1.5},
                status="succeeded",
                spec_hashes=hashes,
            )
        assert (again.id, again.created_at) == (first.id, first.created_at)

        # A changed payload for the same point replaces the earlier one in the same row.
        async with sessions.begin() as session:
            changed = await repo.record_run(
                session,
                ws,
                job,
                point,
                params=params,
                metrics={"sharpe": 2.0, "trades": 7},
                status="succeeded",
                spec_hashes=hashes,
            )
        assert changed.id == first.id
        assert changed.updated_at >= first.updated_at

        async with sessions() as session:
            runs = await repo.list_runs(session, ws, job, order_by="sharpe")
        assert len(runs) == 1
        assert runs[0].metrics == {"sharpe": 2.0, "trades": 7}
        assert runs[0].params == params
        assert runs[0].spec_hashes == hashes

        async with sessions() as session:
            with pytest.raises(repo.NonFiniteMetricError, match=r"metric test\.sharpe is nan"):
                await repo.record_run(
                    session,
                    ws,
                    job,
                    "b" * 64,
                    params={},
                    metrics={"test": {"sharpe": float("nan")}},
                    status="succeeded",
                    spec_hashes={},
                )

    run_with_sessions(store_url, scenario)


def test_record_runs_in_bulk_matches_one_at_a_time_and_is_idempotent(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        bulk_job = await _job(sessions, ws, "bulk")
        single_job = await _job(sessions, ws, "single")
        hashes = {"experiment": SPEC_HASH}
        records = [
            repo.RunRecord(
                f"{index:064x}",
                {"threshold": index / 10},
                {"train": {"pnl": float(index)}, "test": {"pnl": None}},
                "failed" if index % 7 == 0 else "succeeded",
            )
            for index in range(1, 1201)  # more rows than one statement carries
        ]
        async with sessions.begin() as session:
            assert (
                await repo.record_runs(session, ws, bulk_job, records, spec_hashes=hashes) == 1200
            )
            for record in records[:50]:
                await repo.record_run(
                    session,
                    ws,
                    single_job,
                    record.point_hash,
                    params=record.params,
                    metrics=record.metrics,
                    status=record.status,
                    spec_hashes=hashes,
                )
        async with sessions() as session:
            first = {
                r.point_hash: r
                for r in await repo.list_runs(session, ws, bulk_job, order_by="train.pnl")
            }
            single = await repo.list_runs(session, ws, single_job, order_by="train.pnl")
        assert len(first) == 1200
        for run in single:
            bulk = first[run.point_hash]
            assert (bulk.params, bulk.metrics, bulk.status, bulk.spec_hashes) == (
                run.params,
                run.metrics,
                run.status,
                run.spec_hashes,
            )

        # Again, with a changed result for one point: the same rows, the latest result.
        changed = [*records[:-1], replace(records[-1], metrics={"train": {"pnl": -1.0}})]
        async with sessions.begin() as session:
            await repo.record_runs(session, ws, bulk_job, changed, spec_hashes=hashes)
        async with sessions() as session:
            again = {
                r.point_hash: r
                for r in await repo.list_runs(session, ws, bulk_job, order_by="train.pnl")
            }
        assert {h: (r.id, r.created_at) for h, r in again.items()} == {
            h: (r.id, r.created_at) for h, r in first.items()
        }
        assert again[records[-1].point_hash].metrics == {"train": {"pnl": -1.0}}

        # One bad record refuses the whole batch before anything is written.
        poisoned = [
            repo.RunRecord("c" * 64, {}, {"train": {"pnl": 1.0}}, "succeeded"),
            repo.RunRecord("d" * 64, {}, {"train": {"pnl": float("inf")}}, "succeeded"),
        ]
        async with sessions() as session:
            with pytest.raises(repo.NonFiniteMetricError, match=r"metric train\.pnl is inf"):
                await repo.record_runs(session, ws, bulk_job, poisoned, spec_hashes=hashes)
        async with sessions() as session:
            assert len(await repo.list_runs(session, ws, bulk_job, order_by="train.pnl")) == 1200

    run_with_sessions(store_url, scenario)


def test_list_runs_orders_numerically_by_a_metric(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        job = await _job(sessions, ws)
        # 10.0 above 9.5 proves numeric (not text) order; the run without the metric comes last.
        results = {"p1": 9.5, "p2": 10.0, "p3": -3.25, "p4": None}
        async with sessions.begin() as session:
            for name, sharpe in results.items():
                test_metrics = {} if sharpe is None else {"sharpe": sharpe}
                await repo.record_run(
                    session,
                    ws,
                    job,
                    name.ljust(64, "0"),
                    params={"name": name},
                    metrics={"sharpe": sharpe or 0.0, "test": test_metrics},
                    status="succeeded" if sharpe is not None else "failed",
                    spec_hashes={},
                )

        async with sessions() as session:
            best = await repo.list_runs(session, ws, job, order_by="test.sharpe")
            worst_two = await repo.list_runs(
                session, ws, job, order_by="test.sharpe", descending=False, limit=2
            )
            flat = await repo.list_runs(session, ws, job, order_by="sharpe", limit=1)
        assert [r.params["name"] for r in best] == ["p2", "p1", "p3", "p4"]
        assert [r.params["name"] for r in worst_two] == ["p3", "p1"]
        assert [r.params["name"] for r in flat] == ["p2"]

    run_with_sessions(store_url, scenario)


def test_runs_filter_page_and_count_by_job(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, other_ws = await _two_workspaces(sessions)
        job = await _job(sessions, ws)
        quiet_job = await _job(sessions, ws, "quiet")
        results = {"p1": 9.5, "p2": 10.0, "p3": -3.25, "p4": None}
        async with sessions.begin() as session:
            for name, sharpe in results.items():
                await repo.record_run(
                    session,
                    ws,
                    job,
                    name.ljust(64, "0"),
                    params={"name": name},
                    metrics={"test": {} if sharpe is None else {"sharpe": sharpe}},
                    status="succeeded" if sharpe is not None else "failed",
                    spec_hashes={},
                )

        async with sessions() as session:
            kept = await repo.list_runs(
                session, ws, job, order_by="test.sharpe", status="succeeded", min_value=0.0
            )
            second = await repo.list_runs(
                session,
                ws,
                job,
                order_by="test.sharpe",
                limit=1,
                offset=1,
                status="succeeded",
                min_value=0.0,
            )
            total = await repo.count_runs(
                session, ws, job, metric="test.sharpe", status="succeeded", min_value=0.0
            )
            failed = await repo.count_runs(session, ws, job, metric="test.sharpe", status="failed")
            counts = await repo.run_counts(session, ws, [job, quiet_job])
            elsewhere = await repo.run_counts(session, other_ws, [job])
            run = await repo.get_run(session, ws, job, "p3".ljust(64, "0"))
            with pytest.raises(repo.RunNotFoundError, match=f"not found in job {job}"):
                await repo.get_run(session, ws, job, "p9".ljust(64, "0"))
            with pytest.raises(repo.RunNotFoundError):
                await repo.get_run(session, other_ws, job, "p3".ljust(64, "0"))
        assert [r.params["name"] for r in kept] == ["p2", "p1"]
        assert [r.params["name"] for r in second] == ["p1"]
        assert (total, failed) == (2, 1)
        assert counts == {
            job: {"succeeded": 3, "failed": 1},
            quiet_job: {"succeeded": 0, "failed": 0},
        }
        assert elsewhere == {job: {"succeeded": 0, "failed": 0}}
        assert run.metrics == {"test": {"sharpe": -3.25}}

    run_with_sessions(store_url, scenario)


def test_a_queued_job_can_fail_before_it_starts(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        job = await _job(sessions, ws)
        async with sessions.begin() as session:
            failed = await repo.set_job_status(session, ws, job, "failed", error="no workflow")
        assert (failed.status, failed.error, failed.started_at) == ("failed", "no workflow", None)
        assert failed.finished_at is not None

    run_with_sessions(store_url, scenario)


def test_workspace_quotas(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        async with sessions.begin() as session:
            limited = await governance.set_quotas(
                session, ws, {"max_concurrent_chunks": 3, "max_concurrent_jobs": 0}
            )
        assert (limited.max_concurrent_chunks, limited.max_concurrent_jobs) == (3, 0)
        async with sessions.begin() as session:
            with pytest.raises(repo.StoreError, match="max_concurrent_chunks must be at least 1"):
                await governance.set_quotas(session, ws, {"max_concurrent_chunks": 0})
            with pytest.raises(repo.StoreError, match="unknown quota max_disks"):
                await governance.set_quotas(session, ws, {"max_disks": 1})
            unbounded = await governance.set_quotas(session, ws, {"max_concurrent_chunks": None})
        assert (unbounded.max_concurrent_chunks, unbounded.max_concurrent_jobs) == (None, 0)
        # The database itself refuses a bound that is not positive, and a negative quota.
        for column, value in (("max_concurrent_chunks", 0), ("max_storage_bytes", -1)):
            async with sessions() as session:
                with pytest.raises(sa.exc.IntegrityError):
                    await session.execute(
                        sa.update(Workspace).where(Workspace.id == ws).values({column: value})
                    )

    run_with_sessions(store_url, scenario)


def test_members_roles_and_the_last_owner(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        async with sessions.begin() as session:
            acme = await governance.create_owned_workspace(session, "acme", "Acme", "olivia")
            _, previous = await governance.set_member_role(session, acme.id, "adam", "admin")
            assert previous is None
            _, previous = await governance.set_member_role(session, acme.id, "adam", "viewer")
            assert previous == "admin"
        async with sessions.begin() as session:
            with pytest.raises(governance.WorkspaceExistsError):
                await governance.create_owned_workspace(session, "acme", "Again", "x")
        async with sessions.begin() as session:
            with pytest.raises(governance.LastOwnerError, match="last owner"):
                await governance.set_member_role(session, acme.id, "olivia", "admin")
            with pytest.raises(governance.LastOwnerError):
                await governance.remove_member(session, acme.id, "olivia")
            with pytest.raises(governance.MemberNotFoundError):
                await governance.remove_member(session, acme.id, "nobody")
            with pytest.raises(repo.StoreError, match="role 'emperor' is not one of"):
                await governance.set_member_role(session, acme.id, "x", "emperor")
        async with sessions.begin() as session:
            await governance.set_member_role(session, acme.id, "adam", "owner")
            await governance.set_member_role(session, acme.id, "olivia", "editor")
            assert await governance.remove_member(session, acme.id, "olivia") == "editor"
        async with sessions() as session:
            members = await repo.list_members(session, acme.id)
        assert [(m.subject, m.role) for m in members] == [("adam", "owner")]

    run_with_sessions(store_url, scenario)


def test_shares_and_storage_use(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, other = await _two_workspaces(sessions)
        job = await _job(sessions, ws)
        async with sessions.begin() as session:
            _, new = await governance.share_resource(session, ws, "experiment_job", job, other)
            _, again = await governance.share_resource(session, ws, "experiment_job", job, other)
            assert (new, again) == (True, False)
            with pytest.raises(repo.StoreError, match="cannot share with itself"):
                await governance.share_resource(session, ws, "experiment_job", job, ws)
            with pytest.raises(repo.StoreError, match="resource type 'gadget'"):
                await governance.share_resource(session, ws, "gadget", job, other)
            # One lake file referenced twice counts once.
            await repo.add_artifact(session, ws, job, "silver", "lake/a", "a" * 64, 100)
            await repo.add_artifact(session, ws, job, "gold", "lake/b", "b" * 64, 50)
        async with sessions() as session:
            shared = await governance.shared_resource(session, other, "experiment_job", job)
            assert shared is not None
            assert shared.workspace_id == ws
            assert await governance.shared_resource(session, ws, "experiment_job", job) is None
            assert await governance.storage_used(session, ws) == 150
            assert await governance.storage_used(session, other) == 0
            assert await governance.active_job_count(session, ws) == 1
        async with sessions.begin() as session:
            assert await governance.unshare_resource(session, ws, "experiment_job", job, other)
            assert not await governance.unshare_resource(session, ws, "experiment_job", job, other)

    run_with_sessions(store_url, scenario)


def test_artifacts_carry_a_checksum(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        job = await _job(sessions, ws)
        async with sessions.begin() as session:
            await repo.add_artifact(session, ws, job, "gold", "lake/gold/part-0.parquet", "c" * 64)
        async with sessions() as session:
            artifacts = await repo.list_artifacts(session, ws, job)
            assert [(a.kind, a.sha256) for a in artifacts] == [("gold", "c" * 64)]
            with pytest.raises(sa.exc.IntegrityError):
                await repo.add_artifact(session, ws, job, "gold", "lake/x.parquet", "short")

    run_with_sessions(store_url, scenario)


def test_audit_row_commits_and_rolls_back_with_its_change(store_url: str) -> None:
    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _two_workspaces(sessions)
        job = await _job(sessions, ws)

        async with sessions() as session, session.begin() as transaction:
            await repo.set_job_status(session, ws, job, "running")
            await repo.write_audit(
                session, ws, actor="alice", action="job.start", target=job, payload={"why": "x"}
            )
            created = await repo.create_job(session, ws, "rolled-back", SPEC_HASH)
            await repo.write_audit(
                session, ws, actor="alice", action="job.create", target=created.id
            )
            await transaction.rollback()

        async with sessions() as session:
            assert (await repo.get_job(session, ws, job)).status == "queued"
            assert [j.id for j in await repo.list_jobs(session, ws)] == [job]
            assert await repo.audit_trail(session, ws) == []

        async with sessions.begin() as session:
            await repo.set_job_status(session, ws, job, "running")
            await repo.write_audit(session, ws, actor="alice", action="job.start", target=job)

        async with sessions() as session:
            assert (await repo.get_job(session, ws, job)).status == "running"
            trail = await repo.audit_trail(session, ws)
        assert [(a.actor, a.action, a.target, a.payload) for a in trail] == [
            ("alice", "job.start", job, {})
        ]
        assert trail[0].created_at.utcoffset() is not None

    run_with_sessions(store_url, scenario)
