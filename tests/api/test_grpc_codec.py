"""``ModelInferRequest`` decoding, hammered: any message gets an :class:`InferCall` or a
clear refusal (INVALID_ARGUMENT / RESOURCE_EXHAUSTED), never another exception, and nothing is
allocated for a shape before its size is checked. Random but seeded, so a failure repeats."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from edgeagent.api.errors import BadRequest, PayloadTooLarge
from edgeagent.api.grpc_codec import decode_infer, encode_infer
from edgeagent.runtime.datatypes import DATATYPE_TO_NUMPY

DATATYPES = [*DATATYPE_TO_NUMPY, "FLOAT", ""]
MAX_ELEMENTS = 10_000


def _valid_request(rng: random.Random) -> Any:
    req = service_pb2.ModelInferRequest(model_name="m")
    for i in range(rng.randint(1, 3)):
        n = rng.randint(0, 5)
        req.inputs.add(name=f"x{i}", datatype="INT32", shape=[n])
        req.raw_input_contents.append(np.arange(n, dtype=np.int32).tobytes())
    return req


def _random_request(rng: random.Random) -> Any:
    if rng.random() < 0.3:
        return _valid_request(rng)
    req = service_pb2.ModelInferRequest(model_name="m")
    for i in range(rng.randint(0, 3)):
        dims = [-1, 0, 1, 2, 3, 7, 1 << 20, 1 << 40]
        shape = [rng.choice(dims) for _ in range(rng.randint(0, 3))]
        tensor = req.inputs.add(name=rng.choice([f"x{i}", "x0", ""]),
                                datatype=rng.choice(DATATYPES), shape=shape)
        roll = rng.random()
        if roll < 0.2:
            tensor.parameters["shared_memory_region"].string_param = rng.choice(["r", ""])
            if rng.random() < 0.7:
                tensor.parameters["shared_memory_byte_size"].int64_param = rng.randint(-4, 64)
        elif roll < 0.3:
            tensor.parameters["shared_memory_byte_size"].int64_param = 8
        elif roll < 0.5:
            tensor.contents.fp32_contents.extend([1.0] * rng.randint(0, 8))
            tensor.contents.int64_contents.extend([1 << 62] * rng.randint(0, 2))
            tensor.contents.bytes_contents.extend([b"ab"] * rng.randint(0, 3))
    for _ in range(rng.randint(0, 4)):
        req.raw_input_contents.append(bytes(rng.choice([0, 1, 4, 8, 12, 16, 28])))
    for _ in range(rng.randint(0, 2)):
        out = req.outputs.add(name=rng.choice(["y", "y", ""]))
        if rng.random() < 0.3:
            out.parameters["classification"].int64_param = 3
    if rng.random() < 0.3:
        key = rng.choice(["priority", "timeout", "sequence_id", "sequence_start", "other"])
        param = req.parameters[key]
        if rng.random() < 0.5:
            param.int64_param = rng.randint(-2, 5)
        else:
            param.string_param = "x"
    return req


@pytest.mark.parametrize("seed", range(8))
def test_random_messages_are_decoded_or_refused(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    decoded = refused = 0
    for _ in range(500):
        req = _random_request(rng)
        try:
            call = decode_infer(req, MAX_ELEMENTS)
        except (BadRequest, PayloadTooLarge) as exc:
            refused += bool(str(exc))  # every refusal says why
            continue
        decoded += 1
        for name, arr in call.inputs.items():
            assert arr.size <= MAX_ELEMENTS, name
        # What decodes also encodes back (the response side of the same shapes).
        encode_infer(service_pb2.ModelInferResponse, "m", 1, "", outputs=call.inputs,
                     call=call)
    assert decoded and refused


def test_raw_contents_pair_with_inputs_in_order() -> None:
    req = service_pb2.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype="INT32", shape=[2])
    shm = req.inputs.add(name="b", datatype="FP32", shape=[1])
    shm.parameters["shared_memory_region"].string_param = "r"
    shm.parameters["shared_memory_byte_size"].int64_param = 4
    req.inputs.add(name="c", datatype="BYTES", shape=[2])
    req.raw_input_contents.extend([np.array([5, 6], np.int32).tobytes(),
                                   b"\x01\x00\x00\x00x\x02\x00\x00\x00yz"])
    call = decode_infer(req, MAX_ELEMENTS)
    np.testing.assert_array_equal(call.inputs["a"], [5, 6])
    assert list(call.inputs["c"]) == [b"x", b"yz"]
    assert call.shm_inputs["b"].ref.byte_size == 4
