"""HTTP inference beyond plain JSON and binary tensors: Triton's raw binary request, gzip and
deflate bodies both ways (a zip bomb gets 413, not an allocation), and the request parameters
edgeagent honours (priority, timeout) or refuses."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as tc

from tests.api.conftest import MAX_REQUEST_BYTES, AgentThread


@pytest.fixture
def http(agent: AgentThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers=agent.headers, timeout=30) as c:
        yield c


def _mlp_json(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                   "shape": list(x.shape), "data": x.reshape(-1).tolist()}],
                       "outputs": [{"name": "logits"}]}).encode()


def _logits(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def test_raw_binary_request(http: httpx.Client) -> None:
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    r = http.post("/v2/models/mlp/infer", content=x.tobytes(),
                  headers={"Inference-Header-Content-Length": "0",
                           "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    head = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.content[:head])
    assert header["outputs"][0]["shape"] == [3, 10]
    got = np.frombuffer(r.content[head:], np.float32).reshape(3, 10)
    np.testing.assert_array_equal(got, _logits(http.post("/v2/models/mlp/infer",
                                                         content=_mlp_json(x))))


@pytest.mark.parametrize(("model", "body", "words"), [
    ("mlp", b"\0" * 100, ["takes a multiple of 256 bytes", "has 100"]),
    ("multi_io", b"\0" * 24, ["needs a model with one input", "has 2"]),
    ("strings", b"abc", ["cannot carry the BYTES input"]),
])
def test_raw_binary_request_that_does_not_fit(http: httpx.Client, model: str, body: bytes,
                                              words: list[str]) -> None:
    r = http.post(f"/v2/models/{model}/infer", content=body,
                  headers={"Inference-Header-Content-Length": "0"})
    assert r.status_code == 400, r.text
    for word in words:
        assert word in r.json()["error"]


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_compressed_request_bodies(http: httpx.Client, coding: str) -> None:
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    body = _mlp_json(x)
    packed = {"gzip": gzip.compress, "deflate": zlib.compress,
              "raw-deflate": lambda b: zlib.compress(b, wbits=-15)}[coding](body)
    r = http.post("/v2/models/mlp/infer", content=packed,
                  headers={"Content-Encoding": "deflate" if coding == "raw-deflate" else coding})
    np.testing.assert_array_equal(_logits(r), _logits(http.post("/v2/models/mlp/infer",
                                                                content=body)))


@pytest.mark.parametrize(("coding", "body", "status", "words"), [
    ("br", b"x", 400, ["Content-Encoding 'br' is not supported"]),
    ("gzip", b"not gzip at all", 400, ["not valid gzip data"]),
    ("deflate", b"\x78\x9c garbage", 400, ["not valid deflate data"]),
    ("gzip", gzip.compress(b"{}")[:-6], 400, ["not valid gzip data"]),
    # 64 MiB of zeros in ~64 KiB: refused once the inflated size passes the limit (1 MiB).
    ("gzip", gzip.compress(bytes(64 << 20), 9), 413, ["inflates past http.max_request_bytes"]),
])
def test_bad_compressed_bodies(http: httpx.Client, coding: str, body: bytes, status: int,
                               words: list[str]) -> None:
    r = http.post("/v2/models/mlp/infer", content=body, headers={"Content-Encoding": coding})
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.json()["error"]
    assert str(MAX_REQUEST_BYTES) in r.json()["error"] or status != 413


@pytest.mark.parametrize(("accept", "coding"), [
    ("gzip", "gzip"), ("deflate", "deflate"), ("br;q=1, gzip;q=0.5", "gzip"),
    ("gzip;q=0, deflate", "deflate"), ("br", None), ("identity", None)])
def test_compressed_responses(agent: AgentThread, accept: str, coding: str | None) -> None:
    x = np.ones((2, 64), np.float32)
    # httpx would inflate the body itself: read it raw.
    with httpx.Client(base_url=agent.url, headers=agent.headers, timeout=30) as c:
        request = c.build_request("POST", "/v2/models/mlp/infer", content=_mlp_json(x),
                                  headers={"Accept-Encoding": accept})
        r = c.send(request, stream=True)
        raw = b"".join(r.iter_raw())
        r.close()
    assert r.status_code == 200
    assert r.headers.get("Content-Encoding") == coding
    assert int(r.headers["Content-Length"]) == len(raw)
    plain = {"gzip": gzip.decompress, "deflate": zlib.decompress, None: bytes}[coding](raw)
    assert json.loads(plain)["outputs"][0]["shape"] == [2, 10]


def test_tritonclient_compression_and_parameters(agent: AgentThread) -> None:
    """tritonclient's own compression options, and the priority and timeout it sends."""
    x = np.random.default_rng(8).standard_normal((1, 64)).astype(np.float32)
    with tc.InferenceServerClient(agent.url.removeprefix("http://")) as client:
        inp = tc.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x)
        plain = client.infer("mlp", [inp], headers=agent.headers).as_numpy("logits")
        for algorithm in ("gzip", "deflate"):
            got = client.infer("mlp", [inp], headers=agent.headers,
                               request_compression_algorithm=algorithm,
                               response_compression_algorithm=algorithm,
                               priority=1, timeout=10_000_000).as_numpy("logits")
            np.testing.assert_array_equal(got, plain)
