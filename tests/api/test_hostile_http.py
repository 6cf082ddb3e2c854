"""Hostile request content, from outside, against a running agent: every one gets a 4xx (never a
500), nothing large is allocated before the request is refused, and the agent keeps serving.

Each case here was a 500 (or a large allocation) on main before issue 13; the property-based
suite (``test_properties.py``) generates many more of the same kinds.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from edgeagent.api.codec import decode_request
from edgeagent.api.errors import BadRequest
from tests.api.conftest import MAX_BYTES_ELEMENTS, AgentThread


@pytest.fixture
def http(agent: AgentThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers=agent.headers, timeout=30) as c:
        yield c
        # Whatever the test sent, the agent still answers a valid request, correctly.
        r = c.post("/v2/models/mlp/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [1, 10]


def _refused(r: httpx.Response, *words: str, status: tuple[int, ...] = (400,)) -> str:
    assert r.status_code in status, (r.status_code, r.text[:300])
    message = r.json()["error"]
    for word in words:
        assert word in message, message
    return str(message)


DEEP = b"[" * 5000 + b"]" * 5000
DEEP_OBJECT = b'{"a":' * 3000 + b"1" + b"}" * 3000
HUGE_INT = b'{"inputs": [], "x": ' + b"7" * 5000 + b"}"
# A NaN literal sends the body past orjson to the stdlib parser, where the limits used to fail.
HUGE_INT_STDLIB = b'{"n": NaN, "inputs": [], "x": ' + b"7" * 5000 + b"}"
DEEP_STDLIB = b'{"n": NaN, "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"


# ---- versions in the path ----------------------------------------------------------------


VERSIONS = ["\u0661",  # ARABIC-INDIC DIGIT ONE: str.isdigit() says yes, int() says no
            "\u00b2",  # SUPERSCRIPT TWO: isdigit() yes, int() raises
            "9" * 5000,  # past Python's 4,300-digit integer parsing limit
            "1" * 40]  # far past any version


@pytest.mark.parametrize("version", VERSIONS, ids=["arabic", "superscript", "5000", "40"])
@pytest.mark.parametrize(("method", "suffix"), [
    ("GET", ""), ("GET", "/ready"), ("GET", "/config"), ("GET", "/stats"), ("POST", "/infer")])
def test_odd_versions_in_the_path_are_404(http: httpx.Client, version: str, method: str,
                                          suffix: str) -> None:
    r = http.request(method, f"/v2/models/mlp/versions/{version}{suffix}",
                     content=b'{"inputs": []}' if method == "POST" else None)
    _refused(r, "version", status=(404,))


# ---- JSON that the parsers refuse at their limits ----------------------------------------


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT, HUGE_INT, HUGE_INT_STDLIB, DEEP_STDLIB],
                         ids=["deep-list", "deep-object", "huge-int", "huge-int-stdlib",
                              "deep-stdlib"])
@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/repository/index"])
def test_json_at_the_parsers_limits_is_400(http: httpx.Client, body: bytes, path: str) -> None:
    _refused(http.post(path, content=body), "JSON")


def test_deep_nesting_in_a_binary_header_is_400(http: httpx.Client) -> None:
    head = b'{"n": NaN, "inputs": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    r = http.post("/v2/models/mlp/infer", content=head,
                  headers={"Inference-Header-Content-Length": str(len(head))})
    _refused(r, "JSON")


def test_deep_data_is_400(http: httpx.Client) -> None:
    data = json.loads("[" * 200 + "0.5" + "]" * 200)
    r = http.post("/v2/models/mlp/infer", json={
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": data}]})
    _refused(r)


# ---- shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    [1] * 65, [1] * 33, [0] * 100,
    [0, 1 << 62, 1 << 62], [0, 1 << 70], [0, 10 ** 30],
    [1 << 63, 0],
])
def test_odd_shapes_are_refused(http: httpx.Client, shape: list[int]) -> None:
    for datatype, name, model in (("FP32", "input", "mlp"), ("BYTES", "text", "strings")):
        r = http.post(f"/v2/models/{model}/infer", json={"inputs": [
            {"name": name, "datatype": datatype, "shape": shape, "data": []}]})
        _refused(r, "shape", status=(400, 413))
        head = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                       "parameters": {"binary_data_size": 0}}]}).encode()
        r = http.post(f"/v2/models/{model}/infer", content=head,
                      headers={"Inference-Header-Content-Length": str(len(head))})
        _refused(r, "shape", status=(400, 413))


def test_the_dimension_limit_is_in_the_message(http: httpx.Client) -> None:
    r = http.post("/v2/models/mlp/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1] * 40, "data": [0.5]}]})
    _refused(r, "dimensions", "32")


# ---- BYTES ---------------------------------------------------------------------------------


def _binary_bytes(shape: list[int], raw: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape,
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def test_bytes_count_is_checked_against_the_data_before_allocating(
        agent: AgentThread, http: httpx.Client) -> None:
    # ~100 bytes declaring as many BYTES elements as allowed: each element needs 4 bytes of
    # length at least, so this is refused on sizes alone, with no array allocated.
    body, headers = _binary_bytes([MAX_BYTES_ELEMENTS], struct.pack("<I", 1) + b"a")
    _refused(http.post("/v2/models/strings/infer", content=body, headers=headers),
             "at least 4 bytes")


@pytest.mark.parametrize("datatype", ["BYTES", "FP32"])
def test_a_small_body_declaring_a_huge_tensor_allocates_nothing(datatype: str) -> None:
    # The codec alone, with the default limits: a ~100-byte request declaring 64 Mi elements
    # (on main: 512 MiB allocated for the BYTES array before the refusal).
    head = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [64 << 20],
                                   "parameters": {"binary_data_size": 5}}]}).encode()
    body = head + struct.pack("<I", 1) + b"a"
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest):
            decode_request(body, len(head), 64 << 20, max_bytes_elements=64 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_bytes_element_count_has_its_own_limit(http: httpx.Client) -> None:
    n = 20_001  # over the test agent's http.max_bytes_elements (20,000)
    raw = struct.pack("<I", 0) * n
    body, headers = _binary_bytes([n], raw)
    _refused(http.post("/v2/models/strings/infer", content=body, headers=headers),
             "max_bytes_elements", status=(413,))
    r = http.post("/v2/models/strings/infer", json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [n], "data": [""] * n}]})
    _refused(r, "max_bytes_elements", status=(413,))


@pytest.mark.parametrize("text", ["\\ud800", "a\\udfffb", "\\udc00\\ud800"])
def test_lone_surrogates_in_json_bytes_are_400(http: httpx.Client, text: str) -> None:
    body = ('{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
            f'"data": ["{text}"]}}]}}').encode()
    _refused(http.post("/v2/models/strings/infer", content=body), "UTF-8")


def test_lone_surrogate_in_an_id_is_answered(http: httpx.Client) -> None:
    body = (b'{"id": "\\ud800", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],'
            b' "data": ["x"]}]}')
    r = http.post("/v2/models/strings/infer", content=body)
    _refused(r, "id")


# ---- the large-body path (simdjson) ------------------------------------------------------


def _large(tensor: dict[str, Any]) -> bytes:
    body = json.dumps({"inputs": [tensor], "pad": "x" * (300 * 1024)}).encode()
    assert len(body) > 256 * 1024
    return body


@pytest.mark.parametrize("datatype", [["FP32"], {"a": 1}, 7, None, True])
def test_large_body_with_a_non_string_datatype_is_400(http: httpx.Client, datatype: Any) -> None:
    body = _large({"name": "input", "datatype": datatype, "shape": [1, 64], "data": [0.5] * 64})
    _refused(http.post("/v2/models/mlp/infer", content=body), "datatype")


def test_large_body_nested_deeply_is_400(http: httpx.Client) -> None:
    body = b'{"pad": "' + b"x" * (300 * 1024) + b'", "inputs": ' + DEEP + b"}"
    _refused(http.post("/v2/models/mlp/infer", content=body), "JSON")


def test_large_body_with_deep_data_is_400(http: httpx.Client) -> None:
    data = b"[" * 2000 + b"0.5" + b"]" * 2000
    body = (b'{"pad": "' + b"x" * (300 * 1024) + b'", "inputs": [{"name": "input", '
            b'"datatype": "FP32", "shape": [1, 64], "data": ' + data + b"}]}")
    _refused(http.post("/v2/models/mlp/infer", content=body))


# ---- integers in other places ------------------------------------------------------------


def test_huge_binary_data_size_is_400(http: httpx.Client) -> None:
    head = (b'{"n": NaN, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], '
            b'"parameters": {"binary_data_size": ' + b"9" * 4000 + b"}}]}")
    r = http.post("/v2/models/mlp/infer", content=head,
                  headers={"Inference-Header-Content-Length": str(len(head))})
    _refused(r)


def test_huge_header_length_is_400(http: httpx.Client) -> None:
    r = http.post("/v2/models/mlp/infer", content=b"{}",
                  headers={"Inference-Header-Content-Length": "9" * 5000})
    _refused(r, "Inference-Header-Content-Length")
    r = http.post("/v2/models/mlp/infer", content=b"{}",
                  headers={b"Inference-Header-Content-Length": "\u0661".encode()})
    _refused(r, "Inference-Header-Content-Length")


def test_odd_content_length_is_400(agent: AgentThread) -> None:
    import socket

    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    auth = f"Authorization: Bearer {agent.token}\r\n".encode()
    for value in (b"9" * 5000, b"\xd9\xa1", b"-1", b"1e3"):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n" + auth
                         + b"Content-Length: " + value + b"\r\n\r\n{}")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
        assert answer.startswith(b"HTTP/1.1 4"), (value[:20], answer[:200])
