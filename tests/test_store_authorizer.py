"""The store-backed authorizer reads only the tuples that can bear on each question; on random
stores (workspaces, members, experiment jobs, serving versions and aliases, shares) its every
answer equals the in-process evaluator's over all the tuples the store implies (which the
differential test proves equal to the real OpenFGA engine)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import sqlalchemy as sa

from qmachina.authz.authorizer import InProcessAuthorizer, default_model
from qmachina.authz.relationships import store_relationships, user_object
from qmachina.authz.store_authorizer import StoreAuthorizer
from qmachina.serving.snapshot import ServingSnapshot, snapshot_from_spec
from qmachina.specs.pipeline import default_configs_root
from qmachina.store import governance, serving_registry
from qmachina.store import repository as repo
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from qmachina.store.models import MEMBER_ROLES, ServingAlias, ServingVersion

SUBJECTS = ("ann", "bob", "cy", "dee", "ed", "google-oauth2:42", "a b")
PERMISSIONS = ("can_read", "can_mutate", "can_delete", "can_share")
WORKSPACE_RELATIONS = (*MEMBER_ROLES, *sorted(r for r in default_model().types["workspace"]))
RESOURCE_TYPES = ("experiment_job", "serving_version", "serving_alias")


@pytest.fixture(scope="module")
def snapshot(sample_dir: Path) -> ServingSnapshot:
    return snapshot_from_spec(
        "serving/derivative_baseline.yaml",
        configs_root=default_configs_root(),
        data_root=sample_dir,
    )


async def _random_store(
    url: str, seed: int, snapshot: ServingSnapshot
) -> tuple[StoreAuthorizer, InProcessAuthorizer, list[str], list[str]]:
    """Random workspaces and members, jobs, serving versions (the same content in several
    workspaces: one resource each) and aliases, and shares of them."""
    rng = random.Random(seed)
    await bootstrap_store(url)
    sessions = session_factory(create_store_engine(url))
    workspace_ids: list[str] = []
    resources: list[tuple[str, str, str]] = []  # (type, id, owning workspace)
    async with sessions.begin() as session:
        for index in range(4):
            owner = rng.choice(SUBJECTS)
            workspace = await governance.create_owned_workspace(session, f"w{index}", "w", owner)
            workspace_ids.append(workspace.id)
            for subject in rng.sample(SUBJECTS, rng.randint(0, 4)):
                if subject != owner:
                    role = rng.choice(MEMBER_ROLES)
                    await governance.set_member_role(session, workspace.id, subject, role)
            for _ in range(rng.randint(0, 3)):
                created = await repo.create_job(session, workspace.id, "job", "0" * 64)
                resources.append(("experiment_job", created.id, workspace.id))
            if index == 0 or rng.random() < 0.75:
                registered = await serving_registry.register_version(
                    session, workspace.id, snapshot, actor=owner
                )
                resources.append(("serving_version", registered.version.id, workspace.id))
                for name in rng.sample(("prod", "canary"), rng.randint(1, 2)):
                    moved = await serving_registry.repoint_alias(
                        session, workspace.id, name, snapshot.version_id, owner, "test"
                    )
                    resources.append(("serving_alias", moved.alias.id, workspace.id))
        for resource_type, resource_id, owning in resources:
            for _ in range(rng.randint(0, 2)):
                other = rng.choice(workspace_ids)
                if other != owning:
                    await governance.share_resource(
                        session, owning, resource_type, resource_id, other
                    )
    async with sessions() as session:
        everything = InProcessAuthorizer(await store_relationships(session))
    objects = [f"{resource_type}:{resource_id}" for resource_type, resource_id, _ in resources]
    return StoreAuthorizer(sessions), everything, workspace_ids, objects


@pytest.mark.parametrize("seed", range(5))
def test_store_answers_equal_the_evaluator_over_every_tuple(
    tmp_path: Path, seed: int, snapshot: ServingSnapshot
) -> None:
    async def compare() -> int:
        store, everything, workspaces, resources = await _random_store(
            default_sqlite_url(tmp_path), seed, snapshot
        )
        assert {object_.partition(":")[0] for object_ in resources} == set(RESOURCE_TYPES)
        asked = 0
        for subject in (*SUBJECTS, "stranger"):
            user = user_object(subject)
            for workspace_id in workspaces:
                for relation in WORKSPACE_RELATIONS:
                    object_ = f"workspace:{workspace_id}"
                    assert await store.check(user, relation, object_) == await everything.check(
                        user, relation, object_
                    ), (subject, relation, object_)
                    asked += 1
            for object_ in resources:
                for relation in PERMISSIONS:
                    assert await store.check(user, relation, object_) == await everything.check(
                        user, relation, object_
                    ), (subject, relation, object_)
                    asked += 1
            for relation in WORKSPACE_RELATIONS:
                assert await store.list_objects(user, relation, "workspace") == (
                    await everything.list_objects(user, relation, "workspace")
                )
            for resource_type in RESOURCE_TYPES:
                for relation in PERMISSIONS:
                    assert await store.list_objects(user, relation, resource_type) == (
                        await everything.list_objects(user, relation, resource_type)
                    ), (subject, relation, resource_type)
        return asked

    assert asyncio.run(compare()) > 100


def test_a_serving_version_belongs_to_the_workspace_that_registered_it(
    tmp_path: Path, snapshot: ServingSnapshot
) -> None:
    """The same content registered in two workspaces is two resources: the editors of one
    cannot act on the other's, and their aliases are theirs alone."""

    async def scenario() -> None:
        url = default_sqlite_url(tmp_path)
        await bootstrap_store(url)
        sessions = session_factory(create_store_engine(url))
        rows: dict[str, tuple[str, str]] = {}
        async with sessions.begin() as session:
            for slug, editor in (("acme", "eddie"), ("globex", "gina")):
                workspace = await governance.create_owned_workspace(session, slug, slug, "o")
                await governance.set_member_role(session, workspace.id, editor, "editor")
                version = await serving_registry.register_version(
                    session, workspace.id, snapshot, actor=editor
                )
                alias = await serving_registry.repoint_alias(
                    session, workspace.id, "prod", snapshot.version_id, editor, "go"
                )
                rows[editor] = (version.version.id, alias.alias.id)
        store = StoreAuthorizer(sessions)
        for editor, (version_row, alias_row) in rows.items():
            other = next(subject for subject in rows if subject != editor)
            for object_ in (f"serving_version:{version_row}", f"serving_alias:{alias_row}"):
                for relation in ("can_read", "can_mutate"):
                    assert await store.check(user_object(editor), relation, object_)
                    assert not await store.check(user_object(other), relation, object_)
            assert await store.list_objects(user_object(editor), "can_mutate", "serving_alias") == [
                f"serving_alias:{alias_row}"
            ]
        async with sessions() as session:
            implied = await store_relationships(session)
            versions = await session.scalars(sa.select(ServingVersion.workspace_id))
            aliases = await session.scalars(sa.select(ServingAlias.workspace_id))
        owned = [t for t in implied if t.relation == "workspace"]
        assert len([t for t in owned if t.object.startswith("serving_version:")]) == len(
            list(versions)
        )
        assert len([t for t in owned if t.object.startswith("serving_alias:")]) == len(
            list(aliases)
        )

    asyncio.run(scenario())
