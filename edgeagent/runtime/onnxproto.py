"""Just enough of the protobuf wire format to read an ONNX graph's operators and weight types.

The agent needs two facts from an ONNX file before it loads it: which operators the top-level
graph uses (quantisation operators mean int8) and which element types its initializers hold
(float16 weights mean fp16). The ``onnx`` package (31 MB with protobuf) would parse every
message; this reader walks the fields it needs and skips the rest by their length, so weights
(``raw_data``) are never copied: the file is memory-mapped and only tags and lengths are read.

Field numbers are from onnx.proto (stable since IR version 3): ModelProto.graph = 7;
GraphProto.node = 1, GraphProto.initializer = 5; NodeProto.op_type = 4, NodeProto.domain = 7;
TensorProto.data_type = 2.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.errors import ModelError

__all__ = ["OnnxGraphFacts", "parse_graph_facts", "read_graph_facts"]

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_OP_TYPE = 4
_TENSOR_DATA_TYPE = 2


class _Malformed(Exception):
    pass


@dataclass
class OnnxGraphFacts:
    """What :func:`read_graph_facts` found in the top-level graph."""

    op_types: set[str] = field(default_factory=set)
    initializer_types: set[int] = field(default_factory=set)
    """``TensorProto.DataType`` values of the initializers (1 float, 10 float16, ...)."""
    has_graph: bool = False


_Buffer = bytes | mmap.mmap


def _varint(buf: _Buffer, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: _Buffer, pos: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value or (start, stop)) for one message's fields."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("a length-delimited field runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:  # groups are not used by proto3 / onnx.proto
            raise _Malformed(f"unsupported wire type {wire}")
        if pos > end:
            raise _Malformed("a fixed-size field runs past its message")


def _graph(buf: _Buffer, start: int, stop: int, facts: OnnxGraphFacts) -> None:
    facts.has_graph = True
    for number, wire, value in _fields(buf, start, stop):
        if wire != _LEN:
            continue
        s, e = value
        if number == _GRAPH_NODE:
            for n, w, v in _fields(buf, s, e):
                if n == _NODE_OP_TYPE and w == _LEN:
                    facts.op_types.add(buf[v[0]:v[1]].decode("utf-8", "replace"))
        elif number == _GRAPH_INITIALIZER:
            for n, w, v in _fields(buf, s, e):
                if n == _TENSOR_DATA_TYPE and w == _VARINT:
                    facts.initializer_types.add(v)


def parse_graph_facts(buf: _Buffer) -> OnnxGraphFacts:
    """The facts of a serialised ModelProto (bytes, or a memory-mapped file: either is indexed
    in place, and only operator names are copied out).

    Raises:
        ValueError: the bytes are not a well-formed ModelProto with a graph.
    """
    facts = OnnxGraphFacts()
    try:
        for number, wire, value in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire == _LEN:
                _graph(buf, value[0], value[1], facts)
    except _Malformed as exc:
        raise ValueError(str(exc)) from None
    if not facts.has_graph:
        raise ValueError("no graph in the model")
    return facts


def read_graph_facts(path: Path) -> OnnxGraphFacts:
    """Read a ``.onnx`` file's top-level operators and initializer types (memory-mapped).

    Raises:
        ModelError: the file cannot be read or is not a well-formed ONNX model.
    """
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) == 0:
                raise ModelError(f"{path.name}: not a readable ONNX model: the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return parse_graph_facts(mapped)
    except ValueError as exc:
        raise ModelError(f"{path.name}: not a readable ONNX model: {exc}") from exc
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from exc
