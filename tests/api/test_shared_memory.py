"""Triton's system shared memory extension over HTTP and gRPC, with Triton's own clients and
``tritonclient.utils.shared_memory``: tensors in and out of a region, and every bound refused
with a clear error while the agent keeps serving."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tcg
import tritonclient.http as tch
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from edgeagent.runtime.shm import SHM_ROOT
from tests.api.conftest import AgentThread
from tests.api.test_tritonclient_grpc import AioClient


@dataclass
class Transport:
    """One of Triton's clients, with what differs between them."""

    kind: str
    client: Any
    tc: Any
    headers: dict[str, str]
    bad_input: str
    """The status a bad request gets on this transport."""


@pytest.fixture(params=["http", "grpc", "grpc-aio"])
def transport(request: pytest.FixtureRequest, agent: AgentThread) -> Iterator[Transport]:
    if request.param == "http":
        t = Transport("http", tch.InferenceServerClient(agent.url.removeprefix("http://")), tch,
                      agent.headers, "400")
    else:
        client: Any = (tcg.InferenceServerClient(agent.grpc_url) if request.param == "grpc"
                       else AioClient(agent.grpc_url))
        t = Transport("grpc", client, tcg, {"authorization": f"Bearer {agent.token}"},
                      "StatusCode.INVALID_ARGUMENT")
    try:
        yield t
    finally:
        t.client.unregister_system_shared_memory(headers=t.headers)
        t.client.close()


@pytest.fixture
def regions() -> Iterator[list[Any]]:
    """Shared memory objects made by the test, destroyed at its end."""
    made: list[Any] = []
    yield made
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _region(regions: list[Any], size: int) -> tuple[str, Any]:
    key = f"/edgeagent-test-{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, size)
    regions.append(handle)
    return key, handle


def _refused(t: Transport, words: str, call: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(*args, headers=t.headers, **kwargs)
    assert words in str(info.value), str(info.value)


def _mlp_reference(t: Transport, x: np.ndarray) -> np.ndarray:
    inp = t.tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out: np.ndarray = t.client.infer("mlp", [inp], headers=t.headers).as_numpy("logits")
    return out


def test_inputs_and_outputs_in_shared_memory(transport: Transport, regions: list[Any]) -> None:
    t = transport
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    in_key, in_handle = _region(regions, x.nbytes + 128)
    out_key, out_handle = _region(regions, 3 * 10 * 4 + 64)
    shm.set_shared_memory_region(in_handle, [x], offset=128)
    t.client.register_system_shared_memory("in", in_key, x.nbytes + 128, headers=t.headers)
    t.client.register_system_shared_memory("out", out_key, 3 * 10 * 4 + 64, headers=t.headers)
    status = t.client.get_system_shared_memory_status(headers=t.headers)
    if t.kind == "http":
        assert {(r["name"], r["key"], r["byte_size"]) for r in status} == {
            ("in", in_key, x.nbytes + 128), ("out", out_key, 3 * 10 * 4 + 64)}
    else:
        assert {(n, r.key, r.byte_size) for n, r in status.regions.items()} == {
            ("in", in_key, x.nbytes + 128), ("out", out_key, 3 * 10 * 4 + 64)}

    inp = t.tc.InferInput("input", [3, 64], "FP32")
    inp.set_shared_memory("in", x.nbytes, offset=128)
    out = t.tc.InferRequestedOutput("logits")
    out.set_shared_memory("out", 3 * 10 * 4, offset=64)
    result = t.client.infer("mlp", [inp], outputs=[out], headers=t.headers)
    meta = result.get_output("logits")
    if t.kind == "http":
        assert meta == {"name": "logits", "datatype": "FP32", "shape": [3, 10]}
    else:
        assert meta.parameters["shared_memory_region"].string_param == "out"
    got = shm.get_contents_as_numpy(out_handle, np.float32, [3, 10], offset=64)
    np.testing.assert_array_equal(got, _mlp_reference(t, x))


def test_bytes_tensors_in_shared_memory(transport: Transport, regions: list[Any]) -> None:
    t = transport
    words = np.array([b"hello", b"", "héllo".encode()], dtype=object)
    data = np.frombuffer(serialize_byte_tensor(words).item(), np.uint8)
    key, handle = _region(regions, data.nbytes)
    shm.set_shared_memory_region(handle, [data])
    t.client.register_system_shared_memory("text", key, data.nbytes, headers=t.headers)
    inp = t.tc.InferInput("text", [3], "BYTES")
    inp.set_shared_memory("text", data.nbytes)
    got = t.client.infer("strings", [inp], headers=t.headers).as_numpy("echo")
    assert [g if isinstance(g, bytes) else g.encode() for g in got.reshape(-1)] == list(words)


def test_bad_registrations_are_refused(transport: Transport, regions: list[Any]) -> None:
    t = transport
    key, _ = _region(regions, 256)
    register = t.client.register_system_shared_memory
    _refused(t, "past the end of shared memory object", register, "big", key, 512)
    _refused(t, "past the end", register, "off", key, 200, offset=100)
    _refused(t, "no shared memory object", register, "gone", "/edgeagent-test-none", 16)
    _refused(t, "one name, as shm_open takes it", register, "evil", "/../etc/passwd", 16)
    _refused(t, "one name", register, "evil", "/a/b", 16)
    register("r", key, 256, headers=t.headers)
    _refused(t, "already registered", register, "r", key, 256)
    _refused(t, "no shared memory region 'nope'",
             t.client.get_system_shared_memory_status, region_name="nope")
    t.client.unregister_system_shared_memory("nope", headers=t.headers)  # not an error
    t.client.unregister_system_shared_memory("r", headers=t.headers)
    register("r", key, 256, headers=t.headers)  # the name is free again


def test_bad_references_in_requests_are_refused(transport: Transport, regions: list[Any]) -> None:
    t = transport
    x = np.ones((1, 64), np.float32)
    key, handle = _region(regions, 256)
    shm.set_shared_memory_region(handle, [x])
    t.client.register_system_shared_memory("r", key, 256, headers=t.headers)

    def infer_with(region: str, size: int, offset: int = 0, out: tuple[int, int] | None = None
                   ) -> Any:
        inp = t.tc.InferInput("input", [1, 64], "FP32")
        inp.set_shared_memory(region, size, offset=offset)
        outputs = None
        if out is not None:
            requested = t.tc.InferRequestedOutput("logits")
            requested.set_shared_memory("r", out[0], offset=out[1])
            outputs = [requested]
        return t.client.infer("mlp", [inp], outputs=outputs, headers=t.headers)

    for args, words in [(("nope", 256), "no shared memory region 'nope'"),
                        (("r", 256, 4), "past the end of shared memory region 'r'"),
                        (("r", 128), "128 bytes of data"),
                        (("r", 256, 0, (8, 0)), "more than the 8 bytes given"),
                        (("r", 256, 0, (40, 240)), "past the end")]:
        with pytest.raises(InferenceServerException) as info:
            infer_with(*args)  # type: ignore[arg-type]
        assert words in str(info.value), (args, str(info.value))
        assert str(info.value.status()) == t.bad_input
    # Still serving, from the same region.
    assert infer_with("r", 256).as_numpy("logits").shape == (1, 10)


def test_a_region_shrunk_after_registration_is_refused_not_read(
        transport: Transport, regions: list[Any]) -> None:
    t = transport
    key, _ = _region(regions, 256)
    t.client.register_system_shared_memory("r", key, 256, headers=t.headers)
    os.truncate(SHM_ROOT / key[1:], 16)  # reading past the end would fault the agent
    inp = t.tc.InferInput("input", [1, 64], "FP32")
    inp.set_shared_memory("r", 256)
    with pytest.raises(InferenceServerException, match="was shrunk to 16 bytes"):
        t.client.infer("mlp", [inp], headers=t.headers)
    assert _mlp_reference(t, np.ones((1, 64), np.float32)).shape == (1, 10)


def test_cuda_shared_memory_is_refused_clearly_without_a_gpu(transport: Transport) -> None:
    """On a box without a usable GPU a CUDA registration gets a clear error, never a crash;
    the real path is checked by hw_tests/test_cuda_shared_memory.py on an NVIDIA box."""
    t = transport
    handle = base64.b64encode(bytes(64))
    with pytest.raises(InferenceServerException) as info:
        t.client.register_cuda_shared_memory("gpu", handle, 0, 1024, headers=t.headers)
    assert "CUDA" in str(info.value), str(info.value)
    assert str(info.value.status()) == t.bad_input
    _refused(t, "a CUDA IPC handle is 64 bytes, got 3", t.client.register_cuda_shared_memory,
             "gpu", base64.b64encode(b"abc"), 0, 1024)
    _refused(t, "no CUDA shared memory region 'gpu'", t.client.get_cuda_shared_memory_status,
             region_name="gpu")
    t.client.unregister_cuda_shared_memory("gpu", headers=t.headers)  # not an error
    status = t.client.get_cuda_shared_memory_status(headers=t.headers)
    assert (status == []) if t.kind == "http" else (len(status.regions) == 0)
