"""Seam 2: SIGHUP applies hub model changes. The real agent as a process over a real hub: a
hub model added to ``[[models]]`` is pulled, and ``version = 1`` changed to ``2`` serves 2."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from edgeconvert.hub import Hub
from edgeconvert.publish import publish

from tests import onnx_models
from tests.hub.helpers import release
from tests.hub.hubserver import HubServer
from tests.service.agentproc import AgentProcess, free_port, wait_ready_http


def _wait(what: str, cond: Callable[[], bool], proc: AgentProcess) -> None:
    deadline = time.monotonic() + 120  # a bound that keeps a broken build from hanging
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting: {what}\n{proc.log()}"
        time.sleep(0.1)


def _config(path: Path, state: Path, port: int, server: HubServer, hub: Hub,
            models: str) -> None:
    path.write_text(
        f'[agent]\nstate_dir = "{state}"\n[http]\nlisten = "127.0.0.1:{port}"\n'
        f'[hub]\nurl = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
        "poll_interval_s = 3600\n" + models)


def _version(port: int, name: str) -> str | None:
    r = httpx.get(f"http://127.0.0.1:{port}/v2/models/{name}", timeout=10)
    return str(r.json()["versions"][0]) if r.status_code == 200 else None


def test_sighup_pulls_added_and_changed_hub_models(tmp_path: Path, hub: Hub,
                                                   server: HubServer) -> None:
    release(hub, tmp_path, 1)
    release(hub, tmp_path, 2)
    other = onnx_models.mlp(tmp_path / "other.onnx", n_in=4, n_hidden=4, n_out=2, seed=9)
    publish(hub.dir, hub.keys_dir, "other", 1, [str(other)])
    port = free_port()
    config = tmp_path / "agent.toml"
    _config(config, tmp_path / "state", port, server, hub,
            '[[models]]\nname = "m"\nversion = 1\n')
    proc = AgentProcess(config, {}, tmp_path / "agent.log")
    try:
        wait_ready_http(port, proc)
        assert _version(port, "m") == "1"
        _config(config, tmp_path / "state", port, server, hub,
                '[[models]]\nname = "m"\nversion = 2\n'
                '[[models]]\nname = "other"\nversion = "latest"\n')
        proc.signal(signal.SIGHUP)
        _wait("m at version 2", lambda: _version(port, "m") == "2", proc)
        _wait("other pulled", lambda: _version(port, "other") == "1", proc)
        assert "configuration reloaded: loaded: m, other" in proc.log()
    finally:
        proc.kill()
