"""``OpenFgaAuthorizer``, ``qmachina authz`` and the API on OpenFGA, through the real openfga-sdk.

No OpenFGA server can run here, so the server is ``tests/openfga_double.py``: the server's HTTP
API with its decisions delegated to the in-process evaluator, which the differential test proves
equal to the real engine. Nothing on the client side is replaced: the SDK, aiohttp, the
authorizer, the CLI and the API (served by uvicorn on a Temporal dev server) are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from api.app import create_app
from qmachina.auth import mint_token
from qmachina.authz.authorizer import (
    AuthorizerUnavailableError,
    InProcessAuthorizer,
    OpenFgaAuthorizer,
    OpenFgaConfigError,
    OpenFgaIds,
    bootstrap_openfga,
    default_model,
    is_ulid,
)
from qmachina.authz.evaluator import (
    MODEL_JSON_PATH,
    InvalidTupleError,
    RelationTuple,
    UnknownRelationError,
    UnknownTypeError,
)
from qmachina.authz.openfga_ids import (
    ids_file,
    record_openfga_ids,
    recorded_openfga_ids,
    resolve_openfga_ids,
)
from qmachina.authz.relationships import (
    member_tuple,
    owned_by,
    store_relationships,
    sync_from_store,
    user_object,
)
from qmachina.cli import app as cli
from qmachina.settings import Settings, load_settings, variable_names
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from tests.live_server import BackgroundLoop, start_dev_server
from tests.openfga_double import OpenFgaDouble
from tests.ports import free_port
from tests.test_authz_differential import principal_types, random_world

runner = CliRunner()
JOBS = "/v1/jobs/experiments"
WORLDS = 6
CHECKS_PER_WORLD = 120


@pytest.fixture(scope="module")
def double() -> Iterator[OpenFgaDouble]:
    with OpenFgaDouble() as server:
        yield server


@pytest.fixture
def ids(double: OpenFgaDouble) -> OpenFgaIds:
    """A new store with the shipped model, for one test."""
    return asyncio.run(bootstrap_openfga(double.url))


@asynccontextmanager
async def openfga(
    double: OpenFgaDouble, ids: OpenFgaIds, **options: Any
) -> AsyncIterator[OpenFgaAuthorizer]:
    async with OpenFgaAuthorizer(double.url, ids.store_id, ids.model_id, **options) as authorizer:
        yield authorizer


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No setting of the developer's shell reaches the CLI; the data directory is the test's."""
    for name in Settings.model_fields:
        for variable in variable_names(name):
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("QMACHINA_SETTINGS_FILE", raising=False)
    monkeypatch.setenv("QMACHINA_DATA_DIR", str(tmp_path))
    return monkeypatch


# --- bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_creates_a_store_and_writes_the_model(double: OpenFgaDouble) -> None:
    first = asyncio.run(bootstrap_openfga(double.url))
    assert is_ulid(first.store_id)
    assert is_ulid(first.model_id)
    assert first.store_id in double.store_ids()
    written = double.model_document(first.store_id, first.model_id)
    shipped = json.loads(MODEL_JSON_PATH.read_text())
    assert written["type_definitions"] == shipped["type_definitions"]
    assert written["schema_version"] == "1.1"

    # Into the same store again: a new model id, the store and its tuples kept.
    async def write_one() -> None:
        async with openfga(double, first) as authorizer:
            await authorizer.write_tuples([member_tuple("w", "alice", "owner")])

    asyncio.run(write_one())
    again = asyncio.run(bootstrap_openfga(double.url, store_id=first.store_id))
    assert again.store_id == first.store_id
    assert again.model_id != first.model_id
    assert double.tuples(first.store_id) == [member_tuple("w", "alice", "owner")]


def test_recorded_ids_are_found_for_their_server_only(tmp_path: Path) -> None:
    url = "http://openfga.internal:8080"
    ids = OpenFgaIds("01HVMMBCMGZNT3SED4Z17ECXCA", "01HVMMBD123456789ABCDEFGHJ")
    assert recorded_openfga_ids(tmp_path, url) is None
    with pytest.raises(OpenFgaConfigError, match="qmachina authz bootstrap"):
        resolve_openfga_ids(url, None, None, tmp_path)

    record_openfga_ids(tmp_path, "http://admin:hunter2@openfga.internal:8080/", ids)
    assert "hunter2" not in ids_file(tmp_path).read_text()
    assert recorded_openfga_ids(tmp_path, url) == ids
    assert resolve_openfga_ids(url, None, None, tmp_path) == ids
    configured = OpenFgaIds("01HVMMBCMGZNT3SED4Z17ECXCB", "01HVMMBD123456789ABCDEFGHK")
    assert resolve_openfga_ids(url, *_pair(configured), tmp_path) == configured
    with pytest.raises(OpenFgaConfigError, match="OPENFGA_MODEL_ID is not set"):
        resolve_openfga_ids(url, configured.store_id, None, tmp_path)
    with pytest.raises(OpenFgaConfigError, match="recorded for the OpenFGA server"):
        recorded_openfga_ids(tmp_path, "http://another:8080")

    ids_file(tmp_path).write_text('{"store_id": "nope", "model_id": "01HVMMBD123456789ABCDEFGHJ"}')
    with pytest.raises(OpenFgaConfigError, match="store_id is 'nope', not a ULID"):
        recorded_openfga_ids(tmp_path, url)
    with pytest.raises(OpenFgaConfigError, match="model id 'x' is not a ULID"):
        OpenFgaAuthorizer(url, configured.store_id, "x")


def _pair(ids: OpenFgaIds) -> tuple[str, str]:
    return ids.store_id, ids.model_id


# --- writes, reads and answers ------------------------------------------------------------------


def test_writes_and_deletes_are_idempotent(double: OpenFgaDouble, ids: OpenFgaIds) -> None:
    tuples = [member_tuple("w", "alice", "editor"), owned_by("w", "dataset", "d")]

    async def scenario() -> None:
        async with openfga(double, ids) as authorizer:
            assert not await authorizer.check("user:alice", "can_read", "dataset:d")
            await authorizer.write_tuples(tuples)
            await authorizer.write_tuples(tuples)  # present: a no-op, not an error
            assert await authorizer.check("user:alice", "can_mutate", "dataset:d")
            assert await authorizer.read_tuples() == sorted(tuples)
            await authorizer.delete_tuples(tuples[:1])
            await authorizer.delete_tuples(tuples[:1])  # absent: a no-op, not an error
            assert not await authorizer.check("user:alice", "can_read", "dataset:d")
            assert await authorizer.read_tuples() == tuples[1:]
            with pytest.raises(InvalidTupleError):  # refused before any request
                await authorizer.write_tuples([RelationTuple("user:a", "workspace", "dataset:d")])

    double.clear_requests()
    asyncio.run(scenario())
    writes = double.requests_for("write")
    assert [w.body.get("writes", {}).get("on_duplicate") for w in writes] == [
        "ignore",
        "ignore",
        None,
        None,
    ]
    assert [w.body.get("deletes", {}).get("on_missing") for w in writes[2:]] == ["ignore"] * 2
    sent = [*writes, *double.requests_for("check")]
    assert {r.body["authorization_model_id"] for r in sent} == {ids.model_id}
    reads = [*double.requests_for("check"), *double.requests_for("read")]
    assert {r.body["consistency"] for r in reads} == {"HIGHER_CONSISTENCY"}


def test_the_double_refuses_conflicts_like_the_server(
    double: OpenFgaDouble, ids: OpenFgaIds
) -> None:
    """Idempotence comes from the conflict options, not from a lenient double: without them a
    duplicate write fails the whole (atomic) request, as OpenFGA's does."""
    present = member_tuple("w", "alice", "viewer")
    new = member_tuple("w", "bob", "viewer")

    def key(t: RelationTuple) -> dict[str, str]:
        return {"user": t.user, "relation": t.relation, "object": t.object}

    write = f"{double.url}/stores/{ids.store_id}/write"
    assert httpx.post(write, json={"writes": {"tuple_keys": [key(present)]}}).status_code == 200
    refused = httpx.post(write, json={"writes": {"tuple_keys": [key(new), key(present)]}})
    assert refused.status_code == 400
    assert refused.json()["code"] == "write_failed_due_to_invalid_input"
    assert (
        "cannot write a tuple which already exists: user: 'user:alice'"
        in (refused.json()["message"])
    )
    missing = httpx.post(write, json={"deletes": {"tuple_keys": [key(new)]}})
    assert missing.status_code == 400
    assert "cannot delete a tuple which does not exist" in missing.json()["message"]
    assert double.tuples(ids.store_id) == [present]  # nothing of the refused requests


def test_many_tuples_are_written_in_batches_and_read_in_pages(
    double: OpenFgaDouble, ids: OpenFgaIds
) -> None:
    tuples = sorted(member_tuple("w", f"u{i:03d}", "viewer") for i in range(250))

    async def scenario() -> list[RelationTuple]:
        async with openfga(double, ids) as authorizer:
            await authorizer.write_tuples(tuples)
            return await authorizer.read_tuples()

    double.clear_requests()
    assert asyncio.run(scenario()) == tuples
    assert [len(r.body["writes"]["tuple_keys"]) for r in double.requests_for("write")] == [
        100,
        100,
        50,
    ]
    reads = double.requests_for("read")
    assert len(reads) == 3
    assert "continuation_token" not in reads[0].body
    assert all(r.body["continuation_token"] for r in reads[1:])


def test_answers_equal_the_in_process_authorizer_on_random_worlds(double: OpenFgaDouble) -> None:
    model = default_model()
    rng = random.Random(11)
    principals = set(principal_types(model))

    async def compare(world_index: int) -> int:
        world = random_world(model, rng, f"w{world_index}")
        local = InProcessAuthorizer(world.tuples)
        ids = await bootstrap_openfga(double.url)
        queries = [
            (subject, relation, object_)
            for subject_type, subjects in world.objects.items()
            if subject_type in principals
            for subject in subjects
            for type_name, relations in model.types.items()
            for object_ in world.objects[type_name]
            for relation in relations
        ]
        listings = [
            (subject, relation, type_name)
            for subject in world.objects["user"]
            for type_name, relations in model.types.items()
            if relations
            for relation in relations
        ]
        async with OpenFgaAuthorizer(double.url, ids.store_id, ids.model_id) as remote:
            await remote.write_tuples(world.tuples)
            assert await remote.read_tuples() == sorted(set(world.tuples))
            sample = rng.sample(queries, min(CHECKS_PER_WORLD, len(queries)))
            remote_checks = await asyncio.gather(*(remote.check(*q) for q in sample))
            local_checks = [await local.check(*q) for q in sample]
            assert remote_checks == local_checks, world.name
            sample_lists = rng.sample(listings, min(CHECKS_PER_WORLD // 4, len(listings)))
            remote_lists = await asyncio.gather(*(remote.list_objects(*q) for q in sample_lists))
            local_lists = [await local.list_objects(*q) for q in sample_lists]
            assert remote_lists == local_lists, world.name
        return sum(local_checks) + sum(map(len, local_lists))

    granted = [asyncio.run(compare(index)) for index in range(WORLDS)]
    assert sum(granted) > WORLDS * 5  # the worlds grant something, not only deny


def test_queries_are_validated_before_any_request(double: OpenFgaDouble, ids: OpenFgaIds) -> None:
    async def scenario() -> None:
        async with openfga(double, ids) as authorizer:
            local = InProcessAuthorizer()
            for target in (authorizer, local):
                with pytest.raises(UnknownRelationError):
                    await target.check("user:a", "can_fly", "workspace:w")
                with pytest.raises(UnknownTypeError):
                    await target.list_objects("user:a", "can_read", "spaceship")

    double.clear_requests()
    asyncio.run(scenario())
    assert double.requests == []


# --- sync ---------------------------------------------------------------------------------------


def test_sync_writes_what_the_store_implies_and_deletes_the_rest(
    double: OpenFgaDouble, ids: OpenFgaIds, tmp_path: Path
) -> None:
    url = default_sqlite_url(tmp_path)
    workspace_id = asyncio.run(bootstrap_store(url, owner="alice"))
    stale = member_tuple(workspace_id, "mallory", "owner")
    owner = member_tuple(workspace_id, "alice", "owner")

    async def scenario() -> None:
        engine = create_store_engine(url)
        try:
            async with openfga(double, ids) as authorizer:
                await authorizer.write_tuples([stale])
                async with session_factory(engine)() as session:
                    assert await sync_from_store(authorizer, session, prune=False) == (1, 0)
                    assert await authorizer.read_tuples() == sorted([stale, owner])
                    assert await sync_from_store(authorizer, session) == (0, 1)
                    assert await sync_from_store(authorizer, session) == (0, 0)
                    assert await authorizer.read_tuples() == await store_relationships(session)
                assert await authorizer.check(user_object("alice"), "can_delete", owner.object)
                assert not await authorizer.check(user_object("mallory"), "can_read", owner.object)
        finally:
            await engine.dispose()

    asyncio.run(scenario())


# --- an unavailable server ----------------------------------------------------------------------


def test_an_unreachable_server_is_unavailable_not_a_verdict(ids: OpenFgaIds) -> None:
    down = closed_port_url().replace("http://", "http://admin:hunter2@")
    tuples = [member_tuple("w", "alice", "owner")]

    async def scenario() -> list[str]:
        messages = []
        async with OpenFgaAuthorizer(down, ids.store_id, ids.model_id) as authorizer:
            for call, operation in (
                (authorizer.check("user:a", "can_read", "workspace:w"), "check"),
                (authorizer.list_objects("user:a", "can_read", "workspace"), "list_objects"),
                (authorizer.write_tuples(tuples), "write of 1 tuples"),
                (authorizer.delete_tuples(tuples), "delete of 1 tuples"),
                (authorizer.read_tuples(), "read"),
            ):
                with pytest.raises(AuthorizerUnavailableError) as raised:
                    await call
                assert f"{operation}" in str(raised.value)
                messages.append(str(raised.value))
        return messages

    for message in asyncio.run(scenario()):
        assert message.startswith(f"OpenFGA at {down.replace('admin:hunter2@', '')}: ")
        assert "hunter2" not in message
        assert "admin" not in message
        assert "Cannot connect" in message


def test_server_errors_and_timeouts_are_unavailable(double: OpenFgaDouble, ids: OpenFgaIds) -> None:
    async def failing() -> None:
        async with openfga(double, ids, max_retries=1) as authorizer:
            with pytest.raises(AuthorizerUnavailableError, match=r"check .* failed: .*HTTP 500"):
                await authorizer.check("user:a", "can_read", "workspace:w")

    double.clear_requests()
    double.fail_next(500, count=2)
    asyncio.run(failing())
    assert len(double.requests_for("check")) == 2  # retried once, then given up

    # A retried failure that recovers is an answer.
    async def recovering() -> bool:
        async with openfga(double, ids, max_retries=1) as authorizer:
            return await authorizer.check("user:a", "can_read", "workspace:w")

    double.fail_next(503)
    assert asyncio.run(recovering()) is False

    async def slow() -> None:
        async with openfga(double, ids, timeout_seconds=0.2) as authorizer:
            with pytest.raises(
                AuthorizerUnavailableError, match=r"check .* failed: no answer within 0.2 s"
            ):
                await authorizer.check("user:a", "can_read", "workspace:w")

    double.stall_seconds = 5.0
    try:
        started = time.monotonic()
        asyncio.run(slow())
        assert time.monotonic() - started < double.stall_seconds  # gave up before any answer
    finally:
        double.stall_seconds = 0.0

    async def unknown_store() -> None:
        gone = OpenFgaIds("01HVMMBCMGZNT3SED4Z17ECXCA", ids.model_id)
        async with openfga(double, gone) as authorizer:
            with pytest.raises(AuthorizerUnavailableError, match="Store ID not found"):
                await authorizer.read_tuples()

    asyncio.run(unknown_store())


# --- qmachina authz -----------------------------------------------------------------------------


def test_authz_commands(
    double: OpenFgaDouble, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    workspace_id = asyncio.run(bootstrap_store(default_sqlite_url(tmp_path), owner="alice"))
    alice, bob = user_object("alice"), user_object("bob")
    workspace = f"workspace:{workspace_id}"

    # With no server the in-process evaluator answers from the store.
    assert _invoke("authz", "check", alice, "can_read", workspace) == (0, "allowed\n")
    assert _invoke("authz", "check", bob, "can_read", workspace) == (1, "denied\n")
    code, _ = _invoke("authz", "sync")
    assert code == 2

    created = runner.invoke(cli, ["authz", "bootstrap", "--api-url", double.url])
    assert created.exit_code == 0, created.output
    recorded = recorded_openfga_ids(tmp_path, double.url)
    assert recorded is not None
    assert f"created store {recorded.store_id}" in created.stdout
    assert f"OPENFGA_STORE_ID={recorded.store_id}\nOPENFGA_MODEL_ID={recorded.model_id}\n" in (
        created.stdout
    )

    clean_env.setenv("OPENFGA_API_URL", double.url)
    # The server's store is empty until synced: deny by default.
    assert _invoke("authz", "check", alice, "can_read", workspace) == (1, "denied\n")
    synced = runner.invoke(cli, ["authz", "sync"])
    assert synced.exit_code == 0, synced.output
    assert f"wrote 1 and deleted 0 tuples on {double.url} (store {recorded.store_id})" in (
        synced.stdout
    )
    assert _invoke("authz", "check", alice, "can_read", workspace) == (0, "allowed\n")
    assert _invoke("authz", "check", bob, "can_read", workspace) == (1, "denied\n")

    # Again: the same store, a new model; --new-store starts afresh.
    again = runner.invoke(cli, ["authz", "bootstrap"])
    assert again.exit_code == 0, again.output
    assert f"wrote the model into store {recorded.store_id}" in again.stdout
    fresh = runner.invoke(cli, ["authz", "bootstrap", "--new-store"])
    assert fresh.exit_code == 0, fresh.output
    new_ids = recorded_openfga_ids(tmp_path, double.url)
    assert new_ids is not None
    assert new_ids.store_id != recorded.store_id
    assert double.tuples(new_ids.store_id) == []


def test_authz_command_errors(
    double: OpenFgaDouble, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    asyncio.run(bootstrap_store(default_sqlite_url(tmp_path), owner="alice"))
    failed = runner.invoke(cli, ["authz", "bootstrap"])
    assert failed.exit_code == 2
    assert failed.stderr == "error: no OpenFGA server: pass --api-url or set OPENFGA_API_URL\n"

    clean_env.setenv("OPENFGA_API_URL", double.url)
    missing = runner.invoke(cli, ["authz", "sync"])
    assert missing.exit_code == 2
    assert "no store is configured: run `qmachina authz bootstrap`" in missing.stderr

    down = closed_port_url()
    record_openfga_ids(
        tmp_path, down, OpenFgaIds("01HVMMBCMGZNT3SED4Z17ECXCA", "01HVMMBD123456789ABCDEFGHJ")
    )
    clean_env.setenv("OPENFGA_API_URL", down)
    for command in (["sync"], ["check", "user:alice", "can_read", "workspace:x"], ["bootstrap"]):
        result = runner.invoke(cli, ["authz", *command])
        assert result.exit_code == 2, command
        assert result.stderr.startswith(f"error: OpenFGA at {down}: "), result.stderr
        assert "Cannot connect" in result.stderr
    assert "pass --new-store" in result.stderr  # bootstrap tried the recorded store

    bad = runner.invoke(cli, ["authz", "check", "alice", "can_read", "workspace:x"])
    assert bad.exit_code == 2
    assert "'alice' is not an object of the form 'type:id'" in bad.stderr


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli, list(args))
    return result.exit_code, result.stdout


# --- the API on OpenFGA -------------------------------------------------------------------------


class OpenFgaStack(BackgroundLoop):
    """A Temporal dev server and the API served by uvicorn, deciding through the double."""

    def __init__(self, data_dir: Path, double: OpenFgaDouble) -> None:
        self.data_dir = data_dir
        self.double = double
        super().__init__("openfga-api")

    async def start(self) -> None:
        store_url = default_sqlite_url(self.data_dir)
        await bootstrap_store(store_url, owner="alice")
        self.ids = await bootstrap_openfga(self.double.url)
        record_openfga_ids(self.data_dir, self.double.url, self.ids)
        env = await self.resources.enter_async_context(await start_dev_server())
        self.settings = load_settings(
            data_dir=self.data_dir,
            database_url=store_url,
            temporal_address=env.client.service_client.config.target_host,
            openfga_api_url=self.double.url,
        )
        engine = create_store_engine(store_url)
        try:
            async with (
                OpenFgaAuthorizer(self.double.url, *_pair(self.ids)) as authorizer,
                session_factory(engine)() as session,
            ):
                await sync_from_store(authorizer, session)
        finally:
            await engine.dispose()
        self.base_url = await self.serve(create_app(self.settings))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, double: OpenFgaDouble) -> Iterator[OpenFgaStack]:
    stack = OpenFgaStack(tmp_path_factory.mktemp("openfga-api"), double)
    try:
        stack.run(stack.start())
        yield stack
    finally:
        stack.close()


def test_the_api_decides_through_the_openfga_server(
    api: OpenFgaStack, double: OpenFgaDouble
) -> None:
    alice = {"Authorization": f"Bearer {mint_token(api.settings, 'alice')}"}
    bob = {"Authorization": f"Bearer {mint_token(api.settings, 'bob')}"}
    double.clear_requests()
    with httpx.Client(base_url=api.base_url, timeout=30) as http:
        allowed = http.get(JOBS, params={"workspace": "default"}, headers=alice)
        assert allowed.status_code == 200, allowed.text
        assert allowed.json() == {"jobs": []}
        denied = http.get(JOBS, params={"workspace": "default"}, headers=bob)
        assert denied.status_code == 404, denied.text
        assert denied.json()["detail"] == "workspace 'default' not found"

        checks = double.requests_for("check")
        assert {c.body["tuple_key"]["user"] for c in checks} == {"user:alice", "user:bob"}
        assert all(c.path == f"/stores/{api.ids.store_id}/check" for c in checks)
        assert {c.body["authorization_model_id"] for c in checks} == {api.ids.model_id}
        assert {c.body["consistency"] for c in checks} == {"HIGHER_CONSISTENCY"}

        # A server that cannot answer is a 503 naming it, never a verdict.
        double.fail_next(500, count=4)
        unavailable = http.get(JOBS, params={"workspace": "default"}, headers=alice)
        assert unavailable.status_code == 503, unavailable.text
        detail = unavailable.json()["detail"]
        assert f"OpenFGA at {double.url}: check user:alice can_read" in detail
