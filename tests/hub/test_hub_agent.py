"""A whole agent with a hub, through the real HTTP API: a release picked up while a client
infers, and ``edgeagent pull``/``rollback`` against the running agent."""

from __future__ import annotations

import json
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
from edgeagent.versions.history import History
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


def _config(tmp_path: Path, url: str, hub: Hub, poll_interval_s: float = 0.2,
            token: bool = True) -> Path:
    (tmp_path / "token").write_text(TOKEN + "\n")
    path = tmp_path / "agent.toml"
    token_line = f'token_file = "{tmp_path / "token"}"\n' if token else ""
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\ndevice_id = "hub-test"\n'
        'shutdown_grace_s = 5.0\n'
        f'[http]\nlisten = "127.0.0.1:{free_port()}"\n{token_line}'
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
        # pull NAME@1 goes to the running agent over the admin channel and pins 1.
        assert edgeagent_main(["pull", "m@1", "--config", config]) == 0
        out = capsys.readouterr().out
        assert "pinned to version 1; the running agent serves version 1 (operator pin)" in out
        assert _version(agent) == "1"
        source = agent.agent.owner.hub
        assert source is not None
        polls = source.status.last_sync or 0.0
        _wait("two more polls", lambda: (source.status.last_sync or 0.0) > polls + 0.3)
        assert _version(agent) == "1", "the poll loop keeps the pulled version"
        state = History(tmp_path / "state").read().model("m")
        assert (state.active, state.operator_pin) == (1, 1)

        # pull NAME: the latest again, and the pin is gone.
        assert edgeagent_main(["pull", "m", "--config", config]) == 0
        assert _version(agent) == "2"
        # rollback: back to the previous version (1), pinned.
        assert edgeagent_main(["rollback", "m", "--config", config]) == 0
        assert "rolled back and pinned to version 1" in capsys.readouterr().out
        assert _version(agent) == "1"
        polls = source.status.last_sync or 0.0
        _wait("two more polls", lambda: (source.status.last_sync or 0.0) > polls + 0.3)
        assert _version(agent) == "1"
        assert History(tmp_path / "state").read().model("m").operator_pin == 1

        # Remote callers need the token for what changes versions.
        for path in ("/v2/repository/models/m/load", "/v1/agent/models/m/rollback"):
            r = httpx.post(f"{agent.url}{path}", timeout=30)
            assert r.status_code in (401, 403)
    finally:
        agent.stop()


def test_pull_then_rollback_without_a_poll_in_between(
        tmp_path: Path, hub: Hub, server: HubServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A default install: no http.token_file. The operator's commands work over the admin
    # channel, and no poll pass runs between them (an hour apart): what each did must be
    # recorded when the command returns, or the next one acts on stale state.
    release(hub, tmp_path, 1)
    release(hub, tmp_path, 2)
    config = str(_config(tmp_path, server.url, hub, poll_interval_s=3600, token=False))
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
        assert "rolled back and pinned to version 1" in capsys.readouterr().out
        assert _version(agent) == "1"
        state = History(tmp_path / "state").read().model("m")
        assert (state.active, state.operator_pin) == (1, 1)
        assert state.previous[0] == 2

        # What the operator reads.
        capsys.readouterr()
        assert edgeagent_main(["status", "--config", config]) == 0
        out = capsys.readouterr().out
        assert f"hub       ok  {server.url}" in out
        assert "mqtt      not configured" in out
        assert "(token required)" not in out
        assert re.search(r"  m +ready +v1 onnx/fp32 on CPUExecutionProvider +\[operator pin\]",
                         out), out
        assert edgeagent_main(["models", "--json", "--config", config]) == 0
        (model,) = json.loads(capsys.readouterr().out)["models"]
        assert (model["serving"], model["source_kind"], model["previous"][0]) == \
            (1, "operator", 2)
    finally:
        agent.stop()
