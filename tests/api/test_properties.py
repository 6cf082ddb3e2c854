"""Property-based: generated requests for every HTTP route (JSON bodies, binary framing, BYTES,
paths, headers, incomplete and slow connections) never get a 5xx from their content, and the
agent answers a valid request correctly after each batch.

Bounded for CI (``EDGEAGENT_PROPERTY_EXAMPLES`` examples per test, 60 by default). The long
run, tens of thousands of requests with a status histogram and peak RSS, is
:func:`test_long_run` (``slow``; it runs only with ``EDGEAGENT_LONG_PROPERTIES=N`` requests
per kind, and writes its counts to ``EDGEAGENT_PROPERTY_REPORT`` when set).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import AgentThread, make_config

EXAMPLES = int(os.environ.get("EDGEAGENT_PROPERTY_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])

#: Every status seen, for the report.
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    # Short deadlines, so the incomplete connections below are cleaned up quickly.
    config = make_config(tmp_path_factory.mktemp("properties"), header_timeout_s=0.5,
                         body_timeout_s=0.5, keepalive_timeout_s=2.0)
    running = AgentThread(config).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(agent: AgentThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers=agent.headers, timeout=60) as c:
        yield c
        _valid_answer(c)


def _valid_answer(c: httpx.Client) -> None:
    """The agent answers a valid request, correctly (mlp is deterministic)."""
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64],
                        "data": [0.25] * 128}]}
    r = c.post("/v2/models/mlp/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 10] and out["data"][:10] == out["data"][10:]
    again = c.post("/v2/models/mlp/infer", json=body).json()["outputs"][0]["data"]
    assert again == out["data"]


def _check(r: httpx.Response, what: Any) -> None:
    STATUSES[r.status_code] += 1
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert "error" in r.json(), r.text[:200]


# ---- strategies ------------------------------------------------------------------------------

json_leaf = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
             | st.floats() | st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=5)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                          max_leaves=25)
names = st.sampled_from(["input", "input_a", "input_b", "text", "x", ""]) | st.text(max_size=8)
datatypes = (st.sampled_from(["FP32", "FP16", "FP64", "INT8", "INT32", "INT64", "UINT8",
                              "BOOL", "BYTES"]) | json_value)
dims = st.integers(-3, 70) | st.sampled_from([0, 1, 64, 2 ** 31, 2 ** 63, 10 ** 30])
shapes = st.lists(dims, max_size=6) | st.lists(st.just(1), min_size=30, max_size=80) | json_value
numbers = st.lists(st.floats(allow_nan=False, width=32) | st.integers(-300, 300), max_size=140)
data = numbers | st.lists(st.text(max_size=5), max_size=10) | json_value
models = st.sampled_from(["mlp", "multi_io", "strings"])


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    tensor: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        tensor["name"] = draw(names)
    if draw(st.integers(0, 9)):
        tensor["datatype"] = draw(datatypes)
    if draw(st.integers(0, 9)):
        tensor["shape"] = draw(shapes)
    if draw(st.integers(0, 5)):
        tensor["data"] = draw(data)
    if not draw(st.integers(0, 4)):
        tensor["parameters"] = draw(st.dictionaries(
            st.sampled_from(["binary_data_size", "binary_data", "shared_memory_region"]),
            st.integers(-5, 2 ** 40) | json_value, max_size=2))
    return tensor


@st.composite
def infer_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": draw(st.lists(tensors(), max_size=3) | json_value)}
    if not draw(st.integers(0, 3)):
        body["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": names}, optional={"parameters": json_value}), max_size=3) | json_value)
    if not draw(st.integers(0, 4)):
        body["id"] = draw(json_value)
    if not draw(st.integers(0, 4)):
        body["parameters"] = draw(json_value)
    return body


def _bytes_elements(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.binary(max_size=8), max_size=8))
    raw = b"".join(struct.pack("<I", len(p)) + p for p in parts)
    if draw(st.booleans()):  # a length that lies
        raw = struct.pack("<I", draw(st.integers(0, 2 ** 32 - 1))) + raw
    return raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    model = draw(models)
    blobs = []
    header_inputs = []
    for tensor in draw(st.lists(tensors(), min_size=1, max_size=3)):
        blob = (_bytes_elements(draw) if tensor.get("datatype") == "BYTES"
                else draw(st.binary(max_size=600)))
        if draw(st.integers(0, 3)):
            tensor.pop("data", None)
            size = len(blob) if draw(st.integers(0, 3)) else draw(st.integers(-2, 2000))
            tensor["parameters"] = {"binary_data_size": size}
        blobs.append(blob)
        header_inputs.append(tensor)
    head_doc: dict[str, Any] = {"inputs": header_inputs}
    if draw(st.booleans()):
        head_doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    head = json.dumps(head_doc).encode()
    length = draw(st.sampled_from([str(len(head)), str(len(head) - 1), "0", "-1", "x", "",
                                   "9" * 30, str(len(head) + 5)]))
    return model, head + b"".join(blobs), {"Inference-Header-Content-Length": length}


ROUTES = ["", "/ready", "/config", "/stats", "/infer"]
versions = (st.none() | st.sampled_from(["1", "2", "0", "01", "-1", "\u0661", "\u00b2", "1.0",
                                         "9" * 30, "9" * 5000, "latest", ""])
            | st.text(max_size=10))


@st.composite
def paths(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.sampled_from(["/v2", "/v2/health/live", "/v2/health/ready",
                                     "/v2/models/stats", "/metrics", "/v1/agent/status",
                                     "/v2/repository/index"]))
    if kind == 1:  # loading is idempotent; unloading only what is not served (kept serving)
        action = draw(st.sampled_from(["load", "unload"]))
        name = draw((models if action == "load" else st.nothing()) | st.text(max_size=12).filter(
            lambda n: n not in ("mlp", "multi_io", "strings")))
        return f"/v2/repository/models/{quote(name, safe='')}/{action}"
    name = draw(models | st.text(min_size=1, max_size=12))
    version = draw(versions)
    path = f"/v2/models/{quote(name, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    return path + draw(st.sampled_from(ROUTES))


header_names = st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                     exclude_characters=":()<>@,;\\\"/[]?={}"),
                       min_size=1, max_size=20)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(
    str.strip)  # a client sends no leading or trailing blanks (h11 refuses them)
headers = st.dictionaries(header_names, header_values, max_size=4).filter(
    lambda h: not {k.lower() for k in h} & {"authorization", "content-length", "host",
                                            "transfer-encoding", "connection", "expect",
                                            "upgrade"})


# ---- properties ------------------------------------------------------------------------------


def _json_infer(client: httpx.Client, model: str, body: dict[str, Any]) -> None:
    # The stdlib writes NaN and Infinity literals: the parser's fallback path is exercised too.
    raw = json.dumps(body).encode()
    _check(client.post(f"/v2/models/{model}/infer", content=raw), body)


def _raw_bodies(client: httpx.Client, model: str, raw: bytes) -> None:
    _check(client.post(f"/v2/models/{model}/infer", content=raw), raw[:200])
    _check(client.post("/v2/repository/index", content=raw), raw[:200])


def _binary(client: httpx.Client, request: tuple[str, bytes, dict[str, str]]) -> None:
    model, body, extra = request
    _check(client.post(f"/v2/models/{model}/infer", content=body, headers=extra), body[:300])


def _paths(client: httpx.Client, path: str, method: str, extra: dict[str, str],
           body: bytes | None) -> None:
    r = client.request(method, path, headers=extra, content=body)
    STATUSES[r.status_code] += 1
    assert r.status_code < 500, (method, path, extra, r.status_code, r.text[:300])


def _connect(agent: AgentThread) -> socket.socket:
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _valid_raw(agent: AgentThread) -> bytes:
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": [0.5] * 64}]}).encode()
    return (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {agent.token}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


def _incomplete(agent: AgentThread, client: httpx.Client, cut: float, wait: bool,
                trickle: int) -> None:
    raw = _valid_raw(agent)
    prefix = raw[: int(len(raw) * cut)]
    with _connect(agent) as sock:
        sock.sendall(prefix)
        for _ in range(trickle):  # a few more bytes, slowly
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
            time.sleep(0.05)
        if wait:  # held open: the agent must close it (after its deadline)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
            if answer:
                STATUSES[int(answer[9:12])] += 1
    # Whatever that connection did, the agent serves the next one.
    _check(client.get("/v2/health/live"), "live")


KINDS: dict[str, tuple[Callable[..., None], dict[str, Any], float]] = {
    # name: (property, strategies, share of the examples)
    "json_infer": (_json_infer, {"model": models, "body": infer_bodies()}, 1.0),
    "raw_bodies": (_raw_bodies, {"model": models, "raw": st.binary(max_size=300) | json_value.map(
        lambda v: json.dumps(v).encode())}, 1.0),
    "binary_framing": (_binary, {"request": binary_requests()}, 1.0),
    "paths_methods_headers": (_paths, {
        "path": paths(), "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]),
        "extra": headers, "body": st.none() | st.binary(max_size=100)}, 1.0),
    "incomplete_connections": (_incomplete, {
        "cut": st.floats(0.0, 0.999), "wait": st.booleans(), "trickle": st.integers(0, 3)},
        1 / 3),
}


def _property(kind: str, examples: int) -> Callable[..., None]:
    fn, strategies, share = KINDS[kind]
    return settings(SETTINGS, max_examples=max(3, int(examples * share)))(
        given(**strategies)(fn))


test_json_infer_bodies = _property("json_infer", EXAMPLES)
test_raw_bodies = _property("raw_bodies", EXAMPLES)
test_binary_framing = _property("binary_framing", EXAMPLES)
test_paths_methods_and_headers = _property("paths_methods_headers", EXAMPLES)
test_incomplete_and_slow_connections = _property("incomplete_connections", EXAMPLES)


# ---- the long run ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.skipif(not os.environ.get("EDGEAGENT_LONG_PROPERTIES"),
                    reason="the long run: set EDGEAGENT_LONG_PROPERTIES=N (examples per kind)")
def test_long_run(agent: AgentThread, client: httpx.Client) -> None:
    n = int(os.environ["EDGEAGENT_LONG_PROPERTIES"])
    STATUSES.clear()
    started = time.monotonic()
    for kind in KINDS:
        run = _property(kind, n if kind != "incomplete_connections" else n // 10)
        if kind == "incomplete_connections":
            run(agent=agent, client=client)
        else:
            run(client=client)
        _valid_answer(client)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {"requests": sum(STATUSES.values()), "statuses": dict(sorted(STATUSES.items())),
              "5xx": sum(v for k, v in STATUSES.items() if k >= 500),
              "peak_rss_mib": round(rss_kib / 1024, 1),
              "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(report))
    if os.environ.get("EDGEAGENT_PROPERTY_REPORT"):
        Path(os.environ["EDGEAGENT_PROPERTY_REPORT"]).write_text(json.dumps(report, indent=1))
    assert report["5xx"] == 0
