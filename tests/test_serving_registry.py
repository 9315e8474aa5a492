"""The serving registry: snapshots built only from valid specs and addressed by their content,
their diffs, and the store's versions and aliases on SQLite and PostgreSQL (immutability,
idempotent registration, repoint history, rollback, audit, workspace isolation).

Snapshots are built from a copy of the shipped configs in a temporary root, so a test may
change a spec without touching ``configs/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from pydantic import ValidationError

from activities.sweep import load_sweep, point_params
from engine.sweep_core import SweepPoint
from qmachina.serving import diff as serving_diff
from qmachina.serving.diff import SnapshotChange, diff_snapshots
from qmachina.serving.snapshot import (
    CodeVersion,
    LineageError,
    RunSource,
    ServingSnapshot,
    SpecFileNotFoundError,
    UnservableSnapshotError,
    snapshot_from_run,
    snapshot_from_spec,
)
from qmachina.specs.errors import SpecError
from qmachina.specs.experiment import ExperimentSpec
from qmachina.specs.identity import spec_hash
from qmachina.specs.pipeline import default_configs_root
from qmachina.specs.serving import SignalChoice
from qmachina.specs.yaml_loader import load_spec
from qmachina.store import repository as repo
from qmachina.store import serving_registry as registry
from qmachina.store.models import (
    AuditEvent,
    ImmutableRowError,
    ServingAliasEvent,
    ServingVersion,
)
from tests import test_store
from tests.test_store import Sessions, run_with_sessions
from workflows.experiment_sweep import ExperimentSource

# The store's fixtures: a database at head on SQLite and on a scratch PostgreSQL.
postgres_url = test_store.postgres_url
empty_url = test_store.empty_url
store_url = test_store.store_url

DERIVATIVE = "serving/derivative_baseline.yaml"
EMA = "serving/ema_ensemble_baseline.yaml"
EXPERIMENT = "experiments/es_derivative_sweep.yaml"


def copy_configs(target: Path) -> Path:
    """A copy of the shipped configs root at ``target``."""
    shutil.copytree(default_configs_root(), target)
    return target


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_configs(tmp_path_factory.mktemp("serving") / "configs")


def build(configs: Path, sample_dir: Path, spec: str = DERIVATIVE) -> ServingSnapshot:
    return snapshot_from_spec(spec, configs_root=configs, data_root=sample_dir)


@pytest.fixture(scope="module")
def snapshots(configs: Path, sample_dir: Path) -> dict[str, ServingSnapshot]:
    """The shipped serving specs' snapshots, and the derivative one at a second threshold."""
    variant = configs / "serving" / "derivative_tighter.yaml"
    document = yaml.safe_load((configs / DERIVATIVE).read_text())
    document["scoring"]["threshold"] = 0.8
    variant.write_text(yaml.safe_dump(document, sort_keys=False))
    return {
        "derivative": build(configs, sample_dir),
        "ema": build(configs, sample_dir, EMA),
        "tighter": build(configs, sample_dir, "serving/derivative_tighter.yaml"),
    }


def sweep_run(
    configs: Path, sample_dir: Path, index: int = 0
) -> tuple[RunSource, ExperimentSource]:
    """A run of the shipped experiment as the sweep records it (params and spec hashes), for
    the ``index``-th point."""
    source = ExperimentSource(EXPERIMENT, str(configs), str(sample_dir), str(configs / "lake"))
    sweep = load_sweep(source)
    point = sweep.points[index]
    run = RunSource(
        job_id=str(uuid.uuid4()),
        experiment_spec_hash=sweep.spec_hashes["experiment"],
        point_hash=point.point_hash,
        params=point_params(point),
        spec_hashes=sweep.spec_hashes,
        status="succeeded",
    )
    return run, source


# --- snapshots ----------------------------------------------------------------------------------


def test_a_snapshot_holds_the_resolved_specs_and_the_datas_checksums(
    snapshots: dict[str, ServingSnapshot], configs: Path, sample_dir: Path
) -> None:
    snapshot = snapshots["derivative"]
    content, lineage = snapshot.content, snapshot.lineage
    assert content.model_id == "derivative_baseline"
    assert content.pipeline.spec.name == "es_default"
    assert content.pipeline.instrument.symbol == "ESH4"
    assert content.gold.spec_hash == spec_hash(content.gold.spec)
    # Every parameter, defaults filled in, as a sweep point holds them.
    assert content.signal.params["k_ticks"] == 10
    assert content.signal.params["decay_ticks"] == 5.0
    assert content.scoring.threshold == 0.6
    [data] = lineage.dataset_files
    path = sample_dir / data.name
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data.size_bytes == path.stat().st_size
    assert (lineage.source, lineage.spec_file) == ("serving_spec", DERIVATIVE)
    assert lineage.experiment_job_id is None
    assert lineage.code_version.package
    # The stored form reads back to the same snapshot, its id checked.
    assert ServingSnapshot.from_stored(snapshot.stored()) == snapshot


def test_the_version_id_is_the_content_not_the_registration(
    snapshots: dict[str, ServingSnapshot], configs: Path, sample_dir: Path
) -> None:
    first = snapshots["derivative"]
    assert build(configs, sample_dir).version_id == first.version_id
    # Another file with the same content, another code version: the same version.
    shutil.copy(configs / DERIVATIVE, configs / "serving" / "same_again.yaml")
    moved = build(configs, sample_dir, "serving/same_again.yaml")
    assert moved.lineage.spec_file != first.lineage.spec_file
    assert moved.version_id == first.version_id
    relabelled = first.model_copy(
        update={
            "lineage": first.lineage.model_copy(
                update={"code_version": CodeVersion(package="9.9", git_commit="f" * 40)}
            )
        }
    )
    assert ServingSnapshot.of(relabelled.content, relabelled.lineage).version_id == (
        first.version_id
    )
    # Content changes the id.
    assert snapshots["tighter"].version_id != first.version_id
    assert snapshots["ema"].version_id != first.version_id


def test_a_snapshot_whose_id_is_not_its_content_is_refused(
    snapshots: dict[str, ServingSnapshot],
) -> None:
    stored = snapshots["derivative"].stored()
    stored["content"]["scoring"]["threshold"] = 0.9
    with pytest.raises(ValidationError, match="is not the hash of the snapshot's content"):
        ServingSnapshot.from_stored(stored)


def test_an_invalid_serving_spec_builds_no_snapshot(configs: Path, sample_dir: Path) -> None:
    bad = configs / "serving" / "bad_params.yaml"
    text = (configs / DERIVATIVE).read_text().replace("k_ticks: 10", "k_ticks: -3")
    bad.write_text(text)
    with pytest.raises(SpecError) as error:
        build(configs, sample_dir, "serving/bad_params.yaml")
    [issue] = error.value.issues
    assert issue.file == str(bad)
    assert issue.field == "signal.params.k_ticks"
    assert issue.line == next(
        number for number, line in enumerate(text.splitlines(), 1) if "k_ticks" in line
    )
    for outside in (
        "../configs/serving/derivative_baseline.yaml",
        "/etc/passwd",
        "a\x00.yaml",
        "serving",
        "serving/missing.yaml",
        "x" * 1000,
    ):
        with pytest.raises(SpecFileNotFoundError, match="not found under the configs root"):
            build(configs, sample_dir, outside)


def test_a_run_becomes_the_serving_spec_with_its_parameters(
    configs: Path, sample_dir: Path, snapshots: dict[str, ServingSnapshot]
) -> None:
    run, _ = sweep_run(configs, sample_dir, index=5)
    experiment = load_spec(configs / EXPERIMENT, ExperimentSpec)
    snapshot = snapshot_from_run(run, experiment, configs_root=configs, data_root=sample_dir)
    params = run.params
    assert snapshot.content.signal.params == params["signal_params"]
    assert snapshot.content.scoring.threshold == params["threshold"]
    lineage = snapshot.lineage
    assert (lineage.source, lineage.experiment_job_id, lineage.run_point_hash) == (
        "experiment_run",
        run.job_id,
        run.point_hash,
    )
    assert lineage.experiment_spec_hash == run.experiment_spec_hash
    assert lineage.run_point is not None
    assert lineage.run_point.tp_ticks == params["tp_ticks"]
    assert lineage.serving_spec_hash == snapshots["derivative"].lineage.serving_spec_hash
    again = snapshot_from_run(run, experiment, configs_root=configs, data_root=sample_dir)
    assert again.version_id == snapshot.version_id
    # The same parameters from the spec file are other evidence, so another version.
    assert snapshot.version_id != snapshots["derivative"].version_id


def test_a_run_that_cannot_stand_for_the_serving_spec_is_refused(
    configs: Path, sample_dir: Path
) -> None:
    run, _ = sweep_run(configs, sample_dir)
    experiment = load_spec(configs / EXPERIMENT, ExperimentSpec)

    def attempt(changed: RunSource) -> None:
        snapshot_from_run(changed, experiment, configs_root=configs, data_root=sample_dir)

    with pytest.raises(LineageError, match="only a succeeded run"):
        attempt(replace(run, status="failed"))
    with pytest.raises(LineageError, match="its parameters hash to"):
        attempt(replace(run, params={**run.params, "threshold": 0.123}))
    with pytest.raises(LineageError, match="does not hold a sweep point"):
        attempt(replace(run, params={"signal": "derivative"}))
    changed = {**run.spec_hashes, "serving": "0" * 64}
    with pytest.raises(LineageError, match=r"the serving spec of experiment job .* changed"):
        attempt(replace(run, spec_hashes=changed))
    # A point whose value the registry refuses fails validation like a bad spec file would.
    params = dict(run.params["signal_params"]) | {"k_ticks": 0}
    point = SweepPoint(
        **{
            **run.params,
            "signal_params": tuple(sorted(params.items())),
        }
    )
    with pytest.raises(SpecError, match=r"signal\.params\.k_ticks"):
        attempt(replace(run, point_hash=point.point_hash, params=point_params(point)))


# --- diff ---------------------------------------------------------------------------------------


def test_the_diff_names_each_difference_by_path(snapshots: dict[str, ServingSnapshot]) -> None:
    base, tighter = snapshots["derivative"], snapshots["tighter"]
    assert diff_snapshots(base, base) == []
    assert diff_snapshots(base, tighter) == [
        SnapshotChange("content.scoring.threshold", "changed", 0.6, 0.8),
        SnapshotChange(
            "lineage.serving_spec_hash",
            "changed",
            base.lineage.serving_spec_hash,
            tighter.lineage.serving_spec_hash,
        ),
        SnapshotChange(
            "lineage.spec_file", "changed", DERIVATIVE, "serving/derivative_tighter.yaml"
        ),
    ]
    changes = {change.path: change for change in diff_snapshots(base, snapshots["ema"])}
    assert changes["content.signal.name"].a == "derivative"
    assert changes["content.signal.params.k_ticks"].change == "removed"
    assert changes["content.signal.params.fast_span_1"].change == "added"
    assert changes["content.stream.silver[field=bid_depth]"].change == "removed"
    assert changes["content.projection_horizons_bins"] == SnapshotChange(
        "content.projection_horizons_bins", "changed", [10, 50, 100], [10, 50]
    )


def test_records_are_matched_by_name_and_reorders_reported() -> None:
    a = {"stream": [{"field": "x", "role": "depth"}, {"field": "y", "role": "mass"}]}
    b = {"stream": [{"field": "y", "role": "force"}, {"field": "x", "role": "depth"}]}
    assert serving_diff.diff_values(a, b) == [
        SnapshotChange("stream[field=y].role", "changed", "mass", "force"),
        SnapshotChange("stream", "reordered", ["x", "y"], ["y", "x"]),
    ]
    assert serving_diff.diff_values({"n": 1}, {"n": 1.0}) == [
        SnapshotChange("n", "changed", 1, 1.0)
    ]


# --- the store ----------------------------------------------------------------------------------


async def _workspaces(sessions: Sessions) -> tuple[str, str]:
    async with sessions.begin() as session:
        suffix = uuid.uuid4().hex[:8]
        first = await repo.create_workspace(session, f"s-{suffix}", "Serving A")
        second = await repo.create_workspace(session, f"t-{suffix}", "Serving B")
        return first.id, second.id


async def _audit(sessions: Sessions, workspace_id: str) -> list[AuditEvent]:
    async with sessions() as session:
        return await repo.audit_trail(session, workspace_id)


def test_registering_twice_keeps_one_immutable_version(
    store_url: str, snapshots: dict[str, ServingSnapshot]
) -> None:
    snapshot = snapshots["derivative"]

    async def scenario(sessions: Sessions) -> None:
        ws, other = await _workspaces(sessions)

        async def register(workspace_id: str, actor: str) -> registry.Registration:
            async with sessions.begin() as session:
                return await registry.register_version(session, workspace_id, snapshot, actor=actor)

        first = await register(ws, "alice")
        again = await register(ws, "bob")
        assert (first.created, again.created) == (True, False)
        assert again.version.id == first.version.id
        assert again.version.registered_by == "alice"
        # Concurrent registrations of the same content in another workspace store it once.
        racing = await asyncio.gather(*(register(other, f"user{n}") for n in range(4)))
        assert sorted(r.created for r in racing) == [False, False, False, True]
        assert len({r.version.id for r in racing}) == 1
        assert racing[0].version.id != first.version.id  # each workspace owns its own row

        trail = await _audit(sessions, ws)
        assert [(a.actor, a.action, a.target) for a in trail] == [
            ("alice", "serving_version.register", f"serving_version:{snapshot.version_id}")
        ]
        assert trail[0].payload["spec_file"] == DERIVATIVE
        assert len(await _audit(sessions, other)) == 1

        async with sessions() as session:
            stored = await registry.get_version(session, ws, snapshot.version_id)
            assert ServingSnapshot.from_stored(stored.snapshot) == snapshot
            assert [v.version_id for v in await registry.list_versions(session, ws)] == [
                snapshot.version_id
            ]
            # The repository refuses to change a version ...
            stored.model_id = "renamed"
            with pytest.raises(ImmutableRowError, match="is immutable"):
                await session.flush()
        # ... and so does the database, whoever asks.
        changes: list[dict[str, object]] = [{"model_id": "renamed"}, {"snapshot": {}}]
        for change in changes:
            async with sessions() as session:
                with pytest.raises(sa.exc.IntegrityError, match="immutable"):
                    await session.execute(
                        sa.update(ServingVersion)
                        .where(ServingVersion.workspace_id == ws)
                        .values(change)
                    )
        async with sessions() as session:
            stored = await registry.get_version(session, ws, snapshot.version_id)
        assert stored.model_id == "derivative_baseline"
        assert stored.snapshot == snapshot.stored()

    run_with_sessions(store_url, scenario)


def test_the_store_refuses_a_snapshot_that_could_not_serve(
    store_url: str, snapshots: dict[str, ServingSnapshot]
) -> None:
    snapshot = snapshots["derivative"]
    # Consistently hashed, but the registry refuses its parameters.
    bad_params = snapshot.content.model_copy(
        update={"signal": SignalChoice(name="derivative", params={"k_ticks": 0})}
    )
    unservable = ServingSnapshot.of(bad_params, snapshot.lineage)
    # Changed without recomputing its id (model_copy skips validation).
    tampered = snapshot.model_copy(
        update={
            "content": snapshot.content.model_copy(
                update={"scoring": snapshot.content.scoring.model_copy(update={"threshold": 9.0})}
            )
        }
    )

    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _workspaces(sessions)
        async with sessions.begin() as session:
            with pytest.raises(UnservableSnapshotError, match="k_ticks"):
                await registry.register_version(session, ws, unservable, actor="alice")
            with pytest.raises(ValidationError, match="is not the hash"):
                await registry.register_version(session, ws, tampered, actor="alice")
        async with sessions() as session:
            assert await registry.count_versions(session, ws) == 0
        assert await _audit(sessions, ws) == []

    run_with_sessions(store_url, scenario)


def test_repoints_keep_a_history_and_roll_back_like_a_stack(
    store_url: str, snapshots: dict[str, ServingSnapshot]
) -> None:
    v1, v2, v3 = (snapshots[name].version_id for name in ("derivative", "tighter", "ema"))

    async def scenario(sessions: Sessions) -> None:
        ws, other = await _workspaces(sessions)
        async with sessions.begin() as session:
            for snapshot in snapshots.values():
                await registry.register_version(session, ws, snapshot, actor="alice")

        async def repoint(version_id: str, reason: str) -> registry.Repoint:
            async with sessions.begin() as session:
                return await registry.repoint_alias(
                    session, ws, "es-vp-prod", version_id, "eddie", reason
                )

        created = await repoint(v1, "first activation")
        assert created.created
        assert created.event is not None
        assert (created.event.from_version_id, created.event.to_version_id) == (None, v1)
        assert (await repoint(v2, "tighter threshold")).event is not None
        unchanged = await repoint(v2, "again")  # a retried activation repoints once
        assert (unchanged.event, unchanged.alias.version_id) == (None, v2)
        assert (await repoint(v3, "try the EMA")).alias.last_event_seq == 3

        async def roll_back(reason: str) -> registry.Repoint:
            async with sessions.begin() as session:
                return await registry.rollback_alias(session, ws, "es-vp-prod", "olivia", reason)

        assert (await roll_back("EMA drifts")).alias.version_id == v2
        assert (await roll_back("back to the baseline")).alias.version_id == v1
        with pytest.raises(registry.NoRollbackTargetError, match="nothing to roll back to"):
            await roll_back("once more")
        assert (await repoint(v3, "EMA again")).alias.version_id == v3
        assert (await roll_back("no")).alias.version_id == v1

        async with sessions() as session:
            history = await registry.alias_history(session, ws, "es-vp-prod")
            alias = await registry.get_alias(session, ws, "es-vp-prod")
        assert alias.version_id == v1
        assert [(e.seq, e.kind, e.from_version_id, e.to_version_id, e.actor) for e in history] == [
            (1, "set", None, v1, "eddie"),
            (2, "set", v1, v2, "eddie"),
            (3, "set", v2, v3, "eddie"),
            (4, "rollback", v3, v2, "olivia"),
            (5, "rollback", v2, v1, "olivia"),
            (6, "set", v1, v3, "eddie"),
            (7, "rollback", v3, v1, "olivia"),
        ]
        assert history[1].reason == "tighter threshold"
        assert registry.rollback_target(history) is None

        trail = [a for a in await _audit(sessions, ws) if a.action.startswith("serving_alias")]
        assert [(a.actor, a.action, a.payload["from"], a.payload["to"]) for a in trail] == [
            ("eddie", "serving_alias.repoint", None, v1),
            ("eddie", "serving_alias.repoint", v1, v2),
            ("eddie", "serving_alias.repoint", v2, v3),
            ("olivia", "serving_alias.rollback", v3, v2),
            ("olivia", "serving_alias.rollback", v2, v1),
            ("eddie", "serving_alias.repoint", v1, v3),
            ("olivia", "serving_alias.rollback", v3, v1),
        ]
        assert trail[0].payload["reason"] == "first activation"
        assert {a.target for a in trail} == {"serving_alias:es-vp-prod"}

        # History is append-only in the database too.
        async with sessions() as session:
            with pytest.raises(sa.exc.IntegrityError, match="immutable"):
                await session.execute(
                    sa.update(ServingAliasEvent)
                    .where(ServingAliasEvent.workspace_id == ws)
                    .values(reason="edited")
                )

        # Another workspace sees none of it and cannot point at this workspace's versions.
        async with sessions.begin() as session:
            with pytest.raises(registry.AliasNotFoundError):
                await registry.get_alias(session, other, "es-vp-prod")
            with pytest.raises(registry.VersionNotFoundError):
                await registry.get_version(session, other, v1)
            with pytest.raises(registry.VersionNotFoundError):
                await registry.repoint_alias(session, other, "es-vp-prod", v1, "wendy", "steal")
        async with sessions() as session:
            assert await registry.list_aliases(session, other) == []

    run_with_sessions(store_url, scenario)


def test_a_refused_or_rolled_back_repoint_leaves_nothing(
    store_url: str, snapshots: dict[str, ServingSnapshot]
) -> None:
    v1 = snapshots["derivative"].version_id

    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _workspaces(sessions)
        async with sessions.begin() as session:
            await registry.register_version(session, ws, snapshots["derivative"], actor="alice")
        before = len(await _audit(sessions, ws))
        async with sessions() as session, session.begin() as transaction:
            await registry.repoint_alias(session, ws, "prod", v1, "eddie", "will not commit")
            await transaction.rollback()
        async with sessions.begin() as session:
            for alias, version_id, reason, error in (
                ("prod", "0" * 64, "unknown", registry.VersionNotFoundError),
                ("Prod!", v1, "bad name", registry.InvalidRepointError),
                ("prod", v1, "   ", registry.InvalidRepointError),
            ):
                with pytest.raises(error):
                    await registry.repoint_alias(session, ws, alias, version_id, "eddie", reason)
            with pytest.raises(registry.AliasNotFoundError):
                await registry.rollback_alias(session, ws, "prod", "eddie", "nothing there")
        async with sessions() as session:
            assert await registry.list_aliases(session, ws) == []
            assert (await session.scalar(sa.select(sa.func.count(ServingAliasEvent.id)))) == 0
        assert len(await _audit(sessions, ws)) == before

    run_with_sessions(store_url, scenario)


def test_versions_and_runs_by_prefix_and_references(
    store_url: str, snapshots: dict[str, ServingSnapshot]
) -> None:
    snapshot = snapshots["derivative"]

    async def scenario(sessions: Sessions) -> None:
        ws, _ = await _workspaces(sessions)
        async with sessions.begin() as session:
            await registry.register_version(session, ws, snapshot, actor="alice")
            await registry.repoint_alias(session, ws, "prod", snapshot.version_id, "a", "go")
            # Two rows sharing a prefix (written below the registry, which never makes them).
            for tail in ("1", "2"):
                session.add(
                    ServingVersion(
                        workspace_id=ws,
                        version_id="abcdef01" + tail * 56,
                        model_id="m",
                        source="serving_spec",
                        snapshot={},
                        registered_by="test",
                    )
                )
            job = await repo.create_job(session, ws, "sweep", "e" * 64)
            for point in ("12345678" + "a" * 56, "12345678" + "b" * 56, "9" * 64):
                await repo.record_run(
                    session,
                    ws,
                    job.id,
                    point,
                    params={},
                    metrics={},
                    status="succeeded",
                    spec_hashes={},
                )
        async with sessions() as session:
            prefix = snapshot.version_id[:8]
            assert (await registry.find_version(session, ws, prefix)).version_id == (
                snapshot.version_id
            )
            with pytest.raises(registry.AmbiguousReferenceError, match="abcdef01"):
                await registry.find_version(session, ws, "abcdef01")
            for missing in ("0123abcd", "short", "not-hex-at-all"):
                with pytest.raises(registry.VersionNotFoundError):
                    await registry.find_version(session, ws, missing)
            by_alias, alias = await registry.resolve_reference(session, ws, "prod")
            assert (by_alias.version_id, alias) == (snapshot.version_id, "prod")
            by_id, alias = await registry.resolve_reference(session, ws, snapshot.version_id)
            assert (by_id.version_id, alias) == (snapshot.version_id, None)
            assert (await registry.find_run(session, ws, job.id, "99999999")).point_hash == (
                "9" * 64
            )
            with pytest.raises(registry.AmbiguousReferenceError):
                await registry.find_run(session, ws, job.id, "12345678")
            with pytest.raises(repo.RunNotFoundError):
                await registry.find_run(session, ws, job.id, "77777777")
            with pytest.raises(repo.JobNotFoundError):
                await registry.find_run(session, ws, str(uuid.uuid4()), "9" * 64)

    run_with_sessions(store_url, scenario)


def test_dataset_checksums_follow_the_file(tmp_path: Path, configs: Path, sample_dir: Path) -> None:
    """A changed dataset file changes the version (its checksum is content)."""
    data = tmp_path / "data"
    data.mkdir()
    name = "esh4-glbx-mdp3-20231225.mbo.dbn.zst"
    shutil.copy(sample_dir / name, data / name)
    before = snapshot_from_spec(DERIVATIVE, configs_root=configs, data_root=data)
    with (data / name).open("ab") as stream:
        stream.write(b"\0")
    after = snapshot_from_spec(DERIVATIVE, configs_root=configs, data_root=data)
    assert after.version_id != before.version_id
    [change] = [c for c in diff_snapshots(before, after) if c.path.endswith(".sha256")]
    assert change.path == f"lineage.dataset_files[name={name}].sha256"
