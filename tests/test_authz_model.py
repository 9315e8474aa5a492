"""The authorization model: its tests run by the real OpenFGA engine, its JSON form, its evaluator.

``tests/authz/*.fga.yaml`` hold the model's behaviour as assertions; ``fga model test`` (the
engine embedded in the CLI) must confirm every one, and so must the in-process evaluator.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from qmachina.authz.authorizer import (
    InProcessAuthorizer,
    OpenFgaAuthorizer,
    OpenFgaConfigError,
)
from qmachina.authz.evaluator import (
    MODEL_FGA_PATH,
    MODEL_JSON_PATH,
    AuthorizationModel,
    Evaluator,
    InvalidTupleError,
    RelationTuple,
    TupleSet,
    UnknownRelationError,
    UnknownTypeError,
    UnsupportedModelError,
)
from qmachina.authz.setup import open_authorizer
from qmachina.authz.store_authorizer import StoreAuthorizer
from qmachina.settings import load_settings
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from tests.authz_fga import evaluate_fga_yaml, run_model_test, transform_to_json

AUTHZ_TESTS = Path(__file__).parent / "authz"
MODEL_TEST_FILES = sorted(AUTHZ_TESTS.glob("*.fga.yaml"))
RESOURCE_TYPES = (
    "dataset",
    "experiment_job",
    "serving_version",
    "serving_alias",
    "live_session",
    "modeling_session",
)


def test_model_test_files_exist() -> None:
    names = {path.name for path in MODEL_TEST_FILES}
    assert {"workspace_roles.fga.yaml", "resources.fga.yaml", "sharing.fga.yaml"} <= names


@pytest.mark.parametrize("tests_file", MODEL_TEST_FILES, ids=lambda p: p.name)
def test_model_tests_pass_in_the_real_engine(tests_file: Path) -> None:
    run = run_model_test(tests_file, allow_external_files=True)
    assert run.returncode == 0, run.describe_failures()
    assert run.failures() == []
    assert any(run.check_results()), f"{tests_file.name} asserts no check"


@pytest.mark.parametrize("tests_file", MODEL_TEST_FILES, ids=lambda p: p.name)
def test_model_tests_pass_in_the_evaluator(tests_file: Path) -> None:
    answered, disagreements = evaluate_fga_yaml(tests_file, AuthorizationModel.load())
    assert answered > 0
    assert disagreements == []


def _copy_with_model(tmp_path: Path, tests_file: Path) -> dict[str, Any]:
    shutil.copy(MODEL_FGA_PATH, tmp_path / "model.fga")
    document: dict[str, Any] = yaml.safe_load(tests_file.read_text())
    document["model_file"] = "./model.fga"
    return document


def test_a_wrong_check_assertion_fails_the_run(tmp_path: Path) -> None:
    document = _copy_with_model(tmp_path, AUTHZ_TESTS / "workspace_roles.fga.yaml")
    first_check = document["tests"][0]["check"][0]
    assert first_check["user"] == "user:olivia"
    assert first_check["assertions"]["owner"] is True
    first_check["assertions"] = {**first_check["assertions"], "owner": False}
    (tmp_path / "wrong.fga.yaml").write_text(yaml.safe_dump(document))

    run = run_model_test(tmp_path / "wrong.fga.yaml")

    assert run.returncode == 1
    [failure] = run.failures()
    assert failure["request"]["user"] == "user:olivia"
    assert failure["request"]["relation"] == "owner"
    assert (failure["expected"], failure["got"]) == (False, True)


def test_a_wrong_list_objects_assertion_fails_the_run(tmp_path: Path) -> None:
    document = _copy_with_model(tmp_path, AUTHZ_TESTS / "sharing.fga.yaml")
    [test] = [t for t in document["tests"] if t.get("list_objects")]
    query = test["list_objects"][0]
    assert query["user"] == "user:wendy"
    # Claim the private dataset of acme is readable in globex.
    query["assertions"] = {
        **query["assertions"],
        "can_read": [*query["assertions"]["can_read"], "dataset:es_private"],
    }
    (tmp_path / "wrong.fga.yaml").write_text(yaml.safe_dump(document))

    run = run_model_test(tmp_path / "wrong.fga.yaml")

    assert run.returncode == 1
    [failure] = run.failures()
    assert failure["request"]["relation"] == "can_read"
    assert "dataset:es_private" in failure["expected"]
    assert "dataset:es_private" not in failure["got"]


def test_a_wrong_assertion_is_also_caught_by_the_evaluator(tmp_path: Path) -> None:
    document = _copy_with_model(tmp_path, AUTHZ_TESTS / "resources.fga.yaml")
    first_check = document["tests"][0]["check"][0]
    # YAML aliases share one mapping: replace it rather than edit it.
    first_check["assertions"] = {**first_check["assertions"], "can_share": False}
    (tmp_path / "wrong.fga.yaml").write_text(yaml.safe_dump(document))
    _, disagreements = evaluate_fga_yaml(tmp_path / "wrong.fga.yaml", AuthorizationModel.load())
    assert [(d.query, d.expected, d.evaluator) for d in disagreements] == [
        ("check(user:olivia, can_share, dataset:es_ticks)", False, True)
    ]


def test_committed_json_model_is_the_transform_of_the_dsl() -> None:
    transformed = transform_to_json(MODEL_FGA_PATH)
    if os.environ.get("QMACHINA_UPDATE_GOLDEN") == "1":
        MODEL_JSON_PATH.write_text(json.dumps(transformed, indent=2) + "\n")
    assert json.loads(MODEL_JSON_PATH.read_text()) == transformed, (
        f"{MODEL_JSON_PATH} is stale: QMACHINA_UPDATE_GOLDEN=1 rewrites it from {MODEL_FGA_PATH}"
    )


# --- the model's shape --------------------------------------------------------------------------


def test_model_defines_the_roles_and_permissions() -> None:
    model = AuthorizationModel.load()
    assert set(model.types) == {"user", "workspace", *RESOURCE_TYPES}
    assert set(model.types["workspace"]) == {
        "owner",
        "admin",
        "editor",
        "viewer",
        "can_read",
        "can_mutate",
        "can_manage_members",
        "can_manage_quotas",
        "can_read_audit",
        "can_manage_owners",
        "can_delete",
    }
    for resource in RESOURCE_TYPES:
        relations = model.types[resource]
        assert set(relations) == {
            "workspace",
            "shared_with",
            "can_read",
            "can_mutate",
            "can_delete",
            "can_share",
        }, resource
        assert relations["workspace"].direct_types == {"workspace"}
        assert relations["shared_with"].direct_types == {"workspace"}
        assert all(not relations[p].direct_types for p in relations if p.startswith("can_"))


# --- the evaluator's errors ---------------------------------------------------------------------


def _evaluator(*tuples: tuple[str, str, str]) -> Evaluator:
    model = AuthorizationModel.load()
    return Evaluator(TupleSet(model, [RelationTuple(*t) for t in tuples]))


def test_unknown_types_and_relations_are_named() -> None:
    evaluator = _evaluator(("user:a", "owner", "workspace:w"))
    with pytest.raises(UnknownTypeError, match="unknown type 'team'"):
        evaluator.check("user:a", "can_read", "team:t")
    with pytest.raises(UnknownTypeError, match="unknown type 'robot'"):
        evaluator.check("robot:r", "can_read", "workspace:w")
    with pytest.raises(UnknownRelationError, match="'workspace' has no relation 'can_fly'"):
        evaluator.check("user:a", "can_fly", "workspace:w")
    with pytest.raises(UnknownRelationError, match="can_fly"):
        evaluator.list_objects("user:a", "can_fly", "dataset")
    with pytest.raises(InvalidTupleError, match="not an object of the form 'type:id'"):
        evaluator.check("user:a#member", "can_read", "workspace:w")


def test_unknown_names_are_errors_in_the_engine_too(tmp_path: Path) -> None:
    queries = [
        ("robot:r", "can_read", "workspace:w"),
        ("user:a", "can_fly", "workspace:w"),
        ("user:a", "can_read", "team:t"),
    ]
    document = _copy_with_model(tmp_path, AUTHZ_TESTS / "workspace_roles.fga.yaml")
    document["tests"] = [
        {
            "name": "unknown names",
            "check": [
                {"user": user, "object": object_, "assertions": {relation: False}}
                for user, relation, object_ in queries
            ],
        }
    ]
    (tmp_path / "unknown.fga.yaml").write_text(yaml.safe_dump(document))

    run = run_model_test(tmp_path / "unknown.fga.yaml")

    assert run.returncode == 1
    failed = [
        (f["request"]["user"], f["request"]["relation"], f["request"]["object"])
        for f in run.failures()
    ]
    assert failed == queries
    assert all(f["got"] is None and f["error"] is not None for f in run.failures())
    evaluator = _evaluator()
    for user, relation, object_ in queries:
        with pytest.raises((UnknownTypeError, UnknownRelationError)):
            evaluator.check(user, relation, object_)


def test_tuples_outside_the_type_restrictions_are_refused() -> None:
    model = AuthorizationModel.load()
    tuples = TupleSet(model)
    with pytest.raises(InvalidTupleError, match="dataset#workspace may be written for workspace"):
        tuples.add([RelationTuple("user:a", "workspace", "dataset:d")])
    with pytest.raises(InvalidTupleError, match="computed"):
        tuples.add([RelationTuple("user:a", "can_read", "workspace:w")])
    with pytest.raises(InvalidTupleError, match="'workspace'"):
        tuples.add([RelationTuple("workspace:w2", "viewer", "workspace:w")])
    # A batch with one bad tuple writes nothing.
    with pytest.raises(InvalidTupleError):
        tuples.add(
            [RelationTuple("user:a", "owner", "workspace:w"), RelationTuple("user:a", "x", "y:z")]
        )
    assert len(tuples) == 0


def _model_json(relations: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": "1.1",
        "type_definitions": [
            {"type": "user"},
            {"type": "doc", "relations": relations, "metadata": {"relations": metadata}},
        ],
    }


def test_features_the_evaluator_does_not_evaluate_are_refused_at_load() -> None:
    direct = {"directly_related_user_types": [{"type": "user"}]}
    with pytest.raises(UnsupportedModelError, match="'intersection'"):
        AuthorizationModel.from_json(
            _model_json(
                {
                    "a": {"this": {}},
                    "b": {
                        "intersection": {
                            "child": [{"this": {}}, {"computedUserset": {"relation": "a"}}]
                        }
                    },
                },
                {"a": direct, "b": direct},
            )
        )
    with pytest.raises(UnsupportedModelError, match="'difference'"):
        AuthorizationModel.from_json(
            _model_json(
                {"a": {"this": {}}, "b": {"difference": {"base": {"this": {}}, "subtract": {}}}},
                {"a": direct, "b": direct},
            )
        )
    with pytest.raises(UnsupportedModelError, match="not a plain type"):
        AuthorizationModel.from_json(
            _model_json(
                {"a": {"this": {}}},
                {"a": {"directly_related_user_types": [{"type": "user", "wildcard": {}}]}},
            )
        )
    with pytest.raises(UnsupportedModelError, match="no relation 'missing'"):
        AuthorizationModel.from_json(
            _model_json({"a": {"computedUserset": {"relation": "missing"}}}, {"a": {}})
        )
    with pytest.raises(UnsupportedModelError, match="schema_version"):
        AuthorizationModel.from_json({"schema_version": "1.0", "type_definitions": []})


# --- the in-process authorizer ------------------------------------------------------------------


def test_in_process_authorizer_writes_checks_lists_and_deletes() -> None:
    async def scenario() -> None:
        authorizer = InProcessAuthorizer()
        assert not await authorizer.check("user:a", "can_read", "dataset:d")  # deny by default
        tuples = [
            RelationTuple("user:a", "editor", "workspace:w"),
            RelationTuple("workspace:w", "workspace", "dataset:d"),
        ]
        await authorizer.write_tuples(tuples)
        await authorizer.write_tuples(tuples)  # writing a present tuple is a no-op
        assert await authorizer.check("user:a", "can_mutate", "dataset:d")
        assert not await authorizer.check("user:a", "can_share", "dataset:d")
        assert await authorizer.list_objects("user:a", "can_delete", "dataset") == ["dataset:d"]
        await authorizer.delete_tuples(tuples[:1])
        await authorizer.delete_tuples(tuples[:1])  # deleting an absent tuple is a no-op
        assert not await authorizer.check("user:a", "can_read", "dataset:d")
        assert await authorizer.list_objects("user:a", "can_read", "dataset") == []
        assert authorizer.snapshot() == tuples[1:]

    asyncio.run(scenario())


def test_in_process_authorizer_is_safe_across_threads() -> None:
    authorizer = InProcessAuthorizer()
    n_threads, per_thread = 8, 50

    def work(index: int) -> None:
        async def run() -> None:
            for j in range(per_thread):
                user = f"user:t{index}_{j}"
                await authorizer.write_tuples([RelationTuple(user, "viewer", "workspace:w")])
                assert await authorizer.check(user, "can_read", "workspace:w")
                await authorizer.list_objects(user, "can_read", "workspace")

        asyncio.run(run())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(authorizer.snapshot()) == n_threads * per_thread


def test_the_settings_choose_the_authorizer(tmp_path: Path) -> None:
    sessions = session_factory(create_store_engine(default_sqlite_url(tmp_path)))
    embedded = asyncio.run(open_authorizer(load_settings(data_dir=tmp_path), sessions))
    assert isinstance(embedded, StoreAuthorizer)
    with pytest.raises(OpenFgaConfigError):
        asyncio.run(
            open_authorizer(
                load_settings(data_dir=tmp_path, openfga_api_url="http://127.0.0.1:8080"),
                sessions,
            )
        )
    server = load_settings(
        data_dir=tmp_path,
        openfga_api_url="http://127.0.0.1:8080",
        openfga_store_id="01HVMMBCMGZNT3SED4Z17ECXCA",
        openfga_model_id="01HVMMBD123456789ABCDEFGHJ",
    )
    assert isinstance(asyncio.run(open_authorizer(server, sessions)), OpenFgaAuthorizer)


def test_openfga_authorizer_refuses_an_invalid_tuple_before_any_request() -> None:
    authorizer = OpenFgaAuthorizer(
        "http://127.0.0.1:9", "01HVMMBCMGZNT3SED4Z17ECXCA", "01HVMMBD123456789ABCDEFGHJ"
    )
    with pytest.raises(InvalidTupleError):
        asyncio.run(authorizer.write_tuples([RelationTuple("user:a", "workspace", "dataset:d")]))
