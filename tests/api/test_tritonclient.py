"""Triton's own HTTP client against a running agent: the protocol as Triton's users speak it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

from tests.api.conftest import AgentThread


@pytest.fixture
def client(agent: AgentThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(agent.url.removeprefix("http://"))
    try:
        yield c
    finally:
        c.close()


def test_health_and_server_metadata(client: tc.InferenceServerClient, agent: AgentThread) -> None:
    assert client.is_server_live(headers=agent.headers)
    assert client.is_server_ready(headers=agent.headers)
    meta = client.get_server_metadata(headers=agent.headers)
    assert meta["name"] == "edgeagent"
    assert {"binary_tensor_data", "model_configuration", "model_repository",
            "statistics"} <= set(meta["extensions"])


def test_model_metadata_and_config(client: tc.InferenceServerClient, agent: AgentThread) -> None:
    assert client.is_model_ready("mlp", headers=agent.headers)
    assert client.is_model_ready("mlp", "1", headers=agent.headers)
    assert not client.is_model_ready("mlp", "2", headers=agent.headers)
    meta = client.get_model_metadata("mlp", headers=agent.headers)
    assert meta == {
        "name": "mlp", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    # Batching off: max_batch_size 0 and full shapes.
    config = client.get_model_config("mlp", headers=agent.headers)
    assert config["max_batch_size"] == 0
    assert config["input"][0]["dims"] == [-1, 64]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" not in config
    # Batching on (max_batch_size 8): dims without the batch dimension.
    config = client.get_model_config("multi_io", headers=agent.headers)
    assert config["max_batch_size"] == 8
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("x", "TYPE_FP32", [3]), ("k", "TYPE_INT64", [3])]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert client.get_model_config("strings", headers=agent.headers)["input"][0]["data_type"] \
        == "TYPE_STRING"


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_json_and_binary(client: tc.InferenceServerClient, agent: AgentThread,
                               binary_in: bool, binary_out: bool) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    k = np.array([[1, 2, 3], [-4, 5, 1 << 40]], dtype=np.int64)
    inputs = [tc.InferInput("x", [2, 3], "FP32"), tc.InferInput("k", [2, 3], "INT64")]
    inputs[0].set_data_from_numpy(x, binary_data=binary_in)
    inputs[1].set_data_from_numpy(k, binary_data=binary_in)
    outputs = [tc.InferRequestedOutput("k2", binary_data=binary_out),
               tc.InferRequestedOutput("sum", binary_data=not binary_out)]
    result = client.infer("multi_io", inputs, outputs=outputs, request_id="req-42",
                          headers=agent.headers)
    np.testing.assert_array_equal(result.as_numpy("k2"), k * 2)
    np.testing.assert_allclose(result.as_numpy("sum").reshape(2, 3), x + k.astype(np.float32))
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_name"] == "multi_io"
    assert response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["k2", "sum"]


def test_infer_all_outputs_binary_by_default(client: tc.InferenceServerClient,
                                            agent: AgentThread) -> None:
    """Without ``outputs`` tritonclient sets binary_data_output: every output comes binary."""
    batch = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    inp = tc.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    result = client.infer("mlp", [inp], headers=agent.headers)
    assert result.get_output("logits")["parameters"]["binary_data_size"] == 5 * 10 * 4
    logits = result.as_numpy("logits")
    assert logits.shape == (5, 10)
    assert logits.dtype == np.float32
    # The same request in JSON gives the same numbers.
    inp.set_data_from_numpy(batch, binary_data=False)
    again = client.infer("mlp", [inp], outputs=[tc.InferRequestedOutput("logits", False)],
                         headers=agent.headers)
    np.testing.assert_array_equal(again.as_numpy("logits"), logits)


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors(client: tc.InferenceServerClient, agent: AgentThread, binary: bool) -> None:
    words = np.array(["hello", "", "héllo wörld", "x" * 300], dtype=object)
    inp = tc.InferInput("text", [4], "BYTES")
    inp.set_data_from_numpy(words, binary_data=binary)
    result = client.infer("strings", [inp], outputs=[tc.InferRequestedOutput("echo", binary)],
                          headers=agent.headers)
    got = result.as_numpy("echo")
    as_text = [g.decode() if isinstance(g, bytes) else g for g in got]
    assert as_text == list(words)


def test_errors_reach_the_client(client: tc.InferenceServerClient, agent: AgentThread) -> None:
    inp = tc.InferInput("input", [1, 63], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="shape") as info:
        client.infer("mlp", [inp], headers=agent.headers)
    assert info.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown model") as info:
        client.get_model_metadata("nope", headers=agent.headers)
    assert info.value.status() == "404"


def test_statistics(client: tc.InferenceServerClient, agent: AgentThread) -> None:
    inp = tc.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(np.ones((2, 64), dtype=np.float32))
    before = client.get_inference_statistics("mlp", headers=agent.headers)["model_stats"][0]
    client.infer("mlp", [inp], headers=agent.headers)
    stats = client.get_inference_statistics("mlp", "1", headers=agent.headers)["model_stats"]
    assert len(stats) == 1
    assert stats[0]["name"] == "mlp"
    assert stats[0]["version"] == "1"
    assert stats[0]["inference_count"] == before["inference_count"] + 1
    success = stats[0]["inference_stats"]["success"]["count"]
    assert success == before["inference_stats"]["success"]["count"] + 1
    every = client.get_inference_statistics(headers=agent.headers)["model_stats"]
    assert {s["name"] for s in every} == {"mlp", "multi_io", "strings"}
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("mlp", "7", headers=agent.headers)
    assert info.value.status() == "404"


def test_repository_index_load_unload(client: tc.InferenceServerClient,
                                      agent: AgentThread) -> None:
    index = client.get_model_repository_index(headers=agent.headers)
    assert {(m["name"], m["state"]) for m in index} == {
        ("mlp", "READY"), ("multi_io", "READY"), ("strings", "READY")}
    client.unload_model("strings", headers=agent.headers)
    assert not client.is_model_ready("strings", headers=agent.headers)
    assert not client.is_server_ready(headers=agent.headers)  # a configured model is down
    index = client.get_model_repository_index(headers=agent.headers)
    states = {m["name"]: m["state"] for m in index}
    assert states["strings"] == "UNLOADED"
    client.load_model("strings", headers=agent.headers)
    assert client.is_model_ready("strings", headers=agent.headers)
    assert client.is_server_ready(headers=agent.headers)
    with pytest.raises(InferenceServerException, match="never loads a model from") as info:
        client.load_model("strings", config='{"backend": "onnxruntime"}', headers=agent.headers)
    assert info.value.status() == "400"
    with pytest.raises(InferenceServerException, match="never loads") as info:
        client.load_model("strings", config="{}", files={"file:1/model.onnx": b"\0"},
                          headers=agent.headers)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("not-configured", headers=agent.headers)
    assert info.value.status() == "404"


def test_token_is_required(client: tc.InferenceServerClient) -> None:
    assert not client.is_server_live()
    with pytest.raises(InferenceServerException, match="Bearer") as info:
        client.get_server_metadata()
    assert info.value.status() == "401"
    with pytest.raises(InferenceServerException, match="wrong bearer token"):
        client.get_server_metadata(headers={"Authorization": "Bearer not-the-token-at-all"})
