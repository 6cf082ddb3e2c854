"""Inference request decoding and response encoding: JSON tensors and Triton's binary tensor
data extension, in both directions.

Wire format (``binary_data.md`` of the Triton protocol docs, and tritonclient's own
``_utils.py``/``_infer_result.py``): a JSON header of ``Inference-Header-Content-Length`` bytes,
then the raw tensors back to back, in the order of the inputs (or outputs) that carry
``parameters.binary_data_size``. Fixed-size types are little-endian element arrays; BYTES
elements are each a 4-byte little-endian length followed by that many bytes. Every platform
edgeagent runs on (x86-64, ARM64) is little-endian, so numpy's native dtypes read them as is.

The hot path copies as little as it can: a binary input becomes a numpy view of the request
body (``np.frombuffer``, no copy), a JSON input is converted once with ``np.asarray``, and sizes
are checked against the declared shape before anything is allocated. This module knows nothing
of models: the manager validates names, datatypes and shapes against the signature.

Large JSON bodies (:data:`SIMD_MIN_BYTES` and up) are parsed with simdjson where it is installed:
a flat numeric ``data`` list then goes from the JSON text to a 64-bit numpy buffer without one
Python object per element (a 150,528-float image: ~5 ms against ~15 ms with orjson and
``np.asarray``). Whatever that path does not take exactly as the general one would (nested or
mixed lists, integers out of range, NaN literals, malformed JSON) goes the general way, so the
answers and the errors are the same either way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import orjson

try:  # optional speed-up for large JSON tensors (see the module docstring)
    import simdjson
except ImportError:  # pragma: no cover - a core dependency; absent only on exotic platforms
    simdjson = None  # type: ignore[assignment]  # _parse_large checks for None first

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
from edgeagent.runtime.shm import ShmRef

#: The header that splits a body into a JSON part and a binary part.
HEADER_LENGTH = "Inference-Header-Content-Length"

# The stdlib encoder, compact, only for outputs holding NaN or infinities: orjson writes those as
# null, the stdlib (and Triton) as NaN / Infinity, which Python clients read back as floats.
_dumps_nonfinite = json.JSONEncoder(separators=(",", ":")).encode

#: Whole-JSON request bodies from this size up are parsed with simdjson (when installed); below
#: it orjson is as fast and the difference is noise.
SIMD_MIN_BYTES = 256 * 1024

#: simdjson's buffer element type for each datatype whose JSON data it can read exactly.
_SIMD_BUFFER: dict[str, Literal["d", "i", "u"]] = {
    "FP16": "d", "FP32": "d", "FP64": "d",
    **{f"INT{b}": "i" for b in (8, 16, 32, 64)},
    **{f"UINT{b}": "u" for b in (8, 16, 32, 64)},
}
_SIMD_DTYPE = {"d": np.float64, "i": np.int64, "u": np.uint64}

#: Most dimensions a tensor may declare: numpy 1's limit (numpy 2 takes 64), so a shape that
#: passes here can always be built; no model edgeagent serves comes near it.
MAX_DIMS = 32

#: Most nesting levels a JSON document may have: orjson's own limit. The stdlib parser (only
#: for what orjson refuses: NaN literals, integers beyond 64 bits) stops at Python's recursion
#: limit, near the same depth; either way the request gets a 400.
MAX_JSON_DEPTH = 1024

#: Default for ``http.max_bytes_elements``: BYTES elements one tensor may declare. Each one is a
#: Python object (about 40 bytes beyond its data), so this bounds what a small body can make the
#: agent allocate; text and image-bytes inputs hold a handful of elements.
MAX_BYTES_ELEMENTS = 1 << 20

#: ``\uD800``-``\uDFFF`` escapes: the only way a lone surrogate gets into a parsed document.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of a request's ``outputs``: a name and whether to send it as binary data."""

    name: str
    binary: bool
    shm: ShmRef | None = None
    """Where to write it instead (Triton's system shared memory extension)."""


@dataclass
class InferRequest:
    """A decoded inference request: arrays keyed by input name, and what to send back."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...]
    """The outputs asked for, in order; empty means all of them."""
    binary_output: bool
    """``parameters.binary_data_output``: the default for outputs not listed."""
    shm_inputs: dict[str, ShmInput] = field(default_factory=dict)
    """Inputs whose bytes are in a registered shared memory region."""
    priority: int = 0
    timeout_us: int = 0

    @property
    def output_names(self) -> list[str] | None:
        return [o.name for o in self.outputs] if self.outputs else None

    def call(self) -> InferCall:
        """The transport-free request (see :mod:`edgeagent.api.dataplane`)."""
        return InferCall(self.inputs, self.output_names, self.shm_inputs,
                         {o.name: o.shm for o in self.outputs if o.shm is not None},
                         self.priority, self.timeout_us)

    def wants_binary(self, name: str) -> bool:
        for out in self.outputs:
            if out.name == name:
                return out.binary
        return self.binary_output


def header_length(value: str | None, body_size: int) -> int | None:
    """Parse ``Inference-Header-Content-Length``; ``None`` when the whole body is JSON, 0 for
    Triton's raw binary request (the whole body is the model's one input).

    Raises:
        BadRequest: not an integer, or outside ``0..body_size``.
    """
    if value is None:
        return None
    try:
        if not value.isascii() or len(value) > 20:
            raise ValueError(value)  # int() takes other scripts' digits and 4,300 of them
        n = int(value)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {value[:40]!r}") from None
    if not 0 <= n <= body_size:
        raise BadRequest(
            f"{HEADER_LENGTH} is {n}, but the body has {body_size} bytes "
            "(expected 0 to the body size)"
        )
    return n


def parse_json(data: bytes | bytearray | memoryview, what: str = "request body") -> Any:
    """Parse JSON with orjson (~10x the stdlib's speed on float arrays); a 400 if it is not JSON.

    What orjson refuses is parsed again by the stdlib, so the same documents are accepted as
    ever (``NaN``/``Infinity`` literals, integers beyond 64 bits) and errors read the same.
    Either parser's limits are a 400 too: nesting deeper than :data:`MAX_JSON_DEPTH`, integers
    of more than 4,300 digits (Python's limit), strings holding a lone surrogate (not text).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # the stdlib would only recurse as deep, or crash
            raise BadRequest(f"the {what} is not valid JSON: nested more than "
                             f"{MAX_JSON_DEPTH} levels deep") from None
    raw = bytes(data)
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the {what} is not valid JSON: nested too deeply (at most "
                         f"{MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long
        raise BadRequest(f"the {what} is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(raw) and _holds_lone_surrogate(doc):
        raise BadRequest(f"the {what} is not valid JSON: a string holds a lone surrogate "
                         "(\\uD800-\\uDFFF without its pair), which is not valid UTF-8 text")
    return doc


def _holds_lone_surrogate(doc: Any) -> bool:
    """Whether any string (key or value) of a parsed document cannot be encoded as UTF-8."""
    stack = [doc]
    while stack:  # iterative: the document may be nested up to the parser's limit
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def decode_request(body: bytes | bytearray, header_size: int | None,
                   max_elements: int, *,
                   max_bytes_elements: int = MAX_BYTES_ELEMENTS) -> InferRequest:
    """Decode an inference request body into numpy arrays.

    Args:
        body: The whole request body.
        header_size: ``Inference-Header-Content-Length`` (already checked by
            :func:`header_length`), or ``None`` when the whole body is JSON.
        max_elements: Most elements any one tensor may declare (``http.max_tensor_elements``).
        max_bytes_elements: Most elements a BYTES tensor may declare
            (``http.max_bytes_elements``).

    Returns:
        The request, its binary inputs being views of ``body``.

    Raises:
        BadRequest: malformed JSON, missing or mistyped fields, data that does not match the
            declared shape, binary sizes that do not add up.
        PayloadTooLarge: a tensor declares more than ``max_elements`` elements (a BYTES one
            more than ``max_bytes_elements``), or a dimension larger than ``max_elements``.

    Every count is checked against the limits and the body's size before anything is
    allocated for it; nothing here raises but these two classes.
    """
    view = memoryview(body)
    if header_size is None:
        header = _parse_large(body) if len(body) >= SIMD_MIN_BYTES else None
        if header is None:
            header = parse_json(body)
        binary = view[len(body):]
    else:
        header, binary = parse_json(view[:header_size], "JSON header"), view[header_size:]
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    params = _mapping(header, "parameters", "the request")
    binary_output = _flag(params, "binary_data_output", "the request")
    priority, timeout_us = check_parameters(params)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    shm_inputs: dict[str, ShmInput] = {}
    offset = 0
    for i, tensor in enumerate(raw_inputs):
        name, arr, used = _decode_input(tensor, i, binary[offset:], max_elements,
                                        max_bytes_elements)
        if name in inputs or name in shm_inputs:
            raise BadRequest(f"input {name!r} is given twice")
        if isinstance(arr, ShmInput):
            shm_inputs[name] = arr
        else:
            inputs[name] = arr
        offset += used
    if offset != len(binary):
        raise BadRequest(
            f"the binary inputs declare {offset} bytes (binary_data_size), but the body carries "
            f"{len(binary)} bytes after the JSON header"
        )
    return InferRequest(request_id, inputs, _decode_outputs(header.get("outputs")), binary_output,
                        shm_inputs, priority, timeout_us)


def _parse_large(body: bytes | bytearray) -> dict[str, Any] | None:
    """A large whole-JSON request parsed with simdjson: as :func:`parse_json` would return it,
    except that each flat numeric input ``data`` list is a flat 64-bit numpy array.

    ``None`` where simdjson is not installed or does not take the body (then the general
    parser decides, and words any error).
    """
    if simdjson is None:
        return None
    try:
        doc = simdjson.Parser().parse(body)  # a parser per call: decoding runs on many threads
        if not isinstance(doc, simdjson.Object):
            return None
        header: dict[str, Any] = {}
        for key in doc.keys():  # noqa: SIM118 - a simdjson Object is iterated by keys()
            value = doc[key]
            if key == "inputs" and isinstance(value, simdjson.Array):
                header[key] = [_simd_input(t) for t in value]
            else:
                header[key] = _simd_python(value)
    # ValueError: malformed, or what orjson or the stdlib take and simdjson does not;
    # RuntimeError: simdjson's limits (depth, integers beyond 64 bits).
    except (ValueError, RuntimeError):
        return None
    return header


def _simd_python(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _simd_input(tensor: Any) -> Any:
    if not isinstance(tensor, simdjson.Object):
        return _simd_python(tensor)
    out = {k: _simd_python(tensor[k]) for k in tensor.keys() if k != "data"}  # noqa: SIM118
    if "data" in tensor:
        data = tensor["data"]
        datatype = out.get("datatype")
        kind = _SIMD_BUFFER.get(datatype) if isinstance(datatype, str) else None
        flat = None
        if kind is not None and isinstance(data, simdjson.Array):
            try:
                flat = np.frombuffer(data.as_buffer(of_type=kind), dtype=_SIMD_DTYPE[kind])
            # not all numbers of that kind, out of range, or nested past simdjson's limits
            except (TypeError, ValueError, RuntimeError):
                flat = None
            if flat is not None and flat.size != len(data):
                flat = None  # nested lists: numpy's own conversion checks them
        out["data"] = _simd_python(data) if flat is None else flat
    return out


def _mapping(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, dict):
        raise BadRequest(f"'{key}' of {where} must be a JSON object")
    return value


def _flag(params: Mapping[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter '{key}' of {where} must be true or false")
    return value


def _decode_outputs(raw: Any) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest(f"outputs[{i}] must be an object with a 'name'")
        params = _mapping(entry, "parameters", f"output {entry['name']!r}")
        if "classification" in params:
            raise BadRequest(f"output {entry['name']!r}: the classification extension "
                             "(class_count) is not supported; ask for the tensor itself")
        what = f"output {entry['name']!r}"
        out.append(RequestedOutput(entry["name"], _flag(params, "binary_data", what),
                                   shm_ref(params, what)))
    if len({o.name for o in out}) != len(out):
        raise BadRequest("an output is asked for twice")
    return tuple(out)


def _decode_input(tensor: Any, index: int, binary: memoryview,
                  max_elements: int, max_bytes_elements: int,
                  ) -> tuple[str, np.ndarray | ShmInput, int]:
    """One input: its name, its array, and how many bytes of ``binary`` it used."""
    if not isinstance(tensor, dict):
        raise BadRequest(f"inputs[{index}] must be a JSON object")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}] has no 'name'")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise BadRequest(f"input {name!r} has no 'datatype'")
    if datatype not in DATATYPE_TO_NUMPY:
        raise BadRequest(f"input {name!r}: unknown datatype {datatype!r} "
                         f"(known: {', '.join(DATATYPE_TO_NUMPY)})")
    shape, count = _check_shape(tensor.get("shape"), name, max_elements)
    if datatype == "BYTES" and count > max_bytes_elements:
        raise PayloadTooLarge(f"input {name!r}: shape {shape} has {count} BYTES elements, more "
                              f"than http.max_bytes_elements ({max_bytes_elements})")
    params = _mapping(tensor, "parameters", f"input {name!r}")
    ref = shm_ref(params, f"input {name!r}")
    if ref is not None:
        if "data" in tensor or "binary_data_size" in params:
            raise BadRequest(f"input {name!r} is in shared memory and also in the request")
        return name, ShmInput(datatype, tuple(shape), ref), 0
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise BadRequest(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        return name, _from_json(tensor["data"], name, datatype, shape, count), 0
    if "data" in tensor:
        raise BadRequest(f"input {name!r} has both 'data' and parameters.binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
    if size > len(binary):
        raise BadRequest(f"input {name!r}: binary_data_size is {size} bytes, but only "
                         f"{len(binary)} bytes of binary data are left in the body")
    return name, tensor_from_bytes(binary[:size], name, datatype, shape,
                                   what="binary data"), size


def _check_shape(shape: Any, name: str, max_elements: int) -> tuple[list[int], int]:
    """A declared shape and its element count, checked before anything is allocated for it.

    A dimension larger than ``max_elements`` is refused even when another one is 0: numpy
    could not build such an array, and no model takes one.
    """
    if not isinstance(shape, list):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise BadRequest(f"input {name!r}: 'shape' has {len(shape)} dimensions, more than "
                         f"{MAX_DIMS}")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers")
        if d > max_elements:
            raise PayloadTooLarge(f"input {name!r}: shape dimension {str(d)[:40]} is larger "
                                  f"than http.max_tensor_elements ({max_elements})")
    count = math.prod(shape)
    if count > max_elements:
        raise PayloadTooLarge(f"input {name!r}: shape {shape} has {count} elements, more than "
                              f"http.max_tensor_elements ({max_elements})")
    return shape, count


def _from_json(data: Any, name: str, datatype: str, shape: list[int],
               count: int) -> np.ndarray:
    if isinstance(data, np.ndarray):  # a flat numeric list, read by simdjson (_parse_large)
        converted = _from_flat(data, datatype)
        if converted is not None:
            if converted.size != count:
                raise BadRequest(f"input {name!r}: 'data' has {converted.size} values, but "
                                 f"shape {shape} takes {count}")
            return converted.reshape(shape)
        data = data.tolist()  # values the datatype cannot hold: the general path words it
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: 'data' must be a list")
    # A flat list is checked before numpy allocates anything; nested lists after conversion.
    if (not data or not isinstance(data[0], list)) and len(data) != count:
        raise BadRequest(f"input {name!r}: 'data' has {len(data)} values, but shape {shape} "
                         f"takes {count}")
    if datatype == "BYTES":
        return _bytes_from_json(data, name, shape, count)
    try:
        arr = np.asarray(data, dtype=DATATYPE_TO_NUMPY[datatype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"input {name!r}: 'data' is not a (nested) list of {datatype} "
                         f"values: {exc}") from None
    if arr.size != count:
        raise BadRequest(f"input {name!r}: 'data' has {arr.size} values, but shape {shape} "
                         f"takes {count}")
    return arr.reshape(shape)


def _from_flat(flat: np.ndarray, datatype: str) -> np.ndarray | None:
    """A flat 64-bit array as ``datatype``, exactly as ``np.asarray`` converts the same Python
    numbers; ``None`` for integers the datatype cannot hold (numpy refuses those)."""
    dtype = np.dtype(DATATYPE_TO_NUMPY[datatype])
    if dtype.kind in "iu" and flat.size:
        info = np.iinfo(cast("np.dtype[np.integer[Any]]", dtype))  # kind "i" or "u"
        if flat.min() < info.min or flat.max() > info.max:
            return None
    return flat.astype(dtype, copy=False)


def _bytes_from_json(data: list[Any], name: str, shape: list[int], count: int) -> np.ndarray:
    try:
        flat = np.array(data, dtype=object).reshape(-1)
    except ValueError as exc:
        raise BadRequest(f"input {name!r}: 'data' is not a regular nested list: {exc}") from None
    if flat.size != count:
        raise BadRequest(f"input {name!r}: 'data' has {flat.size} values, but shape {shape} "
                         f"takes {count}")
    out = np.empty(count, dtype=object)
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise BadRequest(f"input {name!r}: BYTES data in JSON must be strings, "
                             f"element {i} is {type(item).__name__}")
        try:
            out[i] = item.encode()
        except UnicodeEncodeError:  # a lone surrogate (parse_json refuses them already)
            raise BadRequest(f"input {name!r}: element {i} is not valid UTF-8 text") from None
    return out.reshape(shape)


# ---- responses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedResponse:
    """An encoded inference response: body, and the headers that describe it."""

    body: bytes
    headers: dict[str, str]
    media_type: str


def encode_response(model_name: str, model_version: int, request: InferRequest,
                    outputs: Mapping[str, np.ndarray]) -> EncodedResponse:
    """Encode outputs as the protocol's response, each in JSON or binary as requested.

    Raises:
        BadRequest: a BYTES output that is not UTF-8 was asked for as JSON.
    """
    entries: list[dict[str, Any]] = []
    buffers: list[bytes | memoryview] = []
    shm = {o.name: o.shm for o in request.outputs if o.shm is not None}
    for name, arr in outputs.items():
        datatype = datatype_of(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if name in shm:
            pass  # written into its region by the data plane: name, datatype, shape only (as
            # Triton answers; its C++ client reads any "parameters" as binary data)
        elif request.wants_binary(name):
            buf = _to_binary(arr, datatype)
            entry["parameters"] = {"binary_data_size": len(buf)}
            buffers.append(buf)
        else:
            entry["data"] = _to_json(arr, name, datatype)
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = entries
    head = _dumps(header)
    if not buffers:
        return EncodedResponse(head, {}, "application/json")
    return EncodedResponse(b"".join([head, *buffers]), {HEADER_LENGTH: str(len(head))},
                           "application/octet-stream")


def _to_binary(arr: np.ndarray, datatype: str) -> bytes | memoryview:
    if datatype != "BYTES":
        # A byte view of the (contiguous) array: the final join is the only copy.
        return np.ascontiguousarray(arr).data.cast("B")
    return tensor_to_bytes(arr)


def _dumps(header: dict[str, Any]) -> bytes:
    """Compact JSON of a response header whose ``data`` fields may be numpy arrays."""
    try:
        return orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        pass  # a float output with NaN or infinities (see _to_json)
    for entry in header["outputs"]:
        if isinstance(entry.get("data"), np.ndarray):
            entry["data"] = entry["data"].tolist()
    return _dumps_nonfinite(header).encode()


def _to_json(arr: np.ndarray, name: str, datatype: str) -> np.ndarray | list[Any]:
    if datatype != "BYTES":
        flat = np.ascontiguousarray(arr.reshape(-1))
        if flat.dtype.kind == "f":
            if not np.isfinite(flat).all():
                # orjson would write null; fail the encode so _dumps uses the stdlib for it.
                return flat.astype(object)
            # FP16 goes out as float32: its shortest repr reads back to the same half value,
            # and every orjson version serialises float32.
            if flat.dtype == np.float16:
                flat = flat.astype(np.float32)
        return flat
    out: list[Any] = []
    for item in arr.reshape(-1):
        if isinstance(item, str):
            out.append(item)
            continue
        try:
            out.append(bytes(item).decode())
        except UnicodeDecodeError:
            raise BadRequest(f"output {name!r} holds bytes that are not UTF-8; ask for it with "
                             "parameters.binary_data = true") from None
    return out

