"""Who may do what: one ``Authorizer`` interface, two implementations of the same model.

- :class:`OpenFgaAuthorizer` asks an OpenFGA server (``OPENFGA_API_URL``) through openfga-sdk.
- :class:`InProcessAuthorizer` evaluates ``model.fga`` in process over tuples it holds, for the
  embedded default with no server.

Both validate tuples against the same model before writing, treat writing a present tuple or
deleting an absent one as a no-op, and deny by default.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from openfga_sdk import ConsistencyPreference, CreateStoreRequest, WriteAuthorizationModelRequest
from openfga_sdk.client import ClientConfiguration, OpenFgaClient
from openfga_sdk.client.models import (
    ClientCheckRequest,
    ClientListObjectsRequest,
    ClientTuple,
    ClientWriteRequest,
    ClientWriteRequestOnDuplicateWrites,
    ClientWriteRequestOnMissingDeletes,
    ConflictOptions,
)

from qmachina.authz.evaluator import (
    MODEL_JSON_PATH,
    AuthorizationModel,
    AuthzError,
    Evaluator,
    RelationTuple,
    TupleSet,
)

# OpenFGA's default limit of tuples per Write request.
MAX_TUPLES_PER_WRITE = 100


class Authorizer(Protocol):
    """Checks and relationship writes against the authorization model."""

    async def check(self, user: str, relation: str, object_: str) -> bool:
        """Whether ``user`` has ``relation`` to ``object_`` (``type:id`` each)."""
        ...

    async def list_objects(self, user: str, relation: str, type_name: str) -> list[str]:
        """Every object of ``type_name`` that ``user`` has ``relation`` to, sorted."""
        ...

    async def write_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        """Write relationship tuples; a tuple already present is left as it is."""
        ...

    async def delete_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        """Delete relationship tuples; a tuple not present is ignored."""
        ...


@lru_cache(maxsize=1)
def default_model() -> AuthorizationModel:
    """The shipped model (``qmachina/authz/model.json``), loaded once."""
    return AuthorizationModel.load(MODEL_JSON_PATH)


class InProcessAuthorizer:
    """The evaluator of the shipped model over an in-memory tuple set.

    Every operation is short and CPU-bound, so one lock makes it safe from threads and tasks
    alike; no operation awaits while holding it.
    """

    def __init__(
        self, tuples: Iterable[RelationTuple] = (), model: AuthorizationModel | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._tuples = TupleSet(model or default_model(), tuples)
        self._evaluator = Evaluator(self._tuples)

    async def check(self, user: str, relation: str, object_: str) -> bool:
        with self._lock:
            return self._evaluator.check(user, relation, object_)

    async def list_objects(self, user: str, relation: str, type_name: str) -> list[str]:
        with self._lock:
            return self._evaluator.list_objects(user, relation, type_name)

    async def write_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        with self._lock:
            self._tuples.add(tuples)

    async def delete_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        with self._lock:
            self._tuples.remove(tuples)

    def snapshot(self) -> list[RelationTuple]:
        """The tuples held, sorted (for tests and for seeding a server)."""
        with self._lock:
            return sorted(self._tuples)


class OpenFgaConfigError(AuthzError):
    """The OpenFGA settings are incomplete."""


class OpenFgaAuthorizer:
    """The same interface answered by an OpenFGA server through openfga-sdk.

    Deliberately thin: it translates calls and nothing else, so the model's semantics live in
    the server. No OpenFGA server can run in this repository's CI, so this class is not exercised
    against one here; what CI proves is that the in-process evaluator agrees with the real engine
    embedded in the ``fga`` CLI. Reads use ``HIGHER_CONSISTENCY`` by default so a check right
    after a write (possibly from another process) sees it; pass ``MINIMIZE_LATENCY`` where a
    stale answer is acceptable. The client is created on first use, inside the running loop.
    """

    def __init__(
        self,
        api_url: str,
        store_id: str,
        model_id: str,
        *,
        consistency: str = ConsistencyPreference.HIGHER_CONSISTENCY,
        model: AuthorizationModel | None = None,
    ) -> None:
        if not store_id or not model_id:
            raise OpenFgaConfigError(
                f"OpenFGA at {api_url}: a store id and a model id are needed "
                "(bootstrap the store first: bootstrap_openfga)"
            )
        self._configuration = ClientConfiguration(
            api_url=api_url, store_id=store_id, authorization_model_id=model_id
        )
        self._consistency = consistency
        self._model = model or default_model()
        self._client: OpenFgaClient | None = None

    def _fga(self) -> OpenFgaClient:
        if self._client is None:
            self._client = OpenFgaClient(self._configuration)
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened."""
        if self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]  # untyped in the SDK
            self._client = None

    async def check(self, user: str, relation: str, object_: str) -> bool:
        response = await self._fga().check(
            ClientCheckRequest(user=user, relation=relation, object=object_),
            options={"consistency": self._consistency},
        )
        return bool(response.allowed)

    async def list_objects(self, user: str, relation: str, type_name: str) -> list[str]:
        response = await self._fga().list_objects(
            ClientListObjectsRequest(user=user, relation=relation, type=type_name),
            options={"consistency": self._consistency},
        )
        return sorted(response.objects)

    async def write_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        for relation_tuple in tuples:
            self._model.validate_tuple(relation_tuple)
        conflict = ConflictOptions(on_duplicate_writes=ClientWriteRequestOnDuplicateWrites.IGNORE)
        for batch in _batches(tuples):
            await self._fga().write(
                ClientWriteRequest(writes=batch, deletes=None), options=_write_options(conflict)
            )

    async def delete_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        conflict = ConflictOptions(on_missing_deletes=ClientWriteRequestOnMissingDeletes.IGNORE)
        for batch in _batches(tuples):
            await self._fga().write(
                ClientWriteRequest(writes=None, deletes=batch), options=_write_options(conflict)
            )


def _write_options(conflict: ConflictOptions) -> dict[str, Any]:
    return {"conflict": conflict}


def _batches(tuples: Sequence[RelationTuple]) -> list[list[ClientTuple]]:
    """Each batch is one transactional Write request within the server's size limit."""
    client_tuples = [ClientTuple(user=t.user, relation=t.relation, object=t.object) for t in tuples]
    return [
        client_tuples[start : start + MAX_TUPLES_PER_WRITE]
        for start in range(0, len(client_tuples), MAX_TUPLES_PER_WRITE)
    ]


@dataclass(frozen=True, slots=True)
class OpenFgaIds:
    """Where the model lives on a server: both are ULIDs."""

    store_id: str
    model_id: str


async def bootstrap_openfga(
    api_url: str, store_name: str = "qmachina", model_path: Path = MODEL_JSON_PATH
) -> OpenFgaIds:
    """Create a store on the server and write the model into it; return both IDs to record.

    Writing a model always creates a new model id (models are immutable in OpenFGA), so call
    this once per deployment and after each change to ``model.fga``.
    """
    AuthorizationModel.load(model_path)  # refuse a model the in-process evaluator cannot mirror
    model_json = json.loads(model_path.read_text())
    async with OpenFgaClient(ClientConfiguration(api_url=api_url)) as client:
        # The SDK's generated request models are untyped.
        request = CreateStoreRequest(name=store_name)  # type: ignore[no-untyped-call]
        store = await client.create_store(request)
        client.set_store_id(store.id)
        written = await client.write_authorization_model(
            WriteAuthorizationModelRequest(  # type: ignore[no-untyped-call]
                schema_version=model_json["schema_version"],
                type_definitions=model_json["type_definitions"],
                conditions=model_json.get("conditions"),
            )
        )
        return OpenFgaIds(store_id=str(store.id), model_id=str(written.authorization_model_id))


def make_authorizer(
    api_url: str | None, store_id: str | None = None, model_id: str | None = None
) -> Authorizer:
    """The OpenFGA-backed authorizer when ``api_url`` is set, else the in-process one."""
    if api_url:
        return OpenFgaAuthorizer(api_url, store_id or "", model_id or "")
    return InProcessAuthorizer()
