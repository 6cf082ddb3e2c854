"""The tensor codec and the error map, in-process: tritonclient's own serialisers as the
reference for the binary format."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from edgeagent.api import codec
from edgeagent.api.codec import (
    InferRequest,
    RequestedOutput,
    decode_request,
    encode_response,
    header_length,
)
from edgeagent.api.errors import BadRequest, PayloadTooLarge, error_response, status_of
from edgeagent.errors import (
    EdgeAgentError,
    InferenceError,
    InferenceInputError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
)

FIXED = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
         "FP16", "FP32", "FP64"]


def _sample(datatype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if datatype == "BOOL":
        return rng.integers(0, 2, (2, 3)).astype(bool)
    if datatype.startswith(("INT", "UINT")):
        return rng.integers(0, 100, (2, 3)).astype(datatype.lower())
    return rng.standard_normal((2, 3)).astype({"FP16": np.float16, "FP32": np.float32,
                                               "FP64": np.float64}[datatype])


def _binary(header: dict[str, Any], *buffers: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(buffers), len(head)


@pytest.mark.parametrize("datatype", FIXED)
def test_binary_input_is_a_view_of_the_body(datatype: str) -> None:
    arr = _sample(datatype)
    body, n = _binary({"inputs": [{"name": "t", "datatype": datatype, "shape": [2, 3],
                                   "parameters": {"binary_data_size": arr.nbytes}}]},
                      arr.tobytes())
    buf = bytearray(body)
    req = decode_request(buf, n, 100)
    got = req.inputs["t"]
    np.testing.assert_array_equal(got, arr)
    assert np.shares_memory(got, np.frombuffer(buf, dtype=np.uint8))  # no copy


@pytest.mark.parametrize("datatype", FIXED)
def test_json_input_and_both_output_encodings(datatype: str) -> None:
    arr = _sample(datatype)
    req = decode_request(json.dumps({"inputs": [{"name": "t", "datatype": datatype,
                                                 "shape": [2, 3],
                                                 "data": arr.tolist()}]}).encode(), None, 100)
    np.testing.assert_array_equal(req.inputs["t"], arr)
    assert req.inputs["t"].dtype == arr.dtype
    as_json = encode_response("m", 3, InferRequest(None, {}, (), False), {"t": arr})
    assert as_json.media_type == "application/json"
    assert not as_json.headers
    out = json.loads(as_json.body)["outputs"][0]
    assert out["datatype"] == datatype
    assert out["shape"] == [2, 3]
    np.testing.assert_array_equal(np.array(out["data"], dtype=arr.dtype).reshape(2, 3), arr)
    as_binary = encode_response("m", 3, InferRequest(None, {}, (), True), {"t": arr})
    n = int(as_binary.headers["Inference-Header-Content-Length"])
    header = json.loads(as_binary.body[:n])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == arr.nbytes
    np.testing.assert_array_equal(np.frombuffer(as_binary.body[n:], arr.dtype).reshape(2, 3), arr)


def test_bytes_match_tritonclient_serialisation() -> None:
    words = np.array([b"a", b"", "é".encode(), b"\x00\xff"], dtype=object)
    raw = serialize_byte_tensor(words).item()  # tritonclient gives a 0-d object array
    body, n = _binary({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2, 2],
                                   "parameters": {"binary_data_size": len(raw)}}]}, raw)
    got = decode_request(body, n, 100).inputs["s"]
    assert got.shape == (2, 2)
    assert list(got.reshape(-1)) == list(words)
    enc = encode_response("m", 1, InferRequest(None, {}, (RequestedOutput("s", True),), False),
                          {"s": got})
    n = int(enc.headers["Inference-Header-Content-Length"])
    assert list(deserialize_bytes_tensor(enc.body[n:])) == list(words)
    # Not UTF-8 cannot go out as JSON.
    with pytest.raises(BadRequest, match="not UTF-8"):
        encode_response("m", 1, InferRequest(None, {}, (), False), {"s": got})


def test_requested_outputs_and_id() -> None:
    req = decode_request(json.dumps({
        "id": "x1", "inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "b", "parameters": {"binary_data": False}}, {"name": "c"}],
    }).encode(), None, 10)
    assert req.id == "x1"
    assert req.output_names == ["b", "c"]
    assert not req.wants_binary("b")
    assert not req.wants_binary("c")
    assert req.wants_binary("not-listed")  # the request-wide default
    head = json.loads(encode_response("m", 1, req, {"b": np.zeros(1, np.float32)}).body)
    assert head["id"] == "x1"
    assert head["model_version"] == "1"


@pytest.mark.parametrize(("value", "ok"), [(None, True), ("5", True), ("10", True),
                                           ("0", True), ("-1", False), ("11", False),
                                           ("1e3", False), ("", False)])
def test_header_length(value: str | None, ok: bool) -> None:
    if ok:
        assert header_length(value, 10) == (int(value) if value else None)
    else:
        with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
            header_length(value, 10)


def test_element_limit_is_checked_before_allocating() -> None:
    body, n = _binary({"inputs": [{"name": "t", "datatype": "FP64", "shape": [1 << 31, 1 << 31],
                                   "parameters": {"binary_data_size": 8}}]}, b"\0" * 8)
    with pytest.raises(PayloadTooLarge, match="max_tensor_elements"):
        decode_request(body, n, 1000)


@pytest.mark.parametrize(("exc", "status"), [
    (BadRequest("x"), 400), (InferenceInputError("x"), 400), (PayloadTooLarge("x"), 413),
    (ModelNotFound("x"), 404), (ModelNotReady("x"), 503), (Overloaded("x"), 503),
    (InferenceError("x"), 500), (EdgeAgentError("x"), 500),
])
def test_status_map(exc: EdgeAgentError, status: int) -> None:
    assert status_of(exc) == status
    response = error_response(exc)
    assert response.status_code == status
    assert json.loads(bytes(response.body)) == {"error": "x"}


def test_overloaded_says_when_to_retry() -> None:
    response = error_response(Overloaded("queue full", retry_after_s=2.5))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"


# ---- large JSON bodies: the simdjson path decodes exactly as the general one ----------------


def _decoded(body: bytes, monkeypatch: pytest.MonkeyPatch, simd: bool) -> Any:
    """decode_request's result (or its error message) with the simdjson path on or off."""
    monkeypatch.setattr(codec, "SIMD_MIN_BYTES", 0 if simd else 1 << 62)
    try:
        req = decode_request(bytearray(body), None, 1 << 30)
    except BadRequest as exc:
        return f"BadRequest: {exc}"
    return {name: (arr.dtype.str, arr.shape, arr.tolist() if arr.dtype == object else arr.tobytes())
            for name, arr in req.inputs.items()}


def _body(datatype: str, shape: list[int], data: Any, extra: str = "") -> bytes:
    return (f'{{"id":"x","inputs":[{{"name":"x","datatype":"{datatype}",'
            f'"shape":{json.dumps(shape)},"data":{data}{extra}}}]}}').encode()


@pytest.mark.parametrize("body", [
    _body("FP32", [2, 3], json.dumps([0.1, 2, -3.5e-8, 1e30, 4, 5.25])),
    _body("FP16", [3], "[0.1, 65504, 1e-7]"),
    _body("FP64", [2], "[0.1, 1e300]"),
    _body("FP32", [2, 2], "[[1, 2], [3, 4]]"),           # nested
    _body("FP32", [3], "[[1, 2], [3]]"),                # ragged
    _body("FP32", [1, 1], "[[1]]"),
    _body("FP32", [2], "[1, true]"),                    # a bool among floats
    _body("FP32", [2], "[1, NaN]"),                     # not JSON; the stdlib takes it
    _body("FP32", [3], "[1, 2]"),                       # too few values
    _body("FP32", [2], '[1, "2"]'),
    _body("FP32", [2], "[1, 1e400]"),
    _body("INT8", [3], "[-128, 0, 127]"),
    _body("INT8", [2], "[1, 300]"),                     # out of range
    _body("INT32", [2], "[1, 2.5]"),                    # a float for an integer type
    _body("UINT8", [2], "[1, -1]"),
    _body("UINT64", [2], "[0, 18446744073709551615]"),
    _body("INT64", [2], "[-9223372036854775808, 9223372036854775807]"),
    _body("INT64", [1], "[9223372036854775808]"),
    _body("BOOL", [2], "[true, false]"),
    _body("BYTES", [2], '["a", "b"]'),
    _body("FP32", [0], "[]"),
    _body("FP32", [2], '{"a": 1}'),
    _body("FP32", [2], "[1, 2]", ', "parameters": {"binary_data_size": 8}'),
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]]}',  # broken
    b'[1, 2]',
], ids=lambda b: b.decode()[:80])
def test_large_json_paths_agree(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _decoded(body, monkeypatch, simd=True) == _decoded(body, monkeypatch, simd=False)


def test_large_json_image_takes_the_simd_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # An image-sized FP32 tensor reaches _from_json as a float64 array, not a list of floats,
    # and comes out exactly as numpy converts the same Python floats.
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    body = _body("FP32", list(x.shape), json.dumps(x.reshape(-1).tolist()))
    header = codec._parse_large(body)
    assert header is not None and isinstance(header["inputs"][0]["data"], np.ndarray)
    req = decode_request(bytearray(body), None, 1 << 30)
    np.testing.assert_array_equal(req.inputs["x"], x)
    assert req.id == "x"
