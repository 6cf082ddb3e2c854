"""Embedded defaults: a local demo hub, made once, served through the normal hub path."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from edgeagent.config import parse_config
from edgeagent.demo import DEMO_HUB, DEMO_KEYS, demo_outputs, ensure_demo_hub
from tests.agentthread import AgentThread, free_port

X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def _infer(agent: AgentThread) -> dict[str, object]:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                        "data": X.ravel().tolist()}]}
    r = httpx.post(f"{agent.url}/v2/models/demo/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    return out


def test_embedded_defaults_serve_the_demo_from_a_local_hub(tmp_path: Path) -> None:
    state = tmp_path / "state"
    data = {"agent": {"state_dir": str(state)}, "http": {"listen": f"127.0.0.1:{free_port()}"}}
    config = parse_config(data)  # no file: embedded defaults
    assert config.source == "embedded defaults"
    agent = AgentThread(config).start()
    try:
        answer = _infer(agent)  # answered at once on the first run
        assert answer["model_version"] == "1"
        (out,) = answer["outputs"]  # type: ignore[misc]
        np.testing.assert_allclose(out["data"], demo_outputs(X).ravel(), atol=1e-5)
        status = httpx.get(f"{agent.url}/v1/agent/status", timeout=30).json()
        assert status["hub"]["url"].startswith("file://")
        assert status["hub"]["releases"] == {"demo": [1]}
        (model,) = status["models"]
        assert (model["active"], model["source"]) == (1, "config: latest")
        assert model["variant"].startswith("demo.onnx")
        metrics = httpx.get(f"{agent.url}/metrics", timeout=30).text
        assert "edgeagent_hub_up 1.0" in metrics
        assert 'edgeagent_hub_sync_state{state="ok"} 1.0' in metrics
        assert "edgeagent_hub_last_sync_timestamp_seconds " in metrics
        assert ('edgeagent_model_info{format="onnx",model="demo",precision="fp32",'
                f'provider="CPUExecutionProvider",variant="{model["variant"]}",version="1"}} 1.0'
                in metrics)
    finally:
        agent.stop()
    hub_dir, keys_dir = state / DEMO_HUB, state / DEMO_KEYS
    assert not list(hub_dir.rglob("*.pem")), "keys never go inside the hub"
    assert sorted(p.name for p in keys_dir.iterdir()) == [
        "root.pem", "snapshot.pem", "targets.pem", "timestamp.pem"]
    stamp = (hub_dir / "metadata/timestamp.json").stat().st_mtime_ns
    # A later run: the hub is not made again, the stored version serves.
    assert ensure_demo_hub(state) is False
    again = AgentThread(parse_config(data)).start()
    try:
        assert _infer(again)["model_version"] == "1"
    finally:
        again.stop()
    assert (hub_dir / "metadata/timestamp.json").stat().st_mtime_ns == stamp


def test_interrupted_demo_hub_is_made_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / ".demo-hub.tmp" / "hub").mkdir(parents=True)  # a run killed halfway
    (state / DEMO_KEYS).mkdir()
    (state / DEMO_KEYS / "root.pem").write_text("stale")
    assert ensure_demo_hub(state) is True
    assert (state / DEMO_HUB / "metadata/timestamp.json").is_file()
    assert not (state / ".demo-hub.tmp").exists()
    assert (state / DEMO_KEYS / "root.pem").read_text() != "stale"


def test_shipped_demo_model_is_the_documented_classifier() -> None:
    """``edgeagent/demo.onnx`` holds WEIGHTS and BIAS and answers what demo_outputs says; the box
    reads it as a file (no onnx package needed to make it)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgeagent.demo import BIAS, WEIGHTS, demo_model

    model = onnx.load_from_string(demo_model())
    onnx.checker.check_model(model)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(weights["W"], WEIGHTS)
    np.testing.assert_array_equal(weights["B"], BIAS)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Softmax"]
    session = ort.InferenceSession(demo_model(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": X})
    np.testing.assert_allclose(out, demo_outputs(X), atol=1e-6)
