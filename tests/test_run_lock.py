"""The run lock: a second agent on the same state directory refuses to start, and the operator's
commands tell a running agent (however busy) from a stopped one by the lock, not by how fast it
answers, so they never write the state of an agent that runs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from edgeagent.app import Agent
from edgeagent.config import AgentConfig, parse_config
from edgeagent.errors import EdgeAgentError
from edgeagent.localapi import agent_running, hold_run_lock
from tests import onnx_models
from tests.agentthread import AgentThread, free_port


def _config(tmp_path: Path) -> AgentConfig:
    model = onnx_models.mlp(tmp_path / "m.onnx")
    return parse_config({"agent": {"state_dir": str(tmp_path / "state")},
                         "http": {"listen": f"127.0.0.1:{free_port()}"}, "grpc": {"listen": ""},
                         "models": [{"name": "m", "path": str(model)}]})


def test_a_second_agent_on_the_same_state_refuses(tmp_path: Path) -> None:
    config = _config(tmp_path)
    running = AgentThread(config).start()
    try:
        assert agent_running(config)
        second = Agent(config)
        with pytest.raises(EdgeAgentError, match="another agent already runs"):
            asyncio.run(second.start())
    finally:
        running.stop()
    assert not agent_running(config)


def test_a_held_lock_means_running_even_when_nothing_answers(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert not agent_running(config)
    fd = hold_run_lock(tmp_path / "state")  # an agent that is up but not answering yet
    try:
        assert agent_running(config)
    finally:
        os.close(fd)
