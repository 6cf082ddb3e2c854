"""A whole agent with a hub, through the real HTTP API: a release picked up while a client
infers, and ``edgeagent pull``/``rollback`` against the running agent."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from edgeconvert.hub import Hub

from edgeagent.cli import main as edgeagent_main
from edgeagent.config import load_config
from tests.agentthread import AgentThread, free_port
from tests.hub.helpers import SAMPLE, release
from tests.hub.hubserver import HubServer

TOKEN = "hub-agent-test-token-0123456789"  # noqa: S105 - a test token
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                    "data": SAMPLE[0].ravel().tolist()}]}


def _wait(what: str, cond: Callable[[], bool]) -> None:
    """Wait for something the agent does in the background (a generous bound, not a timing
    assertion: it only keeps a broken build from hanging)."""
    deadline = time.monotonic() + 120
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


def _config(tmp_path: Path, url: str, hub: Hub, poll_interval_s: float = 0.2) -> Path:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\ndevice_id = "hub-test"\n'
        'shutdown_grace_s = 5.0\n'
        f'[http]\nlisten = "127.0.0.1:{free_port()}"\ntoken_file = "{tmp_path / "token"}"\n'
        f'[hub]\nurl = "{url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
        f'poll_interval_s = {poll_interval_s}\nkeep_versions = 3\n'
        '[[models]]\nname = "m"\nversion = "latest"\n')
    return path


class _Client(threading.Thread):
    """Infers without pause; records every answered version and every failure."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(name="hub-test-client")
        self.url = url
        self.headers = headers
        self.versions: list[str] = []
        self.failures: list[Any] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/v2/models/m/infer", json=BODY)
                except httpx.HTTPError as exc:
                    self.failures.append(exc)
                    continue
                if r.status_code == 200:
                    self.versions.append(r.json()["model_version"])
                else:
                    self.failures.append((r.status_code, r.text))


def _version(agent: AgentThread) -> str:
    r = httpx.post(f"{agent.url}/v2/models/m/infer", json=BODY, headers=agent.headers,
                   timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def test_agent_switches_under_load_then_pull_and_rollback(
        tmp_path: Path, hub: Hub, server: HubServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    config_path = _config(tmp_path, server.url, hub)
    release(hub, tmp_path, 1)
    agent = AgentThread(load_config(str(config_path), {})).start()
    try:
        _wait("v1 served", lambda: httpx.get(f"{agent.url}/v2/models/m/ready",
                                             headers=agent.headers).status_code == 200)
        client = _Client(agent.url, agent.headers)
        client.start()
        try:
            _wait("first answers", lambda: len(client.versions) > 5)
            release(hub, tmp_path, 2)
            _wait("v2 answers", lambda: "2" in client.versions[-5:])
            _wait("more v2 answers", lambda: client.versions[-5:] == ["2"] * 5)
        finally:
            client.stop.set()
            client.join()
        assert client.failures == []
        first_two = client.versions.index("2")
        assert set(client.versions[:first_two]) == {"1"}
        assert set(client.versions[first_two:]) == {"2"}, "never back to 1 once switched"

        config = str(config_path)
        # pull NAME@1 goes through the repository load endpoint (with the token) and pins 1.
        assert edgeagent_main(["pull", "m@1", "--config", config]) == 0
        assert "the running agent loaded, checked and switched" in capsys.readouterr().out
        assert _version(agent) == "1"
        sync = agent.agent.hub
        assert sync is not None
        polls = sync.status.last_sync or 0.0
        _wait("two more polls", lambda: (sync.status.last_sync or 0.0) > polls + 0.3)
        assert _version(agent) == "1", "the poll loop keeps the pulled version"
        state = sync.store.model_state("m")
        assert (state.active, state.desired, state.requested) == (1, 1, None)

        # pull NAME: the latest again, and the pin is gone.
        assert edgeagent_main(["pull", "m", "--config", config]) == 0
        assert _version(agent) == "2"
        # rollback: back to the previous version (1), pinned.
        assert edgeagent_main(["rollback", "m", "--config", config]) == 0
        out = capsys.readouterr().out
        assert "rolling back to version 1" in out
        assert "switched" in out
        assert _version(agent) == "1"
        polls = sync.status.last_sync or 0.0
        _wait("two more polls", lambda: (sync.status.last_sync or 0.0) > polls + 0.3)
        assert _version(agent) == "1"
        assert sync.store.model_state("m").desired == 1

        # The load endpoint needs the token.
        r = httpx.post(f"{agent.url}/v2/repository/models/m/load", timeout=30)
        assert r.status_code in (401, 403)
    finally:
        agent.stop()


def test_pull_then_rollback_without_a_poll_in_between(
        tmp_path: Path, hub: Hub, server: HubServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    # No poll pass runs between the operator's commands (an hour apart): what each load did
    # must be in the hub's state when the command returns, or the next one acts on stale state.
    release(hub, tmp_path, 1)
    release(hub, tmp_path, 2)
    config = str(_config(tmp_path, server.url, hub, poll_interval_s=3600))
    agent = AgentThread(load_config(config, {})).start()
    try:
        _wait("v2 served", lambda: httpx.get(f"{agent.url}/v2/models/m/ready",
                                             headers=agent.headers).status_code == 200)
        assert _version(agent) == "2"
        assert edgeagent_main(["pull", "m@1", "--config", config]) == 0
        assert _version(agent) == "1"
        assert edgeagent_main(["pull", "m", "--config", config]) == 0
        assert _version(agent) == "2"
        capsys.readouterr()
        assert edgeagent_main(["rollback", "m", "--config", config]) == 0
        assert "rolling back to version 1" in capsys.readouterr().out
        assert _version(agent) == "1"
        state = agent.agent.hub.store.model_state("m")  # type: ignore[union-attr]
        assert (state.active, state.desired, state.requested) == (1, 1, None)
        assert state.previous[0] == 2

        # What the operator reads.
        capsys.readouterr()
        assert edgeagent_main(["status", "--config", config]) == 0
        out = capsys.readouterr().out
        assert f"hub       ok  {server.url}" in out
        assert "          m: active 1, previous 2, pinned to 1" in out
        assert "mqtt      not configured" in out
        assert "(token required)" in out
        assert re.search(r"  m +ready +v1 onnx/fp32 on CPUExecutionProvider", out), out
    finally:
        agent.stop()
