"""Where the API listens and what needs the token, on agents configured without one."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from edgeagent.app import Agent
from edgeagent.config import parse_config
from edgeagent.errors import ConfigError
from tests.api.conftest import AgentThread, make_config


def test_without_a_token_repository_changes_are_forbidden(tmp_path: Path) -> None:
    running = AgentThread(make_config(tmp_path, token=False)).start()
    try:
        with httpx.Client(base_url=running.url) as c:
            assert c.get("/v2/health/ready").status_code == 200  # loopback: no token needed
            assert c.post("/v2/repository/index").status_code == 200
            for action in ("load", "unload"):
                r = c.post(f"/v2/repository/models/mlp/{action}")
                assert r.status_code == 403
                assert "admin channel" in r.json()["error"]
                assert "http.token_file" in r.json()["error"]
            # Even a token the agent does not have cannot open them.
            r = c.post("/v2/repository/models/mlp/unload", headers={"Authorization": "Bearer x"})
            assert r.status_code == 403
            assert c.get("/v2/models/mlp/ready").status_code == 200
    finally:
        running.stop()


def test_non_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    config = parse_config({"agent": {"state_dir": str(tmp_path)},
                           "http": {"listen": "0.0.0.0:8080"}})
    with pytest.raises(ConfigError, match="token_file"):
        Agent(config)


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "api.sock"
    running = AgentThread(make_config(tmp_path, token=False, listen=f"unix:{sock}")).start()
    try:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://edgeagent") as c:
            assert c.get("/v2").json()["name"] == "edgeagent"
            r = c.post("/v2/models/multi_io/infer", json={"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                {"name": "k", "datatype": "INT64", "shape": [1, 3], "data": [0, 0, 1]}]})
            assert r.json()["outputs"][0]["data"] == [1, 2, 4]
    finally:
        running.stop()
