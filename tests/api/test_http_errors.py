"""Raw HTTP against a running agent: every malformed request gets its 4xx and a clear
``{"error": ...}``, and the agent keeps serving."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.api.conftest import MAX_REQUEST_BYTES, MAX_TENSOR_ELEMENTS, AgentThread


@pytest.fixture
def http(agent: AgentThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers=agent.headers, timeout=30) as c:
        yield c
        # Whatever the test sent, the agent still answers a valid request.
        assert _mlp_request(c).status_code == 200


def _x(data: Any = None, shape: list[int] | None = None, **fields: Any) -> dict[str, Any]:
    tensor = {"name": "input", "datatype": "FP32", "shape": shape or [1, 64],
              "data": [0.5] * 64 if data is None else data}
    tensor.update(fields)
    return tensor


def _mlp_request(c: httpx.Client, body: Any = None, **kw: Any) -> httpx.Response:
    if body is None:
        body = {"inputs": [_x()]}
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
    return c.post("/v2/models/mlp/infer", content=body, **kw)


def _binary_body(header: dict[str, Any], *buffers: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(buffers), {"Inference-Header-Content-Length": str(len(head))}


def _error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    for word in words:
        assert word in message, message
    return str(message)


# ---- what works, raw -------------------------------------------------------------------


def test_json_infer_nested_data_and_id(http: httpx.Client) -> None:
    r = http.post("/v2/models/multi_io/versions/1/infer", json={
        "id": "abc",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                    "data": [[1, 2, 3], [4, 5, 6]]},
                   {"name": "k", "datatype": "INT64", "shape": [2, 3], "data": [1, 1, 1, 2, 2, 2]}],
        "outputs": [{"name": "sum"}],
    })
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"model_name": "multi_io", "model_version": "1", "id": "abc", "outputs": [
        {"name": "sum", "datatype": "FP32", "shape": [2, 3], "data": [2, 3, 4, 6, 7, 8]}]}


def test_binary_response_layout(http: httpx.Client) -> None:
    x = np.arange(6, dtype=np.float32)
    k = np.arange(6, dtype=np.int64)
    body, headers = _binary_body({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                    "parameters": {"binary_data_size": 24}},
                   {"name": "k", "datatype": "INT64", "shape": [2, 3],
                    "parameters": {"binary_data_size": 48}}],
        "parameters": {"binary_data_output": True},
    }, x.tobytes(), k.tobytes())
    r = http.post("/v2/models/multi_io/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [24, 48]
    assert len(r.content) == n + 72
    np.testing.assert_array_equal(np.frombuffer(r.content[n:n + 24], np.float32), x * 2)
    np.testing.assert_array_equal(np.frombuffer(r.content[n + 24:], np.int64), k * 2)


def test_binary_bytes_tensor_wire_format(http: httpx.Client) -> None:
    words = [b"a", b"", b"\xc3\xa9t\xc3\xa9"]
    raw = b"".join(struct.pack("<I", len(w)) + w for w in words)
    body, headers = _binary_body({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3],
                                              "parameters": {"binary_data_size": len(raw)}}],
                                  "outputs": [{"name": "echo",
                                               "parameters": {"binary_data": True}}]},
                                 raw)
    r = http.post("/v2/models/strings/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    assert r.content[n:] == raw


def test_chunked_body_within_the_limit(http: httpx.Client) -> None:
    payload = json.dumps({"inputs": [_x()]}).encode()
    r = http.post("/v2/models/mlp/infer", content=iter([payload[:10], payload[10:]]))
    assert r.status_code == 200, r.text


def test_metrics(http: httpx.Client) -> None:
    assert _mlp_request(http).status_code == 200
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ('edgeagent_inference_requests_total{model="mlp",outcome="success",version="1"}',
                 'edgeagent_inference_latency_seconds_bucket{le="+Inf",model="mlp",version="1"}',
                 'edgeagent_inference_queue_seconds_count{model="mlp",version="1"}',
                 'edgeagent_inference_batch_size_bucket{le="1",model="mlp",version="1"}',
                 'edgeagent_inference_in_flight{model="mlp",version="1"}',
                 'edgeagent_inference_queue_depth{model="mlp",version="1"}',
                 'edgeagent_inference_rejected_total{model="mlp",version="1"}',
                 'edgeagent_model_ready{model="mlp",version="1"} 1.0',
                 "process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert line in text, line


def test_agent_status(http: httpx.Client) -> None:
    status = http.get("/v1/agent/status").json()
    assert status["device_id"] == "api-test"
    assert {m["name"]: m["state"] for m in status["models"]}["mlp"] == "ready"


# ---- malformed requests ----------------------------------------------------------------


@pytest.mark.parametrize(("body", "words"), [
    (b"{not json", ["not valid JSON"]),
    (b"\xff\xfe", ["not valid JSON"]),
    ([1, 2], ["JSON object"]),
    ({}, ["'inputs'"]),
    ({"inputs": []}, ["'inputs'"]),
    ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, ["has no 'name'"]),
    ({"inputs": [_x(datatype=None)]}, ["no 'datatype'"]),
    ({"inputs": [_x(datatype="FLOAT32")]}, ["unknown datatype 'FLOAT32'"]),
    ({"inputs": [_x(shape=[1, -64])]}, ["non-negative integers"]),
    ({"inputs": [_x(shape="1,64")]}, ["non-negative integers"]),
    ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64]}]}, ["neither 'data'"]),
    ({"inputs": [_x(data=[0.5] * 63)]}, ["63 values", "takes 64"]),
    ({"inputs": [_x(data=[[0.5] * 32, [0.5] * 31])]}, ["input 'input'"]),
    ({"inputs": [_x(data=["a"] * 64)]}, ["not a (nested) list of FP32"]),
    ({"inputs": [_x(data={"a": 1})]}, ["must be a list"]),
    ({"inputs": [_x(data=[0.5] * 128, shape=[2, 63])]}, ["takes 126"]),
    ({"inputs": [_x(shape=[1, 63], data=[0.5] * 63)]},
     ["shape [1, 63] does not match", "[-1, 64]"]),
    ({"inputs": [_x(datatype="INT32", data=[1] * 64)]}, ["datatype INT32 does not match", "FP32"]),
    ({"inputs": [_x(), {**_x(), "name": "extra"}]}, ["unknown input 'extra'"]),
    ({"inputs": [_x(), _x()]}, ["given twice"]),
    ({"inputs": [_x()], "outputs": [{"name": "nope"}]}, ["unknown output 'nope'"]),
    ({"inputs": [_x()], "outputs": "logits"}, ["'outputs' must be a list"]),
    ({"inputs": [_x()], "id": 7}, ["'id' must be a string"]),
    ({"inputs": [_x()], "parameters": {"binary_data_output": "yes"}}, ["true or false"]),
    ({"inputs": [_x(parameters={"binary_data_size": 256})]}, ["both 'data' and"]),
    ({"inputs": [_x(parameters={"shared_memory_region": "r"})]}, ["shared_memory_byte_size"]),
    ({"inputs": [_x(data=None, parameters={"shared_memory_region": "r",
                                           "shared_memory_byte_size": 256})]},
     ["shared memory and also in the request"]),
    ({"inputs": [_x()], "parameters": {"sequence_id": 7}}, ["sequence_id", "no sequence"]),
    ({"inputs": [_x()], "parameters": {"sequence_start": True}}, ["sequence_start"]),
    ({"inputs": [_x()], "parameters": {"priority": -1}}, ["'priority'", "non-negative"]),
    ({"inputs": [_x()], "parameters": {"timeout": "soon"}}, ["'timeout'", "microseconds"]),
    ({"inputs": [_x()], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]},
     ["classification extension (class_count)"]),
])
def test_malformed_json_request(http: httpx.Client, body: Any, words: list[str]) -> None:
    _error(_mlp_request(http, body), 400, *words)


def _binary_mlp(size: int, data: bytes, header_length: str | None = None) -> httpx.Response:
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "parameters": {"binary_data_size": size}}]}).encode()
    length = header_length if header_length is not None else str(len(head))
    return httpx.Request("POST", "/v2/models/mlp/infer", content=head + data,  # type: ignore[return-value]
                         headers={"Inference-Header-Content-Length": length})


@pytest.mark.parametrize(("size", "data", "length", "words"), [
    (256, b"\0" * 255, None, ["only 255 bytes"]),
    (256, b"\0" * 257, None, ["declare 256 bytes", "carries 257"]),
    (252, b"\0" * 252, None, ["252 bytes of binary data", "takes 256"]),
    (-1, b"\0" * 256, None, ["non-negative integer"]),
    (256, b"\0" * 256, "-5", ["Inference-Header-Content-Length is -5"]),
    (256, b"\0" * 256, "0", ["raw binary request", "takes a multiple of 256 bytes"]),
    (256, b"\0" * 256, "999999", ["Inference-Header-Content-Length is 999999"]),
    (256, b"\0" * 256, "ten", ["must be an integer"]),
    (256, b"\0" * 256, "3", ["not valid JSON"]),
])
def test_binary_sizes_that_do_not_add_up(http: httpx.Client, size: int, data: bytes,
                                         length: str | None, words: list[str]) -> None:
    request = _binary_mlp(size, data, length)
    _error(http.send(http.build_request("POST", request.url, content=request.content,  # type: ignore[attr-defined]
                                        headers=request.headers)), 400, *words)  # type: ignore[attr-defined]


def test_binary_without_header_length(http: httpx.Client) -> None:
    body = {"inputs": [_x(data=None, parameters={"binary_data_size": 256})]}
    del body["inputs"][0]["data"]
    _error(_mlp_request(http, body), 400, "binary_data_size is 256", "only 0 bytes")


def test_bad_bytes_binary(http: httpx.Client) -> None:
    raw = struct.pack("<I", 10) + b"short"
    body, headers = _binary_body({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                              "parameters": {"binary_data_size": len(raw)}}]}, raw)
    _error(http.post("/v2/models/strings/infer", content=body, headers=headers), 400,
           "claims 10 bytes")


def test_json_bytes_must_be_strings(http: httpx.Client) -> None:
    r = http.post("/v2/models/strings/infer", json={
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", 1]}]})
    _error(r, 400, "must be strings")


# ---- limits ------------------------------------------------------------------------------


def test_body_over_the_limit_by_content_length(http: httpx.Client) -> None:
    body = b" " * (MAX_REQUEST_BYTES + 1)
    _error(_mlp_request(http, body), 413, "max_request_bytes")


def test_chunked_body_over_the_limit(http: httpx.Client) -> None:
    chunk = b" " * 65536
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(4 * MAX_REQUEST_BYTES // len(chunk)):
            sent += len(chunk)
            yield chunk

    r = http.post("/v2/models/mlp/infer", content=chunks())
    _error(r, 413, "exceeds http.max_request_bytes")


def test_tensor_elements_over_the_limit(http: httpx.Client) -> None:
    # Refused on the declared shape, before any data is looked at or allocated.
    _error(_mlp_request(http, {"inputs": [_x(shape=[MAX_TENSOR_ELEMENTS, 64], data=[])]}), 413,
           "max_tensor_elements")
    body, headers = _binary_body({"inputs": [{"name": "input", "datatype": "FP32",
                                              "shape": [1 << 40, 64],
                                              "parameters": {"binary_data_size": 4}}]}, b"\0" * 4)
    _error(http.post("/v2/models/mlp/infer", content=body, headers=headers), 413,
           "max_tensor_elements")


def test_header_over_the_limit(http: httpx.Client) -> None:
    _error(http.get("/v2", headers={"X-Big": "x" * (70 * 1024)}), 431, "max_header_bytes")


def test_endless_header_is_cut_off(agent: AgentThread, http: httpx.Client) -> None:
    # A head that never ends is not buffered without end: past the bound the agent answers 431
    # and closes the connection, while the client is still sending.
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):  # the agent closed the connection
            for _ in range(64):  # 16 MiB at most
                sock.sendall(b"y" * (256 * 1024))
                sent += 256 * 1024
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert sent < 16 << 20, "the agent kept reading an endless request head"
    # The answer is lost only if the kernel resets the connection before the client reads it.
    assert not answer or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert not answer or b"max_header_bytes" in answer


# ---- unknown things, methods, auth --------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "status", "words"), [
    ("GET", "/v2/models/nope", 404, ["unknown model 'nope'"]),
    ("GET", "/v2/models/mlp/versions/2", 404, ["version 2 is not loaded"]),
    ("GET", "/v2/models/mlp/versions/latest", 404, ["no version 'latest'"]),
    ("GET", "/v2/models/nope/ready", 404, ["unknown model"]),
    ("GET", "/v2/models/nope/config", 404, ["unknown model"]),
    ("GET", "/v2/models/nope/stats", 404, ["unknown model"]),
    ("POST", "/v2/models/nope/infer", 404, ["unknown model"]),
    ("POST", "/v2/models/mlp/versions/3/infer", 404, ["version 3"]),
    ("GET", "/v3/whatever", 404, ["no such endpoint"]),
    ("GET", "/v2/models/mlp/infer", 405, ["not allowed"]),
    ("POST", "/v2/repository/models/nope/unload", 404, ["not in the configuration"]),
])
def test_unknown_things(http: httpx.Client, method: str, path: str, status: int,
                        words: list[str]) -> None:
    _error(http.request(method, path), status, *words)


def test_repository_bodies(http: httpx.Client) -> None:
    _error(http.post("/v2/repository/index", content=b"[1]"), 400, "JSON object")
    _error(http.post("/v2/repository/index", json={"ready": "yes"}), 400, "true or false")
    ready = http.post("/v2/repository/index", json={"ready": True}).json()
    assert {m["name"] for m in ready} == {"mlp", "multi_io", "strings"}
    _error(http.post("/v2/repository/models/mlp/load", content=b"{"), 400, "not valid JSON")


@pytest.mark.parametrize("auth", [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer wrong-token"])
def test_token_missing_or_wrong(agent: AgentThread, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    for method, path in (("GET", "/v2/health/live"), ("GET", "/metrics"),
                         ("POST", "/v2/models/mlp/infer"),
                         ("POST", "/v2/repository/models/mlp/unload")):
        r = httpx.request(method, agent.url + path, headers=headers)
        _error(r, 401, "token" if auth == "Bearer wrong-token" else "Bearer")
        assert r.headers["www-authenticate"].startswith("Bearer")
