"""``/metrics`` across a version swap, and the separate ``[metrics]`` listener (each test
starts its own agent)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from edgeagent.app import Agent
from edgeagent.config import parse_config
from edgeagent.errors import ConfigError
from edgeagent.runtime.manager import ModelSource
from tests import onnx_models
from tests.api.conftest import TOKEN, AgentThread, free_port, make_config
from tests.api.test_metrics import _infer, _x, samples, value


def test_version_swap_under_load_shows_both_versions(tmp_path: Path) -> None:
    """Requests keep coming while version 2 replaces version 1: /metrics then holds both
    versions' counters, and what serves is version 2."""
    models = tmp_path / "models"
    models.mkdir()
    v1 = onnx_models.mlp(models / "v1.onnx", seed=0)
    v2 = onnx_models.mlp(models / "v2.onnx", seed=1)
    data = {"agent": {"state_dir": str(tmp_path / "state"), "device_id": "swap"},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "models": [{"name": "mlp", "path": str(v1), "max_concurrency": 2}]}
    running = AgentThread(parse_config(data, source=str(tmp_path / "agent.toml"))).start()
    stop = threading.Event()
    answers: dict[str, int] = {}
    errors: list[str] = []

    def load() -> None:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            while not stop.is_set():
                r = _infer(c)
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                version = r.json()["model_version"]
                answers[version] = answers.get(version, 0) + 1

    clients = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in clients:
            t.start()
        while answers.get("1", 0) < 20:
            stop.wait(0.01)
        running.call(running.agent.manager.load("mlp", ModelSource(v2, version=2)))
        while answers.get("2", 0) < 20:
            stop.wait(0.01)
        stop.set()
        for t in clients:
            t.join(60)
        got = samples(httpx.get(f"{running.url}/metrics").text)
    finally:
        stop.set()
        running.stop()
    assert errors == []
    for version in ("1", "2"):
        ok = value(got, "edgeagent_inference_requests_total", model="mlp", version=version,
                   outcome="success")
        assert ok == answers[version]
        assert value(got, "edgeagent_inference_latency_seconds_count", model="mlp",
                     version=version) == ok
    infos = [dict(labels) for n, labels in got if n == "edgeagent_model_info"]
    assert [i["version"] for i in infos] == ["2"]
    assert value(got, "edgeagent_model_ready", model="mlp", version="2") == 1


def _listener_config(tmp: Path, *, metrics: dict[str, str], http_token: bool = False,
                     ) -> tuple[dict[str, object], str]:
    listen = metrics.setdefault("listen", f"127.0.0.1:{free_port()}")
    config = make_config(tmp, token=http_token)
    data: dict[str, object] = {
        "agent": {"state_dir": str(tmp / "state"), "device_id": "metrics-test"},
        "http": {"listen": config.http.listen, "token_file": config.http.token_file},
        "metrics": metrics,
        "models": [{"name": m.name, "path": m.path} for m in config.models[:1]]}
    return data, listen


def test_separate_metrics_listener_serves_only_metrics(tmp_path: Path) -> None:
    data, listen = _listener_config(tmp_path, metrics={})
    running = AgentThread(parse_config(data, source=str(tmp_path / "agent.toml"))).start()
    try:
        with httpx.Client(base_url=f"http://{listen}") as c:
            r = c.get("/metrics")
            assert r.status_code == 200
            assert 'edgeagent_model_ready{model="mlp",version="1"} 1.0' in r.text
            assert c.get("/v2/health/ready").status_code == 404  # no inference here
            assert c.post("/v2/models/mlp/infer", json={"inputs": [_x()]}).status_code == 404
        # /metrics stays on the HTTP listener too.
        assert httpx.get(f"{running.url}/metrics").status_code == 200
    finally:
        running.stop()


def test_metrics_listener_token(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("metrics-token-0123456789\n")
    data, listen = _listener_config(tmp_path, metrics={"token_file": str(token_file)},
                                    http_token=True)
    running = AgentThread(parse_config(data, source=str(tmp_path / "agent.toml"))).start()
    try:
        with httpx.Client(base_url=f"http://{listen}") as c:
            r = c.get("/metrics")
            assert r.status_code == 401
            assert "Bearer" in r.json()["error"]
            wrong = c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert wrong.status_code == 401  # the HTTP token is not the metrics one
            ok = c.get("/metrics", headers={"Authorization": "Bearer metrics-token-0123456789"})
            assert ok.status_code == 200 and "edgeagent_build_info" in ok.text
    finally:
        running.stop()


def test_metrics_listener_falls_back_to_the_http_token(tmp_path: Path) -> None:
    data, listen = _listener_config(tmp_path, metrics={}, http_token=True)
    running = AgentThread(parse_config(data, source=str(tmp_path / "agent.toml"))).start()
    try:
        assert httpx.get(f"http://{listen}/metrics").status_code == 401
        r = httpx.get(f"http://{listen}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
    finally:
        running.stop()


def test_metrics_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    config = parse_config({"agent": {"state_dir": str(tmp_path)},
                           "metrics": {"listen": "0.0.0.0:9464"}})
    with pytest.raises(ConfigError, match=r"metrics\.listen.*metrics\.token_file"):
        Agent(config)


@pytest.mark.parametrize(("metrics", "match"), [
    ({"listen": "nowhere"}, r"metrics\.listen.*expected HOST:PORT"),
    ({"listen": "127.0.0.1:8080"}, r"metrics\.listen.*must differ from http\.listen"),
    ({"listen": "127.0.0.1:9464", "token_file": "/nonexistent/token"},
     r"metrics\.token_file.*cannot read"),
    ({"port": "9464"}, r"metrics.*unknown key 'port'"),
])
def test_bad_metrics_settings(tmp_path: Path, metrics: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Agent(parse_config({"agent": {"state_dir": str(tmp_path)}, "metrics": metrics}))


def test_metrics_listener_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data, _ = _listener_config(tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
        with pytest.raises(Exception, match=r"cannot listen on 127\.0\.0\.1:\d+ for metrics"):
            AgentThread(parse_config(data, source=str(tmp_path / "agent.toml"))).start()


def test_metrics_listener_on_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "metrics.sock"
    data, _ = _listener_config(tmp_path, metrics={"listen": f"unix:{sock}"})
    running = AgentThread(parse_config(data, source=str(tmp_path / "agent.toml"))).start()
    try:
        assert sock.stat().st_mode & 0o777 == 0o660
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://edgeagent") as c:
            r = c.get("/metrics")
            assert r.status_code == 200 and "edgeagent_build_info" in r.text
    finally:
        running.stop()
