"""Who may do what: one ``Authorizer`` interface, two implementations of the same model.

- :class:`OpenFgaAuthorizer` asks an OpenFGA server (``OPENFGA_API_URL``) through openfga-sdk.
- :class:`InProcessAuthorizer` evaluates ``model.fga`` in process over tuples it holds, for the
  embedded default with no server.

Both validate tuples and queries against the same model before anything is sent, treat writing
a present tuple or deleting an absent one as a no-op, and deny by default. A server that cannot
answer raises :class:`AuthorizerUnavailableError`, never a verdict.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from openfga_sdk import (
    ConsistencyPreference,
    CreateStoreRequest,
    ReadRequestTupleKey,
    WriteAuthorizationModelRequest,
)
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
from openfga_sdk.configuration import RetryParams
from openfga_sdk.exceptions import OpenApiException

from qmachina.authz.evaluator import (
    MODEL_JSON_PATH,
    AuthorizationModel,
    AuthzError,
    Evaluator,
    RelationTuple,
    TupleSet,
    split_object,
)

# OpenFGA's default limit of tuples per Write request, and the largest Read page it serves.
MAX_TUPLES_PER_WRITE = 100
READ_PAGE_SIZE = 100
DEFAULT_TIMEOUT_SECONDS = 10.0
"""How long one request to the server may take: a check sits on every API request's path, so
a hung server must become a 503 quickly rather than hold the request for the SDK's 5 minutes."""
ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
"""What OpenFGA store and model ids look like (the SDK refuses anything else)."""


def is_ulid(value: str) -> bool:
    """Whether ``value`` is a ULID in canonical (Crockford base32, upper-case) form."""
    return ULID.fullmatch(value) is not None


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

    async def read_tuples(self) -> list[RelationTuple]:
        """Every tuple held, sorted (what ``sync`` compares with the store)."""
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

    async def read_tuples(self) -> list[RelationTuple]:
        return self.snapshot()

    def snapshot(self) -> list[RelationTuple]:
        """The tuples held, sorted (for tests and for seeding a server)."""
        with self._lock:
            return sorted(self._tuples)


class OpenFgaConfigError(AuthzError):
    """The OpenFGA settings are incomplete or invalid."""


class AuthorizerUnavailableError(AuthzError):
    """The authorization server could not answer; nothing may be assumed allowed."""


def redacted_url(api_url: str) -> str:
    """``api_url`` without credentials, query or fragment: the server as messages name it."""
    parts = urlsplit(api_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    try:
        port = parts.port
    except ValueError:
        port = None
    where = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{where}{parts.path}".rstrip("/")


class _Server:
    """The server's URL for requests and its redacted label for messages."""

    def __init__(self, api_url: str, timeout_seconds: float) -> None:
        self.api_url = api_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self.label = redacted_url(api_url)
        parts = urlsplit(api_url)
        # The userinfo and the password alone: an SDK or network message may quote either.
        self._secrets = [s for s in (parts.netloc.rpartition("@")[0], parts.password) if s]

    @asynccontextmanager
    async def calling(self, operation: str) -> AsyncIterator[None]:
        """Turn whatever the SDK or the network raises into :class:`AuthorizerUnavailableError`
        naming the server and the operation."""
        try:
            yield
        except (OpenApiException, aiohttp.ClientError, TimeoutError, OSError) as error:
            raise AuthorizerUnavailableError(
                f"OpenFGA at {self.label}: {operation} failed: {self._describe(error)}"
            ) from error

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, TimeoutError) and not str(error):
            text = f"no answer within {self.timeout_seconds:g} s"
        else:
            text = f"{type(error).__name__}: {error}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class OpenFgaAuthorizer:
    """The same interface answered by an OpenFGA server through openfga-sdk.

    Deliberately thin: it translates calls and nothing else, so the model's semantics live in
    the server. Queries and the tuples to write are validated against the shipped model first,
    so a mistake raises the same error as in process and only the server's failures surface as
    :class:`AuthorizerUnavailableError`. Reads use ``HIGHER_CONSISTENCY`` by default so a check
    right after a write (possibly from another process) sees it; pass ``MINIMIZE_LATENCY`` where
    a stale answer is acceptable. The client is created on first use, inside the running loop.

    No OpenFGA server can run in this repository's CI: the tests drive this class through the
    real SDK against an HTTP double of the server whose decisions are the in-process
    evaluator's, which the differential test proves equal to the real engine.
    """

    def __init__(
        self,
        api_url: str,
        store_id: str,
        model_id: str,
        *,
        consistency: str = ConsistencyPreference.HIGHER_CONSISTENCY,
        model: AuthorizationModel | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_retries: int = 3,
    ) -> None:
        self._server = _Server(api_url, timeout_seconds)
        if not store_id or not model_id:
            raise OpenFgaConfigError(
                f"OpenFGA at {self._server.label}: a store id and a model id are needed "
                "(qmachina authz bootstrap creates and records them)"
            )
        for name, value in (("store id", store_id), ("model id", model_id)):
            if not is_ulid(value):
                raise OpenFgaConfigError(
                    f"OpenFGA at {self._server.label}: the {name} {value!r} is not a ULID"
                )
        self.store_id = store_id
        self.model_id = model_id
        self._configuration = _configuration(
            self._server, max_retries, store_id=store_id, model_id=model_id
        )
        self._consistency = consistency
        self._model = model or default_model()
        self._client: OpenFgaClient | None = None

    @property
    def server(self) -> str:
        """The server's URL without credentials."""
        return self._server.label

    def _fga(self) -> OpenFgaClient:
        if self._client is None:
            self._client = OpenFgaClient(self._configuration)
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP session, if one was opened."""
        if self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]  # untyped in the SDK
            self._client = None

    async def __aenter__(self) -> OpenFgaAuthorizer:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def check(self, user: str, relation: str, object_: str) -> bool:
        object_type, _ = split_object(object_)
        self._validate_query(user, relation, object_type)
        async with self._server.calling(f"check {user} {relation} {object_}"):
            response = await self._fga().check(
                ClientCheckRequest(user=user, relation=relation, object=object_),
                options={"consistency": self._consistency},
            )
        return bool(response.allowed)

    async def list_objects(self, user: str, relation: str, type_name: str) -> list[str]:
        self._validate_query(user, relation, type_name)
        async with self._server.calling(f"list_objects {user} {relation} {type_name}"):
            response = await self._fga().list_objects(
                ClientListObjectsRequest(user=user, relation=relation, type=type_name),
                options={"consistency": self._consistency},
            )
        return sorted(response.objects)

    async def write_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        """Write in requests of at most 100 tuples, each atomic; if one fails, those before it
        stay written, and writing again is safe (present tuples are ignored)."""
        for relation_tuple in tuples:
            self._model.validate_tuple(relation_tuple)
        conflict = ConflictOptions(on_duplicate_writes=ClientWriteRequestOnDuplicateWrites.IGNORE)
        for batch in _batches(tuples):
            async with self._server.calling(f"write of {len(batch)} tuples"):
                await self._fga().write(
                    ClientWriteRequest(writes=batch, deletes=None), options=_write_options(conflict)
                )

    async def delete_tuples(self, tuples: Sequence[RelationTuple]) -> None:
        conflict = ConflictOptions(on_missing_deletes=ClientWriteRequestOnMissingDeletes.IGNORE)
        for batch in _batches(tuples):
            async with self._server.calling(f"delete of {len(batch)} tuples"):
                await self._fga().write(
                    ClientWriteRequest(writes=None, deletes=batch), options=_write_options(conflict)
                )

    async def read_tuples(self) -> list[RelationTuple]:
        """Every tuple in the store, read a page at a time."""
        tuples: set[RelationTuple] = set()
        token = ""
        async with self._server.calling("read"):
            while True:
                options: dict[str, Any] = {
                    "page_size": READ_PAGE_SIZE,
                    "consistency": self._consistency,
                }
                if token:
                    options["continuation_token"] = token
                response = await self._fga().read(
                    ReadRequestTupleKey(),  # type: ignore[no-untyped-call]  # untyped in the SDK
                    options=options,
                )
                tuples.update(
                    RelationTuple(t.key.user, t.key.relation, t.key.object) for t in response.tuples
                )
                next_token = response.continuation_token or ""
                if not next_token:
                    break
                if next_token == token:
                    raise AuthorizerUnavailableError(
                        f"OpenFGA at {self.server}: read returned the same continuation token twice"
                    )
                token = next_token
        return sorted(tuples)

    def _validate_query(self, user: str, relation: str, type_name: str) -> None:
        """Raise what the in-process evaluator raises for the same query."""
        user_type, _ = split_object(user)
        self._model.require_type(user_type)
        self._model.relation(type_name, relation)


def _configuration(
    server: _Server,
    max_retries: int,
    *,
    store_id: str | None = None,
    model_id: str | None = None,
) -> ClientConfiguration:
    return ClientConfiguration(
        api_url=server.api_url,
        store_id=store_id,
        authorization_model_id=model_id,
        timeout_millisec=max(1, round(server.timeout_seconds * 1000)),
        # 429 and 5xx answers are retried with backoff; a refused connection is not.
        retry_params=RetryParams(max_retry=max_retries),  # type: ignore[no-untyped-call]
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
    api_url: str,
    store_name: str = "qmachina",
    model_path: Path = MODEL_JSON_PATH,
    *,
    store_id: str | None = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> OpenFgaIds:
    """Write the model into a store on the server and return both IDs to record.

    With ``store_id`` the model is written into that existing store (its tuples are kept);
    without, a new store named ``store_name`` is created first. Writing a model always creates
    a new model id (models are immutable in OpenFGA), so run this once per deployment and after
    each change to ``model.fga``.
    """
    AuthorizationModel.load(model_path)  # refuse a model the in-process evaluator cannot mirror
    model_json = json.loads(model_path.read_text())
    server = _Server(api_url, timeout_seconds)
    if store_id is not None and not is_ulid(store_id):
        raise OpenFgaConfigError(
            f"OpenFGA at {server.label}: the store id {store_id!r} is not a ULID"
        )
    configuration = _configuration(server, max_retries=3)
    async with OpenFgaClient(configuration) as client:
        if store_id is None:
            async with server.calling("create store"):
                # The SDK's generated request models are untyped.
                request = CreateStoreRequest(name=store_name)  # type: ignore[no-untyped-call]
                store = await client.create_store(request)
            store_id = str(store.id)
        client.set_store_id(store_id)
        async with server.calling(f"write authorization model into store {store_id}"):
            written = await client.write_authorization_model(
                WriteAuthorizationModelRequest(  # type: ignore[no-untyped-call]
                    schema_version=model_json["schema_version"],
                    type_definitions=model_json["type_definitions"],
                    conditions=model_json.get("conditions"),
                )
            )
        return OpenFgaIds(store_id=store_id, model_id=str(written.authorization_model_id))
