"""A real agent, started in-process on a free loopback port, for the HTTP API tests.

The agent runs ``Agent.start()`` in its own thread's event loop (as ``edgeagent run`` does in
the main thread), serving real ONNX models made by ``tests/onnx_models.py``; stopping it runs
``Agent.stop()`` and the test fails if any of its threads are left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.config import AgentConfig, parse_config
from tests import onnx_models
from tests.agentthread import AgentThread, free_port

__all__ = ["AgentThread", "free_port"]  # the API tests import them from here

TOKEN = "api-test-token-0123456789abcdef"  # noqa: S105 - a test token
MAX_REQUEST_BYTES = 1 << 20
MAX_TENSOR_ELEMENTS = 100_000
MAX_BYTES_ELEMENTS = 20_000


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
                               "max_tensor_elements": MAX_TENSOR_ELEMENTS,
                               "max_bytes_elements": MAX_BYTES_ELEMENTS, **http}
    if token:
        token_file = tmp / "token"
        token_file.write_text(TOKEN + "\n")
        section["token_file"] = str(token_file)
    data = {"agent": {"state_dir": str(tmp / "state"), "device_id": "api-test",
                      "shutdown_grace_s": 5.0},
            "http": section, "models": make_models(tmp / "models")}
    return parse_config(data, source=str(tmp / "agent.toml"))


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    """An agent with a token configured, serving mlp, multi_io and strings."""
    with AgentThread(make_config(tmp_path_factory.mktemp("agent"))).start() as running:
        yield running
