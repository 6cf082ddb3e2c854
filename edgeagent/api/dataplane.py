"""The Open Inference Protocol's operations, free of any transport: what the HTTP handlers and
the gRPC servicer both call.

Each transport decodes its request into plain values (numpy arrays, names, references to
shared memory), calls :class:`DataPlane`, and encodes what it returns; errors are
:class:`~edgeagent.errors.EdgeAgentError` subclasses, which each transport maps to its own
statuses in one place (``errors.py`` for HTTP, ``grpc_server.py`` for gRPC).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeagent.api.errors import BadRequest, NotReady, PayloadTooLarge
from edgeagent.api.triton import model_config, model_metadata
from edgeagent.errors import ModelNotFound
from edgeagent.runtime.datatypes import DATATYPE_SIZE, DATATYPE_TO_NUMPY
from edgeagent.runtime.manager import ModelVersion
from edgeagent.runtime.memory import HeapTrimmer
from edgeagent.runtime.scheduler import ModelLimits
from edgeagent.runtime.shm import MemoryRegion, ShmRef

if TYPE_CHECKING:
    from edgeagent.api.codec import InferRequest
    from edgeagent.api.services import Services

#: Request parameters of Triton's sequence batcher, refused until sequence batching exists.
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


@dataclass(frozen=True)
class ShmInput:
    """An input whose bytes are in a registered shared memory region."""

    datatype: str
    shape: tuple[int, ...]
    ref: ShmRef


@dataclass
class InferCall:
    """One decoded inference request, whichever transport it came by."""

    inputs: dict[str, np.ndarray]
    """Inputs sent in the request itself."""
    output_names: list[str] | None = None
    """The outputs asked for (``None``: all)."""
    shm_inputs: dict[str, ShmInput] = field(default_factory=dict)
    shm_outputs: dict[str, ShmRef] = field(default_factory=dict)
    """Outputs to write into shared memory instead of the response."""
    priority: int = 0
    """Triton's convention: 1 is the highest, 0 the default."""
    timeout_us: int = 0
    """Give up on the request if it has not started running after this long (0: never)."""


def check_parameters(params: Mapping[str, Any], where: str = "the request") -> tuple[int, int]:
    """The ``priority`` and ``timeout`` request parameters, after refusing what is not served.

    Raises:
        BadRequest: a sequence parameter (no sequence batching: a stateful model would get
            stateless answers), or a priority or timeout that is not a non-negative integer.
    """
    if not params:
        return 0, 0
    for key in SEQUENCE_PARAMETERS:
        value = params.get(key)
        if value not in (None, 0, "", False):
            raise BadRequest(f"parameter {key!r} of {where}: edgeagent has no sequence "
                             "batching, so stateful (sequence) requests are not served")
    out = []
    for key in ("priority", "timeout"):
        value = params.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"parameter {key!r} of {where} must be a non-negative integer"
                             f"{' (microseconds)' if key == 'timeout' else ''}, got {value!r}")
        out.append(value)
    return out[0], out[1]


def shm_ref(params: Mapping[str, Any], what: str) -> ShmRef | None:
    """The shared memory reference in a tensor's parameters, or ``None``."""
    region = params.get("shared_memory_region")
    if region is None:
        if "shared_memory_byte_size" in params or "shared_memory_offset" in params:
            raise BadRequest(f"{what}: shared_memory_byte_size without shared_memory_region")
        return None
    size = params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset", 0)
    if not isinstance(region, str) or not region:
        raise BadRequest(f"{what}: shared_memory_region must be a region name")
    for key, value in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"{what}: {key} must be a non-negative integer, got {value!r}")
    assert isinstance(size, int)
    assert isinstance(offset, int)
    return ShmRef(region, size, offset)


#: A BYTES element's length prefix (Triton's binary tensor format).
_LENGTH = struct.Struct("<I")


def tensor_from_bytes(buf: memoryview, name: str, datatype: str, shape: Sequence[int], *,
                      what: str = "data") -> np.ndarray:
    """A tensor of ``datatype`` and ``shape`` read from raw bytes (a view, no copy; BYTES
    elements are each a 4-byte little-endian length and the bytes): the one decoder of binary
    tensors, for HTTP's binary extension (``what="binary data"``), gRPC's raw contents and
    shared memory.

    Raises:
        BadRequest: the bytes do not hold exactly that tensor.
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(buf, name, count, what).reshape(shape)
    need = count * DATATYPE_SIZE[datatype]
    if len(buf) != need:
        raise BadRequest(f"input {name!r}: {len(buf)} bytes of {what}, but {datatype} "
                         f"{list(shape)} takes {need} bytes")
    return np.frombuffer(buf, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(shape)


def _bytes_elements(buf: memoryview, name: str, count: int, what: str) -> np.ndarray:
    if count * _LENGTH.size > len(buf):  # checked before the array of count objects exists
        raise BadRequest(f"input {name!r}: {count} BYTES elements take at least 4 bytes each "
                         f"({count * _LENGTH.size} bytes), but the input has {len(buf)}")
    out = np.empty(count, dtype=object)
    pos, end = 0, len(buf)
    for i in range(count):
        if pos + 4 > end:
            raise BadRequest(f"input {name!r}: the BYTES data ends after {i} of {count} elements")
        (n,) = _LENGTH.unpack_from(buf, pos)
        pos += 4
        if pos + n > end:
            raise BadRequest(f"input {name!r}: element {i} claims {n} bytes, past the end of "
                             f"its {what}")
        out[i] = bytes(buf[pos:pos + n])
        pos += n
    if pos != end:
        raise BadRequest(f"input {name!r}: {end - pos} bytes left over after {count} BYTES "
                         "elements")
    return out


def tensor_to_bytes(arr: np.ndarray) -> bytes:
    """The raw bytes of a tensor (the inverse of :func:`tensor_from_bytes`)."""
    if arr.dtype.kind not in "OUS":
        return np.ascontiguousarray(arr).tobytes()
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


class DataPlane:
    """The protocol's operations on the agent's services."""

    def __init__(self, services: Services) -> None:
        self.s = services

    # ---- health and metadata ----------------------------------------------------------

    def server_ready(self) -> None:
        """Raises NotReady unless every configured model serves and the agent is not draining."""
        if self.s.draining():
            raise NotReady("the agent is shutting down")
        waiting = [n for n in self.s.owner.names() if not self.s.manager.ready(n)]
        if waiting:
            raise NotReady(f"not ready: model(s) {', '.join(waiting)} not loaded "
                           "(see the repository index)")

    def model_ready(self, name: str, version: int | None) -> None:
        """Raises ModelNotFound / ModelNotReady / NotReady unless the model serves."""
        self.s.manager.get(name, version)
        if self.s.draining():
            raise NotReady(f"model {name!r} is ready, but the agent is shutting down")

    def model_metadata(self, name: str, version: int | None) -> dict[str, Any]:
        return model_metadata(self.s.manager.get(name, version))

    def model_config(self, name: str, version: int | None) -> dict[str, Any]:
        mv = self.s.manager.get(name, version)
        section = self.s.config.model(name)
        limits = ModelLimits.from_section(section) if section else ModelLimits()
        return model_config(mv, limits)

    # ---- statistics ---------------------------------------------------------------------

    def statistics(self, name: str | None, version: int | None) -> list[dict[str, Any]]:
        """Triton statistics entries: one model's (``name``), or every model's."""
        names = [name] if name else self.s.manager.names()
        out = []
        for n in names:
            active = self.s.manager.slot(n).active
            if version is not None and (active is None or active.version != version):
                raise ModelNotFound(f"model {n!r} version {version} is not loaded")
            out.append(self.s.scheduler.stats(n).triton(str(active.version) if active else ""))
        return out

    # ---- model repository -------------------------------------------------------------

    def repository_index(self, ready_only: bool) -> list[dict[str, Any]]:
        """Triton's repository index entries: name, version, state, reason."""
        entries = []
        for name in self.s.owner.names():
            slot = self.s.manager.slot(name)
            entry: dict[str, Any] = {"name": name, "state": slot.state.upper()}
            if slot.active is not None:
                entry["version"] = str(slot.active.version)
            if slot.last_error:
                entry["reason"] = slot.last_error
            entries.append(entry)
        return [e for e in entries if e["state"] == "READY"] if ready_only else entries

    async def repository_load(self, name: str, parameter_names: Iterable[str]) -> int:
        """(Re)load a configured model at the version its owner decides; a request carrying a
        model is refused. Returns the version serving.

        Raises:
            BadRequest: the request carries a model (``config`` or ``file:`` parameters).
        """
        if any(k == "config" or k.startswith("file:") for k in parameter_names):
            raise BadRequest("edgeagent never loads a model from a request: it loads only the "
                             "models in its configuration, from their file or the hub")
        return await self.s.owner.load(name)

    async def repository_unload(self, name: str) -> None:
        await self.s.owner.unload(name)

    # ---- inference --------------------------------------------------------------------

    def admit(self, name: str, version: int | None) -> None:
        """Refuse a request before its body is read: draining, or no such model serving."""
        if self.s.draining():
            raise NotReady("the agent is shutting down; retry once it is back")
        self.s.manager.get(name, version)

    async def infer(self, name: str, version: int | None,
                    call: InferCall) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        """Run one request through the model's scheduler; shared memory outputs are written
        into their regions (and still returned, for the response's metadata).

        Raises:
            BadRequest, SharedMemoryError: from the shared memory references.
            Overloaded, DeadlineExceeded, ModelNotFound, ModelNotReady, InferenceInputError,
            InferenceError: from the scheduler.
        """
        large = sum(a.nbytes for a in call.inputs.values()) >= HeapTrimmer.LARGE_BYTES
        if not large:
            return await self._infer(name, version, call)
        trimmer = self.s.trimmer
        trimmer.start()
        try:
            return await self._infer(name, version, call)
        finally:
            trimmer.note()

    async def _infer(self, name: str, version: int | None,
                     call: InferCall) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        regions = {r.region for r in call.shm_outputs.values()}
        regions |= {s.ref.region for s in call.shm_inputs.values()}
        if not regions:
            return await self.s.scheduler.infer(name, call.inputs, call.output_names, version,
                                                priority=call.priority,
                                                timeout_us=call.timeout_us)
        for out in call.shm_outputs:
            if call.output_names is not None and out not in call.output_names:
                raise BadRequest(f"output {out!r} is in shared memory but not asked for")
        with self.s.shm.lease(regions) as held:
            inputs = dict(call.inputs)
            for in_name, shm in call.shm_inputs.items():
                if in_name in inputs:
                    raise BadRequest(f"input {in_name!r} is given twice")
                view = held[shm.ref.region].view(shm.ref, f"input {in_name!r}")
                inputs[in_name] = tensor_from_bytes(view, in_name, shm.datatype, shm.shape)
            try:
                mv, outputs = await self.s.scheduler.infer(
                    name, inputs, call.output_names, version, priority=call.priority,
                    timeout_us=call.timeout_us)
            finally:
                inputs.clear()  # drop the views of the mappings before the leases end
            for out_name, ref in call.shm_outputs.items():
                _write_output(held[ref.region], ref, outputs[out_name], out_name)
        return mv, outputs


def _write_output(region: MemoryRegion, ref: ShmRef, arr: np.ndarray, name: str) -> None:
    data = arr if arr.dtype.kind not in "OUS" else np.frombuffer(tensor_to_bytes(arr), np.uint8)
    region.write(ref, data, f"output {name!r}")


def raw_binary_request(mv: ModelVersion, body: bytes | bytearray,
                       max_elements: int) -> InferRequest:
    """Triton's raw binary request (``Inference-Header-Content-Length: 0``): the whole body is
    the tensor of the model's one input, its datatype and shape from the model's signature (one
    dynamic dimension at most, told by the body's size); every output comes back binary.

    Raises:
        BadRequest: the model has more than one input, a BYTES input, more than one dynamic
            dimension, or a body whose size does not fit the input.
        PayloadTooLarge: more than ``max_elements`` elements.
    """
    from edgeagent.api.codec import InferRequest  # the codec imports this module

    inputs = mv.model.inputs
    if len(inputs) != 1:
        raise BadRequest(f"a raw binary request (Inference-Header-Content-Length: 0) needs a "
                         f"model with one input; {mv.name!r} has {len(inputs)}")
    spec = inputs[0]
    if spec.datatype == "BYTES":
        raise BadRequest(f"a raw binary request cannot carry the BYTES input {spec.name!r}; "
                         "send a JSON header")
    dynamic = [i for i, d in enumerate(spec.shape) if d < 0]
    if len(dynamic) > 1:
        raise BadRequest(f"a raw binary request cannot tell the shape of input {spec.name!r} "
                         f"({list(spec.shape)}: more than one dynamic dimension); send a JSON "
                         "header")
    item = DATATYPE_SIZE[spec.datatype]
    fixed = int(np.prod([d for d in spec.shape if d >= 0], dtype=np.int64)) * item
    shape = list(spec.shape)
    if dynamic:
        if fixed == 0 or len(body) % fixed:
            raise BadRequest(f"raw binary request: input {spec.name!r} {spec.datatype} "
                             f"{list(spec.shape)} takes a multiple of {fixed} bytes, the body "
                             f"has {len(body)}")
        shape[dynamic[0]] = len(body) // fixed
    elif len(body) != fixed:
        raise BadRequest(f"raw binary request: input {spec.name!r} {spec.datatype} "
                         f"{list(spec.shape)} takes {fixed} bytes, the body has {len(body)}")
    count = int(np.prod(shape, dtype=np.int64))
    if count > max_elements:
        raise PayloadTooLarge(f"input {spec.name!r}: {count} elements, more than "
                              f"http.max_tensor_elements ({max_elements})")
    arr = np.frombuffer(memoryview(body), dtype=DATATYPE_TO_NUMPY[spec.datatype]).reshape(shape)
    return InferRequest(None, {spec.name: arr}, (), binary_output=True)
