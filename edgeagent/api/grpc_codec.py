"""Inference messages of ``inference.GRPCInferenceService``: ``ModelInferRequest`` to an
:class:`~edgeagent.api.dataplane.InferCall`, outputs to ``ModelInferResponse``.

As Triton reads them: each input's data is either in ``raw_input_contents`` (one entry per
input that is not in shared memory, in the order of the inputs; fixed-size types are
little-endian arrays, BYTES elements each a 4-byte little-endian length and the bytes), in the
typed ``contents`` fields, or in a registered shared memory region (the ``shared_memory_region``,
``shared_memory_byte_size`` and ``shared_memory_offset`` parameters). Outputs go back in
``raw_output_contents``, one entry per output in the order of ``outputs`` (empty for an output
written to shared memory), which is how Triton answers and where tritonclient looks.

Sizes are checked against the declared shape before anything is allocated, and every refusal is
a :class:`~edgeagent.api.errors.BadRequest` (gRPC INVALID_ARGUMENT) or a
:class:`~edgeagent.api.errors.PayloadTooLarge` (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeagent.api.dataplane import (
    InferCall,
    ShmInput,
    check_parameters,
    shm_ref,
    tensor_from_bytes,
    tensor_to_bytes,
)
from edgeagent.api.errors import BadRequest, PayloadTooLarge
from edgeagent.runtime.datatypes import DATATYPE_TO_NUMPY, datatype_of

#: The typed ``InferTensorContents`` field of each datatype that has one.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain Python values."""
    if not params:
        return {}
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, which) if which else None
    return out


def decode_infer(request: Any, max_elements: int) -> InferCall:
    """A ``ModelInferRequest`` as an :class:`InferCall` (raw inputs are views, no copy).

    Raises:
        BadRequest: missing or mistyped fields, data that does not match the declared shape,
            raw contents that do not pair with the inputs, parameters edgeagent does not serve.
        PayloadTooLarge: a tensor declares more than ``max_elements`` elements.
    """
    priority, timeout = check_parameters(parameter_values(request.parameters))
    call = InferCall(inputs={}, priority=priority, timeout_us=timeout)
    _decode_inputs(request, max_elements, call)
    names: list[str] = []
    for i, out in enumerate(request.outputs):
        if not out.name:
            raise BadRequest(f"outputs[{i}] has no name")
        if out.name in names:
            raise BadRequest(f"output {out.name!r} is asked for twice")
        params = parameter_values(out.parameters)
        if not params:
            names.append(out.name)
            continue
        if "classification" in params:
            raise BadRequest(f"output {out.name!r}: the classification extension "
                             "(class_count) is not supported; ask for the tensor itself")
        ref = shm_ref(params, f"output {out.name!r}")
        if ref is not None:
            call.shm_outputs[out.name] = ref
        names.append(out.name)
    call.output_names = names or None
    return call


def _decode_inputs(request: Any, max_elements: int, call: InferCall) -> None:
    if not request.inputs:
        raise BadRequest("'inputs' must hold at least one tensor")
    raw = request.raw_input_contents
    used = 0
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise BadRequest(f"inputs[{i}] has no name")
        if name in call.inputs or name in call.shm_inputs:
            raise BadRequest(f"input {name!r} is given twice")
        datatype = tensor.datatype
        if datatype not in DATATYPE_TO_NUMPY:
            raise BadRequest(f"input {name!r}: unknown datatype {datatype!r} "
                             f"(known: {', '.join(DATATYPE_TO_NUMPY)})")
        shape = tuple(tensor.shape)
        if shape and min(shape) < 0:
            raise BadRequest(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count = math.prod(shape)
        if count > max_elements:
            raise PayloadTooLarge(f"input {name!r}: shape {list(shape)} has {count} elements, "
                                  f"more than http.max_tensor_elements ({max_elements})")
        params = tensor.parameters
        ref = shm_ref(parameter_values(params), f"input {name!r}") if params else None
        if ref is not None:
            call.shm_inputs[name] = ShmInput(datatype, shape, ref)
            continue
        if raw:
            if used >= len(raw):
                raise BadRequest(f"input {name!r}: raw_input_contents has {len(raw)} entries, "
                                 "fewer than the inputs sent without shared memory")
            call.inputs[name] = tensor_from_bytes(memoryview(raw[used]), name, datatype, shape)
            used += 1
        else:
            call.inputs[name] = _from_contents(tensor, name, datatype, shape, count)
    if used != len(raw):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries, but {used} inputs take "
                         "raw data")


def _from_contents(tensor: Any, name: str, datatype: str, shape: tuple[int, ...],
                   count: int) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    if not tensor.HasField("contents"):
        raise BadRequest(f"input {name!r} has no data (contents, raw_input_contents or "
                         "shared memory)")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise BadRequest(f"input {name!r}: contents.{field} has {len(values)} values, but shape "
                         f"{list(shape)} takes {count}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    try:
        return np.array(values, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)
    except OverflowError:
        raise BadRequest(f"input {name!r}: a value does not fit {datatype}") from None


def encode_infer(response_cls: Any, model_name: str, version: int, request_id: str, *,
                 outputs: Mapping[str, np.ndarray], call: InferCall) -> Any:
    """The ``ModelInferResponse`` of a run: every output's bytes in ``raw_output_contents``
    (an empty entry for an output written to shared memory)."""
    response = response_cls(model_name=model_name, model_version=str(version), id=request_id)
    raw = []
    for name, arr in outputs.items():
        tensor = response.outputs.add(name=name, datatype=datatype_of(arr.dtype),
                                      shape=arr.shape)
        ref = call.shm_outputs.get(name)
        if ref is None:
            raw.append(tensor_to_bytes(arr))
            continue
        tensor.parameters["shared_memory_region"].string_param = ref.region
        tensor.parameters["shared_memory_byte_size"].int64_param = ref.byte_size
        if ref.offset:
            tensor.parameters["shared_memory_offset"].int64_param = ref.offset
        raw.append(b"")
    response.raw_output_contents.extend(raw)
    return response

