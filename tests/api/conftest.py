"""A real agent, started in-process on a free loopback port, for the HTTP API tests.

The agent runs ``Agent.start()`` in its own thread's event loop (as ``edgeagent run`` does in
the main thread), serving real ONNX models made by ``tests/onnx_models.py``; stopping it runs
``Agent.stop()`` and the test fails if any of its threads are left behind.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.app import Agent
from edgeagent.config import AgentConfig, parse_config
from tests import onnx_models

TOKEN = "api-test-token-0123456789abcdef"  # noqa: S105 - a test token
MAX_REQUEST_BYTES = 1 << 20
MAX_TENSOR_ELEMENTS = 100_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_models(folder: Path) -> list[dict[str, Any]]:
    """The served models: mlp (FP32 [-1,64] -> [-1,10]), multi_io, strings (BYTES)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        {"name": "mlp", "path": str(onnx_models.mlp(folder / "mlp.onnx"))},
        {"name": "multi_io", "path": str(onnx_models.multi_io(folder / "multi_io.onnx")),
         "max_batch_size": 8},
        {"name": "strings", "path": str(onnx_models.string_identity(folder / "strings.onnx"))},
    ]


def make_config(tmp: Path, *, token: bool = True, **http: Any) -> AgentConfig:
    """A configuration serving :func:`make_models` on a free loopback port."""
    section: dict[str, Any] = {"listen": f"127.0.0.1:{free_port()}",
                               "max_request_bytes": MAX_REQUEST_BYTES,
                               "max_tensor_elements": MAX_TENSOR_ELEMENTS, **http}
    if token:
        token_file = tmp / "token"
        token_file.write_text(TOKEN + "\n")
        section["token_file"] = str(token_file)
    data = {"agent": {"state_dir": str(tmp / "state"), "device_id": "api-test",
                      "shutdown_grace_s": 5.0},
            "http": section, "models": make_models(tmp / "models")}
    return parse_config(data, source=str(tmp / "agent.toml"))


class AgentThread:
    """Runs an :class:`Agent` in a background thread's event loop until :meth:`stop`."""

    def __init__(self, config: AgentConfig) -> None:
        self.agent = Agent(config)
        listen = config.http.listen
        self.url = f"http://{listen}"
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


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    """An agent with a token configured, serving mlp, multi_io and strings."""
    running = AgentThread(make_config(tmp_path_factory.mktemp("agent"))).start()
    try:
        yield running
    finally:
        running.stop()
