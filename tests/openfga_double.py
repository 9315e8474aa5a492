"""A test double of the OpenFGA server's HTTP API, for the tests of ``OpenFgaAuthorizer``.

No OpenFGA server can run here (none is packaged for PyPI, npm or Debian, and there is no
Docker), so the tests drive the real openfga-sdk against this stand-in, served by uvicorn on a
free port in a thread of its own. It implements what qMachina's authorizer calls, with the
server's paths, status codes and JSON shapes (the OpenFGA API reference and the SDK's models):

- ``POST /stores`` (201, a new ULID store id) and ``GET /stores/{store_id}``;
- ``POST /stores/{store_id}/authorization-models`` (201, a new ULID model id) and
  ``GET /stores/{store_id}/authorization-models/{model_id}``;
- ``POST /stores/{store_id}/check`` and ``POST /stores/{store_id}/list-objects``, against the
  model named by ``authorization_model_id`` or else the store's latest;
- ``POST /stores/{store_id}/write``: at most 100 tuples, atomic, no tuple twice in one request,
  tuples validated against the model; writing a present tuple or deleting an absent one fails
  the whole request (400 ``write_failed_due_to_invalid_input``) unless the request says
  ``on_duplicate: "ignore"`` / ``on_missing: "ignore"``;
- ``POST /stores/{store_id}/read``: the tuples matching an optional filter, a page at a time
  (``page_size`` 1..100, default 50), with an opaque continuation token, empty on the last page.

Errors have the server's ``{"code": ..., "message": ...}`` body: 400 for invalid input, 404
``store_id_not_found`` for an unknown store.

Where the double decides (check, list_objects, tuple validation) it delegates to
``qmachina.authz.evaluator``, the in-process evaluator that ``tests/test_authz_differential.py``
proves equal to the real OpenFGA engine (embedded in the ``fga`` CLI) on random worlds and on
tuple validation. That proof is this double's cross-check: the double adds only HTTP framing and
bookkeeping (stores, model ids, tuple storage, conflict rules, paging), and the conflict rules
and messages follow the server's documented behaviour. A model the evaluator would not evaluate
faithfully is refused when written, so the double never answers a question it does not
understand.

Every request is recorded (:attr:`OpenFgaDouble.requests`) so tests can assert on what the SDK
sent: the consistency preference, the model id, the conflict options. :meth:`fail_next` and
:attr:`OpenFgaDouble.stall_seconds` make the server answer 5xx or answer late.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from qmachina.authz.evaluator import (
    AuthorizationModel,
    AuthzError,
    Evaluator,
    InvalidTupleError,
    RelationTuple,
    TupleSet,
    split_object,
)
from tests.live_server import BackgroundLoop

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAX_TUPLES_PER_WRITE = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
CONFLICT_MESSAGE = "tuple to be written already existed or the tuple to be deleted did not exist"


def new_ulid() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, in Crockford base32."""
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class ApiError(Exception):
    """An error answered with the server's body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _invalid(message: str, code: str = "validation_error") -> ApiError:
    return ApiError(400, code, message)


def _key_text(t: RelationTuple) -> str:
    return f"user: '{t.user}', relation: '{t.relation}', object: '{t.object}'"


@dataclass
class StoredModel:
    model_id: str
    document: dict[str, Any]
    model: AuthorizationModel


@dataclass
class Store:
    """One store: its models, newest last, and its tuples with when each was written."""

    store_id: str
    name: str
    created_at: str
    models: dict[str, StoredModel] = field(default_factory=dict)
    tuples: dict[RelationTuple, str] = field(default_factory=dict)
    version: int = 0
    evaluators: dict[str, tuple[int, Evaluator]] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "id": self.store_id,
            "name": self.name,
            "created_at": self.created_at,
            "updated_at": self.created_at,
        }

    def model(self, model_id: str | None) -> StoredModel:
        if model_id:
            found = self.models.get(model_id)
            if found is None:
                raise _invalid(
                    f"Authorization Model '{model_id}' not found", "authorization_model_not_found"
                )
            return found
        if not self.models:
            raise _invalid(
                f"No authorization models found for store '{self.store_id}'",
                "latest_authorization_model_not_found",
            )
        return list(self.models.values())[-1]

    def evaluator(self, stored: StoredModel) -> Evaluator:
        cached = self.evaluators.get(stored.model_id)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        # Tuples written under another model that this one does not allow take no part.
        valid = [t for t in self.tuples if _is_valid(stored.model, t)]
        evaluator = Evaluator(TupleSet(stored.model, valid))
        self.evaluators[stored.model_id] = (self.version, evaluator)
        return evaluator


def _is_valid(model: AuthorizationModel, relation_tuple: RelationTuple) -> bool:
    try:
        model.validate_tuple(relation_tuple)
    except InvalidTupleError:
        return False
    return True


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the double received it."""

    method: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def operation(self) -> str:
        """The last path segment for store operations (``check``, ``write``, ...), else the
        path."""
        parts = self.path.strip("/").split("/")
        return parts[2] if len(parts) >= 3 and parts[0] == "stores" else self.path


class OpenFgaDouble:
    """The double's state and its FastAPI app; :meth:`start` serves it, :meth:`close` stops it.

    State is guarded by one lock: handlers run on the double's loop, tests read from theirs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, Store] = {}
        self._failures: list[int] = []
        self.requests: list[RecordedRequest] = []
        self.stall_seconds = 0.0
        """Wait this long before answering each request (to exercise client timeouts)."""
        self.app = self._make_app()
        self._loop: BackgroundLoop | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Serve on a free port of 127.0.0.1; returns the base URL."""
        self._loop = BackgroundLoop("openfga-double")
        self.url = self._loop.run(self._loop.serve(self.app))
        return self.url

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> OpenFgaDouble:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- for tests ---------------------------------------------------------------------------

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests with ``status`` and the server's error body."""
        with self._lock:
            self._failures.extend([status] * count)

    def tuples(self, store_id: str) -> list[RelationTuple]:
        """The store's tuples, sorted."""
        with self._lock:
            return sorted(self._stores[store_id].tuples)

    def model_document(self, store_id: str, model_id: str) -> dict[str, Any]:
        with self._lock:
            return self._stores[store_id].models[model_id].document

    def store_ids(self) -> list[str]:
        with self._lock:
            return list(self._stores)

    def requests_for(self, operation: str) -> list[RecordedRequest]:
        """Recorded requests of one operation (``check``, ``write``, ``read``, ...)."""
        with self._lock:
            return [r for r in self.requests if r.operation == operation]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- the app -----------------------------------------------------------------------------

    def _make_app(self) -> FastAPI:
        app = FastAPI(title="OpenFGA double", openapi_url=None, docs_url=None, redoc_url=None)

        @app.post("/stores", status_code=201)
        async def create_store(request: Request) -> JSONResponse:
            return await self._answer(request, self._create_store, 201)

        @app.get("/stores/{store_id}")
        async def get_store(request: Request, store_id: str) -> JSONResponse:
            return await self._answer(request, lambda _: self._store(store_id).body())

        @app.post("/stores/{store_id}/authorization-models", status_code=201)
        async def write_model(request: Request, store_id: str) -> JSONResponse:
            return await self._answer(request, lambda body: self._write_model(store_id, body), 201)

        @app.get("/stores/{store_id}/authorization-models/{model_id}")
        async def read_model(request: Request, store_id: str, model_id: str) -> JSONResponse:
            return await self._answer(request, lambda _: self._read_model(store_id, model_id))

        @app.post("/stores/{store_id}/check")
        async def check(request: Request, store_id: str) -> JSONResponse:
            return await self._answer(request, lambda body: self._check(store_id, body))

        @app.post("/stores/{store_id}/list-objects")
        async def list_objects(request: Request, store_id: str) -> JSONResponse:
            return await self._answer(request, lambda body: self._list_objects(store_id, body))

        @app.post("/stores/{store_id}/write")
        async def write(request: Request, store_id: str) -> JSONResponse:
            return await self._answer(request, lambda body: self._write(store_id, body))

        @app.post("/stores/{store_id}/read")
        async def read(request: Request, store_id: str) -> JSONResponse:
            return await self._answer(request, lambda body: self._read(store_id, body))

        return app

    async def _answer(self, request: Request, handle: Any, status: int = 200) -> JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = None
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    request.method,
                    request.url.path,
                    body if isinstance(body, dict) else {},
                    dict(request.headers),
                )
            )
            failure = self._failures.pop(0) if self._failures else None
        if self.stall_seconds:
            await asyncio.sleep(self.stall_seconds)
        if failure is not None:
            return JSONResponse(
                {"code": "internal_error", "message": "Internal Server Error"}, failure
            )
        if not isinstance(body, dict):
            return JSONResponse({"code": "invalid_argument", "message": "invalid JSON body"}, 400)
        try:
            with self._lock:
                return JSONResponse(handle(body), status)
        except ApiError as error:
            return JSONResponse({"code": error.code, "message": error.message}, error.status)

    # --- operations (called with the lock held) ----------------------------------------------

    def _store(self, store_id: str) -> Store:
        store = self._stores.get(store_id)
        if store is None:
            raise ApiError(404, "store_id_not_found", "Store ID not found")
        return store

    def _create_store(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str) or not 3 <= len(name) <= 64:
            raise _invalid("invalid CreateStoreRequest.Name: value length must be between 3 and 64")
        store = Store(new_ulid(), name, _now())
        self._stores[store.store_id] = store
        return store.body()

    def _write_model(self, store_id: str, body: dict[str, Any]) -> dict[str, Any]:
        store = self._store(store_id)
        try:
            model = AuthorizationModel.from_json(body, source="the written model")
        except (AuthzError, KeyError, TypeError, AttributeError) as error:
            raise _invalid(str(error), "invalid_authorization_model") from error
        model_id = new_ulid()
        document = {"id": model_id, **body}
        store.models[model_id] = StoredModel(model_id, document, model)
        return {"authorization_model_id": model_id}

    def _read_model(self, store_id: str, model_id: str) -> dict[str, Any]:
        return {"authorization_model": self._store(store_id).model(model_id).document}

    def _query(
        self, store_id: str, body: dict[str, Any], user: Any, relation: Any, object_type: Any
    ) -> tuple[Evaluator, str, str, str]:
        """Resolve the model and check a query's names the way the server does."""
        store = self._store(store_id)
        if body.get("contextual_tuples") or body.get("context"):
            raise _invalid("the double does not evaluate contextual tuples or conditions")
        stored = store.model(body.get("authorization_model_id"))
        for name, value in (("user", user), ("relation", relation), ("type", object_type)):
            if not isinstance(value, str) or not value:
                raise _invalid(f"invalid request: {name} is required")
        try:
            user_type, _ = split_object(user)
        except InvalidTupleError as error:
            raise _invalid(f"invalid 'user' field format: {error}") from error
        for type_name in (user_type, object_type):
            if type_name not in stored.model.types:
                raise _invalid(f"type '{type_name}' not found")
        if relation not in stored.model.types[object_type]:
            raise _invalid(f"relation '{object_type}#{relation}' not found")
        return store.evaluator(stored), user, relation, object_type

    def _check(self, store_id: str, body: dict[str, Any]) -> dict[str, Any]:
        key = body.get("tuple_key") or {}
        object_ = key.get("object")
        if not isinstance(object_, str):
            raise _invalid("invalid request: object is required")
        try:
            object_type, _ = split_object(object_)
        except InvalidTupleError as error:
            raise _invalid(f"invalid 'object' field format: {error}") from error
        evaluator, user, relation, _ = self._query(
            store_id, body, key.get("user"), key.get("relation"), object_type
        )
        return {"allowed": evaluator.check(user, relation, object_), "resolution": ""}

    def _list_objects(self, store_id: str, body: dict[str, Any]) -> dict[str, Any]:
        evaluator, user, relation, type_name = self._query(
            store_id, body, body.get("user"), body.get("relation"), body.get("type")
        )
        # The server promises no order: answer in reverse so a client that relies on one fails.
        return {"objects": list(reversed(evaluator.list_objects(user, relation, type_name)))}

    def _write(self, store_id: str, body: dict[str, Any]) -> dict[str, Any]:
        store = self._store(store_id)
        stored = store.model(body.get("authorization_model_id"))
        writes, on_duplicate = _tuple_keys(body.get("writes"), "on_duplicate")
        deletes, on_missing = _tuple_keys(body.get("deletes"), "on_missing")
        if not writes and not deletes:
            raise _invalid(
                "Invalid input. Make sure you provide at least one write or delete",
                "invalid_write_input",
            )
        if len(writes) + len(deletes) > MAX_TUPLES_PER_WRITE:
            raise _invalid(
                "The number of write operations exceeds the allowed limit of "
                f"{MAX_TUPLES_PER_WRITE}",
                "exceeded_entity_limit",
            )
        seen: set[RelationTuple] = set()
        for relation_tuple in [*writes, *deletes]:
            if relation_tuple in seen:
                raise _invalid(
                    f"duplicate tuple in write: {_key_text(relation_tuple)}",
                    "cannot_allow_duplicate_tuples_in_one_request",
                )
            seen.add(relation_tuple)
        for relation_tuple in writes:
            try:
                stored.model.validate_tuple(relation_tuple)
            except InvalidTupleError as error:
                text = f"{relation_tuple.object}#{relation_tuple.relation}@{relation_tuple.user}"
                raise _invalid(f"Invalid tuple '{text}'. Reason: {error}") from error
        # Atomic: every conflict is found before anything changes.
        for relation_tuple in deletes:
            if relation_tuple not in store.tuples and on_missing != "ignore":
                raise _invalid(
                    "cannot delete a tuple which does not exist: "
                    f"{_key_text(relation_tuple)}: {CONFLICT_MESSAGE}",
                    "write_failed_due_to_invalid_input",
                )
        for relation_tuple in writes:
            if relation_tuple in store.tuples and on_duplicate != "ignore":
                raise _invalid(
                    "cannot write a tuple which already exists: "
                    f"{_key_text(relation_tuple)}: {CONFLICT_MESSAGE}",
                    "write_failed_due_to_invalid_input",
                )
        for relation_tuple in deletes:
            store.tuples.pop(relation_tuple, None)
        now = _now()
        for relation_tuple in writes:
            store.tuples.setdefault(relation_tuple, now)
        store.version += 1
        return {}

    def _read(self, store_id: str, body: dict[str, Any]) -> dict[str, Any]:
        store = self._store(store_id)
        page_size = body.get("page_size") or DEFAULT_PAGE_SIZE
        if not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise _invalid(
                f"invalid ReadRequest.PageSize: value must be inside range [1, {MAX_PAGE_SIZE}]"
            )
        matches = _filter(sorted(store.tuples, key=_order), body.get("tuple_key"))
        token = body.get("continuation_token") or ""
        if token:
            after = _decode_token(token, store_id)
            matches = [t for t in matches if _order(t) > after]
        page, more = matches[:page_size], len(matches) > page_size
        return {
            "tuples": [
                {
                    "key": {"user": t.user, "relation": t.relation, "object": t.object},
                    "timestamp": store.tuples[t],
                }
                for t in page
            ],
            "continuation_token": _encode_token(_order(page[-1]), store_id) if more else "",
        }


def _tuple_keys(section: Any, option: str) -> tuple[list[RelationTuple], str]:
    if section is None:
        return [], "error"
    if not isinstance(section, dict) or not isinstance(section.get("tuple_keys"), list):
        raise _invalid("invalid WriteRequest: tuple_keys is required")
    mode = section.get(option) or "error"
    if mode not in ("error", "ignore"):
        raise _invalid(f"invalid value for {option}: {mode!r}")
    tuples = []
    for key in section["tuple_keys"]:
        if not isinstance(key, dict) or not all(
            isinstance(key.get(part), str) and key.get(part) for part in ("user", "relation")
        ):
            raise _invalid("invalid tuple key: user, relation and object are required")
        if key.get("condition"):
            raise _invalid("the double does not store conditions")
        object_ = key.get("object")
        if not isinstance(object_, str):
            raise _invalid("invalid tuple key: user, relation and object are required")
        try:
            split_object(object_)
            split_object(key["user"])
        except InvalidTupleError as error:
            raise _invalid(f"invalid tuple key: {error}") from error
        tuples.append(RelationTuple(key["user"], key["relation"], object_))
    return tuples, mode


def _order(t: RelationTuple) -> tuple[str, str, str]:
    return (t.object, t.relation, t.user)


def _filter(tuples: list[RelationTuple], key: Any) -> list[RelationTuple]:
    """The Read filter: no key reads everything; else ``object`` is required (``type:id`` or
    ``type:``), and a type-only object requires ``user``."""
    if not key or not any(key.get(part) for part in ("user", "relation", "object")):
        return tuples
    object_ = key.get("object") or ""
    if ":" not in object_:
        raise _invalid("the 'object' field is required and must be 'type:' or 'type:id'")
    user, relation = key.get("user") or "", key.get("relation") or ""
    object_type, _, object_id = object_.partition(":")
    if not object_id and not user:
        raise _invalid("the 'user' field is required when the object is a type only")
    return [
        t
        for t in tuples
        if (t.object == object_ if object_id else t.object.startswith(f"{object_type}:"))
        and (not relation or t.relation == relation)
        and (not user or t.user == user)
    ]


def _encode_token(after: tuple[str, str, str], store_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([store_id, *after]).encode()).decode()


def _decode_token(token: str, store_id: str) -> tuple[str, str, str]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, ValueError) as error:
        raise _invalid("Invalid continuation token", "invalid_continuation_token") from error
    if not isinstance(decoded, list) or len(decoded) != 4 or decoded[0] != store_id:
        raise _invalid("Invalid continuation token", "invalid_continuation_token")
    return (str(decoded[1]), str(decoded[2]), str(decoded[3]))
