"""Triton's own gRPC clients (sync and asyncio) against a running agent: the suite
``test_tritonclient.py`` runs over HTTP, over ``inference.GRPCInferenceService``, plus
streaming and bad input.

The aio client runs on a loop of its own through :class:`AioClient`, so every test drives both
clients with the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.api.conftest import AgentThread


class AioClient:
    """``tritonclient.grpc.aio``'s client with a synchronous face: each call runs to its end
    on the client's own event loop."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(self._make(url))

    @staticmethod
    async def _make(url: str) -> tca.InferenceServerClient:
        return tca.InferenceServerClient(url)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run_until_complete(method(*args, **kwargs))

        return call

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()


@pytest.fixture(params=["sync", "aio"])
def client(request: pytest.FixtureRequest, agent: AgentThread) -> Iterator[Any]:
    c: Any = (tc.InferenceServerClient(agent.grpc_url) if request.param == "sync"
              else AioClient(agent.grpc_url))
    try:
        yield c
    finally:
        c.close()


def _h(agent: AgentThread) -> dict[str, str]:
    """The token as gRPC metadata (keys are lower case on gRPC)."""
    return {"authorization": f"Bearer {agent.token}"}


def _code(info: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(info.value.status())


def test_health_and_server_metadata(client: Any, agent: AgentThread) -> None:
    assert client.is_server_live(headers=_h(agent))
    assert client.is_server_ready(headers=_h(agent))
    meta = client.get_server_metadata(headers=_h(agent))
    assert meta.name == "edgeagent"
    assert {"binary_tensor_data", "model_configuration", "model_repository", "statistics",
            "system_shared_memory"} <= set(meta.extensions)


def test_model_metadata_and_config(client: Any, agent: AgentThread) -> None:
    assert client.is_model_ready("mlp", headers=_h(agent))
    assert client.is_model_ready("mlp", "1", headers=_h(agent))
    assert not client.is_model_ready("mlp", "2", headers=_h(agent))
    assert not client.is_model_ready("nope", headers=_h(agent))
    meta = client.get_model_metadata("mlp", headers=_h(agent))
    assert (meta.name, list(meta.versions), meta.platform) == ("mlp", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 10])]
    config = client.get_model_config("mlp", headers=_h(agent)).config
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 64]
    assert config.input[0].data_type == tc.model_config_pb2.TYPE_FP32
    assert not config.HasField("dynamic_batching")
    config = client.get_model_config("multi_io", headers=_h(agent)).config
    assert config.max_batch_size == 8
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [3]), ("k", [3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    strings = client.get_model_config("strings", headers=_h(agent)).config
    assert strings.input[0].data_type == tc.model_config_pb2.TYPE_STRING


def test_infer_raw_tensors(client: Any, agent: AgentThread) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    k = np.array([[1, 2, 3], [-4, 5, 1 << 40]], dtype=np.int64)
    inputs = [tc.InferInput("x", [2, 3], "FP32"), tc.InferInput("k", [2, 3], "INT64")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(k)
    outputs = [tc.InferRequestedOutput("k2"), tc.InferRequestedOutput("sum")]
    result = client.infer("multi_io", inputs, outputs=outputs, request_id="req-42",
                          headers=_h(agent))
    np.testing.assert_array_equal(result.as_numpy("k2"), k * 2)
    np.testing.assert_allclose(result.as_numpy("sum"), x + k.astype(np.float32))
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == (
        "req-42", "multi_io", "1")
    assert [o.name for o in response.outputs] == ["k2", "sum"]


def test_infer_all_outputs_by_default(client: Any, agent: AgentThread) -> None:
    batch = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    inp = tc.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    logits = client.infer("mlp", [inp], headers=_h(agent)).as_numpy("logits")
    assert logits.shape == (5, 10)
    assert logits.dtype == np.float32
    again = client.infer("mlp", [inp], outputs=[tc.InferRequestedOutput("logits")],
                         headers=_h(agent))
    np.testing.assert_array_equal(again.as_numpy("logits"), logits)


def test_bytes_tensors(client: Any, agent: AgentThread) -> None:
    words = np.array(["hello", "", "héllo wörld", "x" * 300], dtype=object)
    inp = tc.InferInput("text", [4], "BYTES")
    inp.set_data_from_numpy(words)
    got = client.infer("strings", [inp], headers=_h(agent)).as_numpy("echo")
    assert [g.decode() for g in got] == list(words)


def test_errors_reach_the_client(client: Any, agent: AgentThread) -> None:
    inp = tc.InferInput("input", [1, 63], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="shape") as info:
        client.infer("mlp", [inp], headers=_h(agent))
    assert _code(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown model") as info:
        client.get_model_metadata("nope", headers=_h(agent))
    assert _code(info) == "StatusCode.NOT_FOUND"
    inp = tc.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="unknown model") as info:
        client.infer("nope", [inp], headers=_h(agent))
    assert _code(info) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="no sequence batching") as info:
        client.infer("mlp", [inp], sequence_id=3, headers=_h(agent))
    assert _code(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="class_count") as info:
        client.infer("mlp", [inp], outputs=[tc.InferRequestedOutput("logits", class_count=3)],
                     headers=_h(agent))
    assert _code(info) == "StatusCode.INVALID_ARGUMENT"
    # And the agent keeps serving.
    assert client.infer("mlp", [inp], headers=_h(agent)).as_numpy("logits").shape == (1, 10)


def test_statistics(client: Any, agent: AgentThread) -> None:
    inp = tc.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(np.ones((2, 64), dtype=np.float32))
    before = client.get_inference_statistics("mlp", headers=_h(agent)).model_stats[0]
    client.infer("mlp", [inp], headers=_h(agent))
    stats = client.get_inference_statistics("mlp", "1", headers=_h(agent)).model_stats
    assert len(stats) == 1
    assert (stats[0].name, stats[0].version) == ("mlp", "1")
    assert stats[0].inference_count == before.inference_count + 1
    s = stats[0].inference_stats
    assert s.success.count == before.inference_stats.success.count + 1
    # Triton's tools (perf_analyzer) need these four counts to agree.
    assert s.success.count == s.queue.count == s.compute_input.count \
        == s.compute_infer.count == s.compute_output.count
    every = client.get_inference_statistics(headers=_h(agent)).model_stats
    assert {m.name for m in every} == {"mlp", "multi_io", "strings"}
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("mlp", "7", headers=_h(agent))
    assert _code(info) == "StatusCode.NOT_FOUND"


def test_repository_index_load_unload(client: Any, agent: AgentThread) -> None:
    index = client.get_model_repository_index(headers=_h(agent)).models
    assert {(m.name, m.state) for m in index} == {
        ("mlp", "READY"), ("multi_io", "READY"), ("strings", "READY")}
    client.unload_model("strings", headers=_h(agent))
    assert not client.is_model_ready("strings", headers=_h(agent))
    assert not client.is_server_ready(headers=_h(agent))
    states = {m.name: m.state for m in client.get_model_repository_index(
        headers=_h(agent)).models}
    assert states["strings"] == "UNLOADED"
    client.load_model("strings", headers=_h(agent))
    assert client.is_model_ready("strings", headers=_h(agent))
    assert client.is_server_ready(headers=_h(agent))
    with pytest.raises(InferenceServerException, match="never loads a model from") as info:
        client.load_model("strings", config='{"backend": "onnxruntime"}', headers=_h(agent))
    assert _code(info) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as info:
        client.load_model("not-configured", headers=_h(agent))
    assert _code(info) == "StatusCode.NOT_FOUND"


def test_token_is_required(client: Any) -> None:
    with pytest.raises(InferenceServerException, match="Bearer") as info:
        client.get_server_metadata()
    assert _code(info) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException, match="wrong bearer token"):
        client.get_server_metadata(headers={"authorization": "Bearer not-the-token-at-all"})


# ---- streaming ------------------------------------------------------------------------------


def test_stream_answers_every_request_and_survives_a_bad_one(agent: AgentThread) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((n, 64)).astype(np.float32) for n in (1, 3, 2, 4)]
    with tc.InferenceServerClient(agent.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)),
                            headers=_h(agent))
        for i, batch in enumerate(batches):
            inp = tc.InferInput("input", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            client.async_stream_infer("mlp", [inp], request_id=f"r{i}")
            if i == 1:  # a bad one in the middle: answered with an error, the stream goes on
                bad = tc.InferInput("input", [1, 63], "FP32")
                bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
                client.async_stream_infer("mlp", [bad], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(len(batches) + 1)]
        client.stop_stream()
        ok = {r.get_response().id: r.as_numpy("logits") for r, e in got if e is None}
        errors = [e for r, e in got if e is not None]
        assert len(errors) == 1
        assert "shape" in str(errors[0])
        assert sorted(ok) == ["r0", "r1", "r2", "r3"]
        for i, batch in enumerate(batches):
            inp = tc.InferInput("input", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
            np.testing.assert_array_equal(
                ok[f"r{i}"], client.infer("mlp", [inp], headers=_h(agent))
                .as_numpy("logits"))


def test_stream_needs_the_token(agent: AgentThread) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with tc.InferenceServerClient(agent.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        inp = tc.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
        # The stream may already be closed by the refusal when the request is sent.
        with contextlib.suppress(InferenceServerException):
            client.async_stream_infer("mlp", [inp])
        _, error = answers.get(timeout=30)
        client.stop_stream()
    assert "Bearer" in str(error)
    assert "UNAUTHENTICATED" in str(error)


# ---- bad input at the message level ---------------------------------------------------------


@pytest.fixture
def stub(agent: AgentThread) -> Iterator[Any]:
    with grpc.insecure_channel(agent.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _mlp_request(**fields: Any) -> Any:
    request = service_pb2.ModelInferRequest(model_name="mlp", **fields)
    return request


def _tensor(name: str = "input", datatype: str = "FP32",
            shape: tuple[int, ...] = (1, 64)) -> Any:
    return service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype,
                                                          shape=shape)


@pytest.mark.parametrize(("make", "code", "words"), [
    (lambda: _mlp_request(inputs=[_tensor()]), "INVALID_ARGUMENT", "has no data"),
    (lambda: _mlp_request(inputs=[_tensor()], raw_input_contents=[b"\0" * 255]),
     "INVALID_ARGUMENT", "255 bytes of data"),
    (lambda: _mlp_request(inputs=[_tensor()], raw_input_contents=[b"\0" * 256] * 2),
     "INVALID_ARGUMENT", "raw_input_contents has 2 entries"),
    (lambda: _mlp_request(inputs=[_tensor(datatype="FLOAT")], raw_input_contents=[b""]),
     "INVALID_ARGUMENT", "unknown datatype"),
    (lambda: _mlp_request(inputs=[_tensor(shape=(1, -64))]), "INVALID_ARGUMENT", "negative"),
    (lambda: _mlp_request(inputs=[_tensor(shape=(1 << 20, 64))]), "RESOURCE_EXHAUSTED",
     "max_tensor_elements"),
    (lambda: _mlp_request(inputs=[_tensor(), _tensor()], raw_input_contents=[b"\0" * 256] * 2),
     "INVALID_ARGUMENT", "given twice"),
    (_mlp_request, "INVALID_ARGUMENT", "at least one tensor"),
    (lambda: service_pb2.ModelInferRequest(model_name="mlp", model_version="x",
                                           inputs=[_tensor()]), "NOT_FOUND", "versions are"),
])
def test_malformed_infer_messages(stub: Any, agent: AgentThread, make: Callable[[], Any],
                                  code: str, words: str) -> None:
    metadata = [("authorization", f"Bearer {agent.token}")]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(make(), metadata=metadata)
    error: Any = info.value
    assert error.code().name == code
    assert words in error.details()
    # The agent keeps serving.
    ok = stub.ModelInfer(_mlp_request(inputs=[_tensor()], raw_input_contents=[b"\0" * 256]),
                         metadata=metadata)
    assert len(ok.raw_output_contents[0]) == 40


def test_typed_contents_are_read(stub: Any, agent: AgentThread) -> None:
    metadata = [("authorization", f"Bearer {agent.token}")]
    x = _tensor("x", "FP32", (1, 3))
    x.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    k = _tensor("k", "INT64", (1, 3))
    k.contents.int64_contents.extend([1, 1, 2])
    response = stub.ModelInfer(service_pb2.ModelInferRequest(model_name="multi_io",
                                                             inputs=[x, k]), metadata=metadata)
    outputs = {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents,
                                             strict=True)}
    np.testing.assert_array_equal(np.frombuffer(outputs["sum"], np.float32), [2, 3, 5])
    short = _tensor("x", "FP32", (1, 3))
    short.contents.fp32_contents.extend([1.0])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(service_pb2.ModelInferRequest(model_name="multi_io", inputs=[short, k]),
                        metadata=metadata)
    assert "contents.fp32_contents has 1 values" in info.value.details()  # type: ignore[attr-defined]


def test_message_over_the_request_limit_is_refused(stub: Any, agent: AgentThread) -> None:
    metadata = [("authorization", f"Bearer {agent.token}")]
    big = _mlp_request(inputs=[_tensor(shape=(8192, 64))],
                       raw_input_contents=[b"\0" * (8192 * 64 * 4)])  # 2 MiB > 1 MiB limit
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(big, metadata=metadata)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=metadata).live


def test_aio_stream_answers_every_request(agent: AgentThread) -> None:
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((n, 64)).astype(np.float32) for n in (2, 1, 3)]

    async def go() -> dict[str, Any]:
        client = tca.InferenceServerClient(agent.grpc_url)

        async def requests() -> Any:
            for i, batch in enumerate(batches):
                inp = tca.InferInput("input", list(batch.shape), "FP32")
                inp.set_data_from_numpy(batch)
                yield {"model_name": "mlp", "inputs": [inp], "request_id": f"a{i}",
                       "priority": 1 + i, "timeout": 10_000_000}
            bad = tca.InferInput("input", [1, 63], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
            yield {"model_name": "mlp", "inputs": [bad], "request_id": "bad"}

        got: dict[str, Any] = {}
        try:
            async for result, error in client.stream_infer(requests(), headers=_h(agent)):
                if error is not None:
                    got["error"] = error
                else:
                    got[result.get_response().id] = result.as_numpy("logits")
                if len(got) == len(batches) + 1:
                    break
        finally:
            await client.close()
        return got

    got = asyncio.run(go())
    assert "shape" in str(got.pop("error"))
    assert sorted(got) == ["a0", "a1", "a2"]
    for i, batch in enumerate(batches):
        assert got[f"a{i}"].shape == (batch.shape[0], 10)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05ab", bytes(range(256))])
def test_bytes_that_are_no_message_are_refused(agent: AgentThread, payload: bytes) -> None:
    metadata = [("authorization", f"Bearer {agent.token}")]
    with grpc.insecure_channel(agent.grpc_url) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            raw(payload, metadata=metadata)
        error: Any = info.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest message" in error.details()
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=metadata).live


def test_methods_not_served_are_unimplemented(stub: Any, agent: AgentThread) -> None:
    metadata = [("authorization", f"Bearer {agent.token}")]
    for call, request in ((stub.TraceSetting, service_pb2.TraceSettingRequest()),
                          (stub.LogSettings, service_pb2.LogSettingsRequest())):
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    assert stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=metadata).live


def test_grpc_requests_count_in_the_same_metrics_as_http(agent: AgentThread) -> None:
    def served() -> float:
        text = httpx.get(f"{agent.url}/metrics", headers=agent.headers).text
        return sum(float(ln.split()[-1]) for ln in text.splitlines()
                   if ln.startswith('edgeagent_inference_requests_total{model="mlp"')
                   and 'outcome="success"' in ln)

    before = served()
    with tc.InferenceServerClient(agent.grpc_url) as client:
        inp = tc.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
        for _ in range(3):
            client.infer("mlp", [inp], headers=_h(agent))
    assert served() == before + 3
