"""A real agent started in-process: ``Agent.start()`` in its own thread's event loop (as
``edgeagent run`` does in the main thread); stopping it runs ``Agent.stop()`` and fails the test
if any of its threads are left behind. Shared by the HTTP API and hub tests."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from edgeagent.app import Agent
from edgeagent.config import AgentConfig, GrpcSection

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentThread:
    """Runs an :class:`Agent` in a background thread's event loop until :meth:`stop`."""

    def __init__(self, config: AgentConfig, root: Path = Path("/")) -> None:
        if config.grpc.listen == GrpcSection().listen:
            # Never the default port: tests (and other agents on the box) run side by side.
            config = dataclasses.replace(
                config, grpc=GrpcSection(listen=f"127.0.0.1:{free_port()}"))
        self.agent = Agent(config, root=root)
        listen = config.http.listen
        self.url = f"http://{listen}"
        self.grpc_url = config.grpc.listen
        self.token = self.agent.token
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name="api-test-agent")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.agent.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            await self.agent.stop()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self.agent.stop()

    def start(self) -> AgentThread:
        self._thread.start()
        self._started.wait(120)
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run a coroutine on the agent's event loop (from the test's thread) and wait for it."""
        assert self._loop is not None, "call() before start()"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> AgentThread:
        """Started already (``with AgentThread(config).start() as running:``); stopped on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the agent did not stop"
        # The manager's pools are shut down without waiting; their threads exit when idle.
        for thread in threading.enumerate():
            if thread.name.startswith(("edgeagent-", "asyncio_")):
                thread.join(30)
        left = [t.name for t in threading.enumerate()
                if t.name.startswith(("edgeagent-", "asyncio_", "api-test-agent"))]
        assert left == [], f"threads left behind: {left}"
