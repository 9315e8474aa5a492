"""``WS /v1/stream?serving=<alias or version>``: a serving version, bin by bin, over a WebSocket.

Query: ``serving`` (an alias, a full version id or a unique prefix of 8+ characters; required),
``workspace`` (slug, default ``default``), ``source`` (``replay``, the default: the version's
dataset; or ``live:<session id>``: that live session's bronze as it grows, see
:mod:`qmachina.serving.live_source`), ``speed`` (replay speed, default 1: real time; not for a
live source, which is real time by nature), ``start`` (ISO-8601 time to stream from; without an
offset it is the instrument's local time, as session windows are written), and
``access_token`` for clients that cannot set headers.

A live source must be a live session of the workspace the stream acts in that the caller may
read (``can_read`` on the ``live_session``); one that is not is answered like a missing one.
Its stream has no end of its own, and at each contract roll it sends a new ``runtime_config``
before the first frame of the new contract.

**Refusals.** Browsers cannot set headers on a WebSocket, and a refusal before the handshake
reaches them as a bare failed connection. So the handshake is accepted first and every refusal
is a close frame whose code says which and whose reason says why (at most 123 bytes):

====== =============================================================================
code   meaning
====== =============================================================================
4400   a bad query parameter (``serving`` missing, ``source``, ``speed`` or ``start``
       unreadable, ``speed`` with a live source), or an ambiguous version prefix
4401   unauthenticated: no token (``Authorization: Bearer`` or ``?access_token=``), a token
       that fails verification, or one that expired while the stream was open
4404   no such workspace, serving version / alias or live session, or one the caller may not
       read (the same answer, as for HTTP); also sent when read access is revoked mid-stream
4429   the workspace's ``max_streams`` quota: the reason states the limit and current use
1011   the stream failed (e.g. a dataset file changed since the version was registered)
1013   the identity provider's keys or the authorizer cannot be reached: try again later
1000   the replay ended (after a ``stream_end`` message)
====== =============================================================================

The stream needs ``can_read`` on the workspace, declared like every route's need (its
:class:`StreamPermission` is found by the route enumeration of the access tests), checked once
the handshake is accepted and again every :attr:`StreamRuntime.reauthorize_seconds` while the
stream is open; the token's expiry closes the stream too. Messages: :mod:`qmachina.serving.wire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, WebSocket, WebSocketException
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from api.access import Permission, WorkspaceAccess, workspace_access
from api.dependencies import AppState
from api.live_service import bronze_root
from api.problems import QuotaExceededError, WorkspaceNotFoundError
from api.stream_slots import stream_slots
from qmachina.auth import AuthenticationError, KeySetUnavailableError, Principal
from qmachina.authz.authorizer import AuthorizerUnavailableError
from qmachina.authz.relationships import resource_object, user_object, workspace_object
from qmachina.serving import wire
from qmachina.serving.live_source import SessionRoll
from qmachina.serving.snapshot import ServingSnapshot
from qmachina.serving.stream_pipeline import (
    DEFAULT_QUEUE_FRAMES,
    MAX_SPEED,
    RollSource,
    StreamEnd,
    StreamError,
    StreamHub,
    StreamSource,
    StreamStart,
    Subscription,
    runtime_config_message,
)
from qmachina.specs.pipeline import default_data_root
from qmachina.store import live_sessions
from qmachina.store import serving_registry as registry
from qmachina.store.repository import StoreError

router = APIRouter(tags=["stream"])

BAD_REQUEST = 4400
UNAUTHENTICATED = 4401
NOT_FOUND = 4404
QUOTA = 4429
FAILED = 1011
TRY_AGAIN_LATER = 1013
MAX_REASON_BYTES = 123
MAX_REFERENCE_CHARS = 100
LIVE_PREFIX = "live:"
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,35}$")
"""A live session id as the store makes them (a UUID) or a test names them: a directory name."""


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame can carry (123 bytes of UTF-8)."""
    data = text.encode()
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


def refuse(code: int, reason: str) -> WebSocketException:
    """A refusal after the handshake: the socket is closed with ``code`` and ``reason``."""
    return WebSocketException(code=code, reason=close_reason(reason))


@dataclass
class StreamRuntime:
    """The streams of one app: its pipelines and how often open streams are re-authorized."""

    hub: StreamHub
    reauthorize_seconds: float = 30.0


def stream_runtime(app: Starlette) -> StreamRuntime:
    """The app's stream runtime, made on first use from its settings (a test may set
    ``app.state.stream_runtime`` before serving)."""
    runtime: StreamRuntime | None = getattr(app.state, "stream_runtime", None)
    if runtime is None:
        state: AppState = app.state.qmachina
        data_root = (state.settings.sample_data_dir or default_data_root()).resolve()
        runtime = app.state.stream_runtime = StreamRuntime(
            StreamHub(
                data_root=data_root,
                queue_frames=DEFAULT_QUEUE_FRAMES,
                bronze_root=bronze_root(state),
            )
        )
    return runtime


def _bearer_token(websocket: WebSocket, access_token: str | None) -> str:
    header = websocket.headers.get("authorization")
    if header:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise refuse(UNAUTHENTICATED, "the Authorization header does not carry a Bearer token")
        return credentials.strip()
    if access_token:
        return access_token
    raise refuse(
        UNAUTHENTICATED, "no bearer token: send `Authorization: Bearer <token>` or ?access_token="
    )


async def authenticate(websocket: WebSocket, access_token: str | None) -> Principal:
    """The verified principal of the socket's token, else a 4401 (1013: keys unreachable)."""
    token = _bearer_token(websocket, access_token)
    verifier = websocket.app.state.authentication.verifier
    try:
        principal: Principal = await run_in_threadpool(verifier.verify_token, token)
    except AuthenticationError as error:
        raise refuse(UNAUTHENTICATED, str(error)) from None
    except KeySetUnavailableError as error:
        raise refuse(TRY_AGAIN_LATER, str(error)) from None
    return principal


class StreamPermission(Permission):
    """``relation`` on the workspace named by ``?workspace=`` (default ``default``), for a
    WebSocket: the handshake is accepted, then the token is verified and the relation checked,
    and a refusal closes the socket with its code and reason (see the module's docstring)."""

    async def __call__(
        self, websocket: WebSocket, workspace: str = "default", access_token: str | None = None
    ) -> WorkspaceAccess:
        await websocket.accept()
        principal = await authenticate(websocket, access_token)
        state: AppState = websocket.app.state.qmachina
        if not 1 <= len(workspace) <= 64:
            raise refuse(NOT_FOUND, f"workspace {workspace[:64]!r} not found")
        try:
            return await workspace_access(state, principal, workspace, self.relation)
        except WorkspaceNotFoundError as error:
            raise refuse(NOT_FOUND, str(error)) from None
        except AuthorizerUnavailableError as error:
            raise refuse(TRY_AGAIN_LATER, str(error)) from None


Reader = Annotated[WorkspaceAccess, Depends(StreamPermission("can_read"))]


def _speed(text: str | None) -> float:
    if text is None:
        return 1.0
    try:
        speed = float(text)
    except ValueError:
        speed = math.nan
    if not (math.isfinite(speed) and 0.0 < speed <= MAX_SPEED):
        raise refuse(BAD_REQUEST, f"speed must be a number > 0 and at most {MAX_SPEED:g}")
    return speed


def _start_ns(text: str | None, snapshot: ServingSnapshot) -> int | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=snapshot.content.pipeline.instrument.zone)
        delta = moment.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    except (ValueError, OverflowError):
        raise refuse(BAD_REQUEST, "start must be an ISO-8601 time, e.g. 2023-12-25T17:05") from None
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _live_session_id(text: str | None, speed: str | None) -> str | None:
    """The session of ``source=live:<id>`` (None: the replay); a malformed source is a 4400."""
    if text is None or text == "replay":
        return None
    if not text.startswith(LIVE_PREFIX):
        raise refuse(BAD_REQUEST, "source must be replay or live:<session id>")
    session_id = text.removeprefix(LIVE_PREFIX)
    if not SESSION_ID.match(session_id):
        raise refuse(BAD_REQUEST, "source live:<session id> needs a session id (a UUID)")
    if speed is not None:
        raise refuse(BAD_REQUEST, "speed does not apply to a live source: it runs in real time")
    return session_id


@dataclass(frozen=True)
class LiveSource:
    """A live session the caller may stream from, and how its pipeline reads its rolls."""

    session_id: str
    object: str  # the session's authorization object
    rolls: RollSource


async def resolve_live_session(
    state: AppState, access: WorkspaceAccess, session_id: str
) -> LiveSource:
    """The workspace's live session ``session_id`` if the caller may read it, else a 4404."""
    workspace = access.workspace
    missing = f"no live session {session_id!r} in workspace {workspace.slug!r}"
    async with state.sessions() as session:
        try:
            row = await live_sessions.get_session(session, workspace.id, session_id)
        except live_sessions.LiveSessionNotFoundError:
            raise refuse(NOT_FOUND, missing) from None
        except StoreError as error:
            raise refuse(FAILED, str(error)) from None
    target = resource_object("live_session", row.id)
    try:
        readable = await state.authorizer.check(
            user_object(access.principal.subject), "can_read", target
        )
    except AuthorizerUnavailableError as error:
        raise refuse(TRY_AGAIN_LATER, str(error)) from None
    if not readable:
        raise refuse(NOT_FOUND, missing)

    async def rolls() -> Sequence[SessionRoll]:
        async with state.sessions() as session:
            rows = await live_sessions.rolls_of(session, workspace.id, row.id)
        return [
            SessionRoll(
                symbol=r.symbol,
                from_instrument_id=r.from_instrument_id,
                from_symbol=r.from_symbol,
                to_instrument_id=r.to_instrument_id,
                to_symbol=r.to_symbol,
                ts_event=r.ts_event,
            )
            for r in rows
        ]

    return LiveSource(row.id, target, rolls)


async def resolve_serving(
    state: AppState, access: WorkspaceAccess, reference: str | None
) -> tuple[ServingSnapshot, str | None]:
    """The version ``serving=`` names in the workspace, with the alias when it was one."""
    if not reference:
        raise refuse(BAD_REQUEST, "serving= is required: an alias or a version id")
    if len(reference) > MAX_REFERENCE_CHARS:
        raise refuse(NOT_FOUND, "serving version or alias not found")
    async with state.sessions() as session:
        try:
            version, alias = await registry.resolve_reference(
                session, access.workspace.id, reference
            )
        except registry.AmbiguousReferenceError as error:
            raise refuse(BAD_REQUEST, str(error)) from None
        except (registry.VersionNotFoundError, registry.AliasNotFoundError):
            raise refuse(
                NOT_FOUND,
                f"no serving alias or version {reference!r} in workspace {access.workspace.slug!r}",
            ) from None
        except StoreError as error:
            raise refuse(FAILED, str(error)) from None
        stored: dict[str, Any] = dict(version.snapshot)
    try:
        return ServingSnapshot.from_stored(stored), alias
    except ValueError as error:
        raise refuse(FAILED, f"the stored snapshot cannot be read: {error}") from None


@router.websocket("/v1/stream")
async def stream(
    websocket: WebSocket,
    access: Reader,
    serving: str | None = None,
    source: str | None = None,
    speed: str | None = None,
    start: str | None = None,
) -> None:
    """Stream a serving version: a ``runtime_config``, then its frames until the replay ends
    or the client leaves."""
    state: AppState = websocket.app.state.qmachina
    source_speed = _speed(speed)
    session_id = _live_session_id(source, speed)
    snapshot, alias = await resolve_serving(state, access, serving)
    start_ns = _start_ns(start, snapshot)
    live = None if session_id is None else await resolve_live_session(state, access, session_id)
    if live is None:
        stream_source = StreamSource(speed=source_speed, start_ns=start_ns)
    else:
        stream_source = StreamSource(kind="live", start_ns=start_ns, session_id=live.session_id)
    runtime = stream_runtime(websocket.app)
    try:
        with stream_slots(websocket.app).reserve(access.workspace):
            await _stream(websocket, access, state, runtime, snapshot, alias, stream_source, live)
    except QuotaExceededError as error:
        raise refuse(
            QUOTA,
            f"workspace {access.workspace.slug!r} is at its max_streams quota: limit "
            f"{error.use.limit}, current use {error.use.current}",
        ) from None


async def _stream(
    websocket: WebSocket,
    access: WorkspaceAccess,
    state: AppState,
    runtime: StreamRuntime,
    snapshot: ServingSnapshot,
    alias: str | None,
    source: StreamSource,
    live: LiveSource | None,
) -> None:
    """Join the version's pipeline for this source, send the runtime_config, then serve."""
    subscription = runtime.hub.subscribe(
        snapshot, source, rolls=None if live is None else live.rolls
    )
    try:
        try:
            started = await subscription.started()
        except StreamError as error:
            raise refuse(FAILED, f"stream failed: {error}") from None

        def config(start: StreamStart) -> str:
            return runtime_config_message(
                snapshot, start, alias=alias, queue_frames=subscription.max_frames
            )

        await websocket.send_text(config(started))
        guarded = None if live is None else live.object
        await _serve(websocket, subscription, access, state, runtime, config, guarded)
    finally:
        runtime.hub.unsubscribe(subscription)


async def _serve(
    websocket: WebSocket,
    subscription: Subscription,
    access: WorkspaceAccess,
    state: AppState,
    runtime: StreamRuntime,
    config: Callable[[StreamStart], str],
    live_object: str | None,
) -> None:
    """Send frames until the end, the client leaves, or its access ends; whichever is first."""
    every = runtime.reauthorize_seconds
    tasks = [
        asyncio.create_task(_send(websocket, subscription, config)),
        asyncio.create_task(_until_disconnect(websocket)),
        asyncio.create_task(_guard(websocket, access, state, every, live_object)),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        error = task.exception()
        if isinstance(error, WebSocketException):
            raise error
        if error is not None and not isinstance(error, WebSocketDisconnect | OSError):
            if websocket.client_state == WebSocketState.DISCONNECTED:
                return  # the client left while a frame was being sent
            raise error


async def _send(
    websocket: WebSocket, subscription: Subscription, config: Callable[[StreamStart], str]
) -> None:
    reported = 0
    while True:
        item = await subscription.next()
        if subscription.dropped != reported:
            reported = subscription.dropped
            await websocket.send_text(wire.stream_status(reported))
        if isinstance(item, StreamStart):  # a new live segment: what follows is its own
            await websocket.send_text(config(item))
            continue
        if isinstance(item, StreamEnd):
            await websocket.send_text(
                wire.stream_end(bins=item.bins, dropped_frames=reported, error=item.error)
            )
            if item.error:
                raise refuse(FAILED, f"stream failed: {item.error}")
            await websocket.close(1000, "replay finished")
            return
        await websocket.send_bytes(item)


async def _until_disconnect(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends until it leaves."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _guard(
    websocket: WebSocket,
    access: WorkspaceAccess,
    state: AppState,
    every_seconds: float,
    live_object: str | None = None,
) -> None:
    """Close the stream when the token expires or read access to the workspace (and to the
    live session streamed from, if any) is lost."""
    principal = access.principal
    subject, workspace = user_object(principal.subject), workspace_object(access.workspace.id)
    while True:
        left = (principal.expires_at - datetime.now(UTC)).total_seconds()
        if left <= 0:
            raise refuse(UNAUTHENTICATED, "the token has expired")
        await asyncio.sleep(min(left, every_seconds))
        if datetime.now(UTC) >= principal.expires_at:
            continue
        with contextlib.suppress(AuthorizerUnavailableError):  # keep streaming; check again
            if not await state.authorizer.check(subject, "can_read", workspace):
                raise refuse(
                    NOT_FOUND, f"workspace {access.workspace.slug!r} is no longer readable"
                )
            if live_object is not None and not await state.authorizer.check(
                subject, "can_read", live_object
            ):
                raise refuse(NOT_FOUND, f"{live_object.replace(':', ' ')} is no longer readable")
