"""The in-process evaluator answers exactly as the real OpenFGA engine does.

Random worlds (objects of every type, tuples drawn from every relation's type restrictions) are
generated from the model itself. The evaluator answers every check and every list_objects query
in each world; those answers are written as the assertions of a generated ``.fga.yaml`` file, one
test per world with the world's tuples, and ``fga model test`` (the engine embedded in the CLI)
must confirm every one. A run with deliberately flipped answers proves a disagreement is caught.

``QMACHINA_AUTHZ_WORLDS`` (default 80) and ``QMACHINA_AUTHZ_SEED`` explore further.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from qmachina.authz.evaluator import (
    MODEL_FGA_PATH,
    AuthorizationModel,
    Evaluator,
    InvalidTupleError,
    RelationTuple,
    TupleSet,
)
from tests.authz_fga import run_model_test, transform_to_json

WORLDS = int(os.environ.get("QMACHINA_AUTHZ_WORLDS", "80"))
SEED = int(os.environ.get("QMACHINA_AUTHZ_SEED", "6"))
WORLDS_PER_FILE = 20

# A second model that uses what the shipped one does in harder shapes: recursive tuple-to-userset
# (tuple cycles are allowed and must terminate), a tupleset whose types only partly define the
# computed relation, and computed usersets inside unions.
RECURSIVE_MODEL_DSL = """\
model
  schema 1.1
type user
type group
  relations
    define parent: [group]
    define member: [user] or member from parent
type folder
  relations
    define parent: [folder, group]
    define owner: [user]
    define viewer: [user] or owner or member from parent or viewer from parent
"""


@dataclass
class World:
    """Objects of every type and tuples among them, with the evaluator's answers."""

    name: str
    objects: dict[str, list[str]]
    tuples: list[RelationTuple]
    checks: dict[tuple[str, str], dict[str, bool]] = field(default_factory=dict)
    list_objects: dict[tuple[str, str], dict[str, list[str]]] = field(default_factory=dict)

    def assertion_count(self) -> tuple[int, int]:
        return (
            sum(len(a) for a in self.checks.values()),
            sum(len(a) for a in self.list_objects.values()),
        )


def principal_types(model: AuthorizationModel) -> list[str]:
    """Types with no relations (``user``): the subjects every relation is checked for."""
    return sorted(name for name, relations in model.types.items() if not relations)


def random_world(model: AuthorizationModel, rng: random.Random, name: str) -> World:
    """Random objects of every type and random tuples allowed by the type restrictions."""
    objects: dict[str, list[str]] = {}
    for type_name, relations in sorted(model.types.items()):
        # Every relation is checked for every principal and object, so the engine's time grows
        # with their product: many small worlds find more than a few large ones.
        low = 1 if not relations or type_name == "workspace" else 0
        count = rng.randint(low, 3 if low else 2)
        objects[type_name] = [f"{type_name}:{name}_{i}" for i in range(count)]
    density = rng.uniform(0.1, 0.6)
    tuples: list[RelationTuple] = []
    for type_name, relations in sorted(model.types.items()):
        for relation_name, definition in sorted(relations.items()):
            for object_ in objects[type_name]:
                for user_type in sorted(definition.direct_types):
                    tuples.extend(
                        RelationTuple(user, relation_name, object_)
                        for user in objects[user_type]
                        if rng.random() < density
                    )
    # Deny by default: a subject of each principal type and an object of a random type that no
    # tuple names.
    for type_name in principal_types(model):
        objects[type_name].append(f"{type_name}:{name}_stranger")
    ghost_type = rng.choice(sorted(t for t, r in model.types.items() if r))
    objects[ghost_type].append(f"{ghost_type}:{name}_ghost")
    return World(name, objects, tuples)


def answer(model: AuthorizationModel, world: World) -> None:
    """Fill in the evaluator's answer to every query of the world.

    Principals are checked for every relation of every object; other subjects (a workspace as
    the user of ``dataset#workspace``) for the relations whose type restrictions name their
    type. list_objects is asked likewise for every type.
    """
    evaluator = Evaluator(TupleSet(model, world.tuples))
    principals = set(principal_types(model))
    for subject_type, subjects in sorted(world.objects.items()):
        for subject in subjects:
            for type_name, relations in sorted(model.types.items()):
                asked = sorted(
                    name
                    for name, definition in relations.items()
                    if subject_type in principals or subject_type in definition.direct_types
                )
                if not asked:
                    continue
                world.list_objects[(subject, type_name)] = {
                    relation: evaluator.list_objects(subject, relation, type_name)
                    for relation in asked
                }
                for object_ in world.objects[type_name]:
                    world.checks[(subject, object_)] = {
                        relation: evaluator.check(subject, relation, object_) for relation in asked
                    }


def fga_tests_document(model_dsl: str, worlds: list[World]) -> dict[str, Any]:
    """A ``.fga.yaml`` document: the model inline and one test per world."""
    return {
        "name": "evaluator answers",
        "model": model_dsl,
        "tests": [
            {
                "name": world.name,
                "tuples": [
                    {"user": t.user, "relation": t.relation, "object": t.object}
                    for t in world.tuples
                ],
                "check": [
                    {"user": user, "object": object_, "assertions": assertions}
                    for (user, object_), assertions in world.checks.items()
                ],
                "list_objects": [
                    {"user": user, "type": type_name, "assertions": assertions}
                    for (user, type_name), assertions in world.list_objects.items()
                ],
            }
            for world in worlds
        ],
    }


def write_worlds(tmp_path: Path, model_dsl: str, batches: list[list[World]]) -> list[Path]:
    """Write each batch of worlds as one tests file."""
    paths = []
    for index, batch in enumerate(batches):
        path = tmp_path / f"worlds_{index:03d}.fga.yaml"
        path.write_text(yaml.safe_dump(fga_tests_document(model_dsl, batch), sort_keys=False))
        paths.append(path)
    return paths


def generated_worlds(model: AuthorizationModel, count: int, seed: int) -> list[World]:
    rng = random.Random(seed)
    worlds = [random_world(model, rng, f"w{index}") for index in range(count)]
    for world in worlds:
        answer(model, world)
    return worlds


def batched(worlds: list[World], size: int) -> list[list[World]]:
    return [worlds[start : start + size] for start in range(0, len(worlds), size)]


def assert_engine_agrees(
    tmp_path: Path, model_dsl: str, worlds: list[World], per_file: int
) -> None:
    """The engine confirms every answer of the worlds, none skipped.

    The runs print only their summaries; a failing file is run again verbosely to name the
    disagreements.
    """
    paths = write_worlds(tmp_path, model_dsl, batched(worlds, per_file))
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(partial(run_model_test, verbose=False), paths))
    for path, run in zip(paths, runs, strict=True):
        if run.returncode != 0:
            verbose = run_model_test(path)
            pytest.fail(f"the engine disagrees ({path.name}):\n{verbose.describe_failures()}")
    summaries = [run.summary() for run in runs]
    checks = sum(world.assertion_count()[0] for world in worlds)
    lists = sum(world.assertion_count()[1] for world in worlds)
    assert sum(s["Checks"][1] for s in summaries) == checks
    assert sum(s["ListObjects"][1] for s in summaries) == lists
    assert all(s[kind][0] == s[kind][1] for s in summaries for kind in ("Checks", "ListObjects"))


@pytest.fixture(scope="module")
def shipped_model() -> AuthorizationModel:
    return AuthorizationModel.load()


def test_evaluator_equals_the_engine_on_random_worlds(
    tmp_path: Path, shipped_model: AuthorizationModel
) -> None:
    worlds = generated_worlds(shipped_model, WORLDS, SEED)
    assert_engine_agrees(tmp_path, MODEL_FGA_PATH.read_text(), worlds, WORLDS_PER_FILE)

    # The worlds exercise what matters: every permission both granted and denied, sharing, and
    # the answers are not all the same.
    granted: dict[tuple[str, str], set[bool]] = {}
    for world in worlds:
        for (_, object_), assertions in world.checks.items():
            for relation, allowed in assertions.items():
                granted.setdefault((object_.split(":")[0], relation), set()).add(allowed)
    undecided = [key for key, answers in granted.items() if answers != {True, False}]
    assert undecided == [], f"never both granted and denied: {undecided}"
    assert reads_through_sharing_only(shipped_model, worlds) > WORLDS // 4


def reads_through_sharing_only(model: AuthorizationModel, worlds: list[World]) -> int:
    """How many (user, resource) pairs of the worlds are readable only because of a share."""
    count = 0
    for world in worlds:
        evaluator = Evaluator(TupleSet(model, world.tuples))
        owners: dict[str, list[str]] = {}
        for t in world.tuples:
            if t.relation == "workspace":
                owners.setdefault(t.object, []).append(t.user)
        for (user, object_), assertions in world.checks.items():
            if "shared_with" not in model.types[object_.split(":")[0]]:
                continue
            if assertions.get("can_read") and not any(
                evaluator.check(user, "viewer", workspace) for workspace in owners.get(object_, [])
            ):
                assert not assertions["can_mutate"], (user, object_)
                count += 1
    return count


def test_evaluator_equals_the_engine_on_a_recursive_model(tmp_path: Path) -> None:
    (tmp_path / "recursive.fga").write_text(RECURSIVE_MODEL_DSL)
    model = AuthorizationModel.from_json(transform_to_json(tmp_path / "recursive.fga"))
    worlds = generated_worlds(model, 60, SEED + 1)
    cyclic = sum(
        1
        for world in worlds
        if any(
            RelationTuple(t.object, t.relation, t.user) in world.tuples
            for t in world.tuples
            if t.relation == "parent"
        )
    )
    assert cyclic > 5, "too few worlds with a parent cycle to exercise the cycle guard"
    assert_engine_agrees(tmp_path, RECURSIVE_MODEL_DSL, worlds, 30)


def _flip_one_of_each(
    worlds: list[World],
) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """Make one granted check of the worlds denied, and drop one object from one list."""
    user, object_, relation = next(
        (user, object_, relation)
        for world in worlds
        for (user, object_), assertions in world.checks.items()
        for relation, allowed in assertions.items()
        if allowed
    )
    world = next(w for w in worlds if (user, object_) in w.checks)
    world.checks[(user, object_)] = {**world.checks[(user, object_)], relation: False}
    lo_world, lo_user, type_name, lo_relation = next(
        (world, lo_user, type_name, lo_relation)
        for world in reversed(worlds)
        for (lo_user, type_name), lists in world.list_objects.items()
        for lo_relation, objects in lists.items()
        if objects
    )
    lists = lo_world.list_objects[(lo_user, type_name)]
    lo_world.list_objects[(lo_user, type_name)] = {**lists, lo_relation: lists[lo_relation][1:]}
    return (user, relation, object_), (lo_user, lo_relation, type_name)


def test_a_flipped_answer_is_detected(tmp_path: Path, shipped_model: AuthorizationModel) -> None:
    worlds = generated_worlds(shipped_model, 3, SEED)
    flipped_check, flipped_list = _flip_one_of_each(worlds)

    [path] = write_worlds(tmp_path, MODEL_FGA_PATH.read_text(), [worlds])
    run = run_model_test(path)

    assert run.returncode == 1
    failed = sorted(
        (r["request"]["user"], r["request"]["relation"], r["request"].get("object", ""))
        for r in run.failures()
    )
    assert failed == sorted([flipped_check, (flipped_list[0], flipped_list[1], "")]), (
        run.describe_failures()
    )
    failing_list = next(r for r in run.failures() if "type" in r["request"])
    assert failing_list["request"]["type"] == flipped_list[2]


def _tuple_shapes(model: AuthorizationModel) -> Iterator[RelationTuple]:
    """For every written relation, a tuple with a principal, a workspace and the object's own
    type as the user (each relation allows one of them); for every computed relation, which
    allows none, a tuple with a principal."""
    for object_type, relations in sorted(model.types.items()):
        for relation, definition in sorted(relations.items()):
            user_types = {*principal_types(model)}
            if definition.direct_types:
                user_types |= {"workspace", object_type}
            for user_type in sorted(user_types):
                yield RelationTuple(f"{user_type}:u", relation, f"{object_type}:o")


def _is_valid(model: AuthorizationModel, relation_tuple: RelationTuple) -> bool:
    try:
        model.validate_tuple(relation_tuple)
    except InvalidTupleError:
        return False
    return True


def _single_tuple_document(model_dsl: str, tuples: list[RelationTuple]) -> dict[str, Any]:
    world = World("shape", {}, tuples)
    first = tuples[0]
    world.checks[(first.user, first.object)] = {first.relation: True}
    return fga_tests_document(model_dsl, [world])


def test_tuple_validation_equals_the_engine(
    tmp_path: Path, shipped_model: AuthorizationModel
) -> None:
    model_dsl = MODEL_FGA_PATH.read_text()
    shapes = list(_tuple_shapes(shipped_model))
    valid = [t for t in shapes if _is_valid(shipped_model, t)]
    invalid = [t for t in shapes if not _is_valid(shipped_model, t)]
    assert len(valid) == 6 * 2 + 4  # workspace and shared_with of 6 types; 4 roles
    paths = []
    for index, relation_tuple in enumerate([None, *invalid]):
        tuples = valid if relation_tuple is None else [relation_tuple]
        path = tmp_path / f"shape_{index:03d}.fga.yaml"
        path.write_text(yaml.safe_dump(_single_tuple_document(model_dsl, tuples)))
        paths.append(path)
    with ThreadPoolExecutor(max_workers=2) as pool:
        accepted, *rejected = pool.map(run_model_test, paths)

    assert accepted.returncode == 0, accepted.describe_failures()
    for relation_tuple, run in zip(invalid, rejected, strict=True):
        assert run.returncode == 1, f"the engine accepted {relation_tuple}"
        assert "Invalid tuple" in run.stderr, (relation_tuple, run.stderr)
