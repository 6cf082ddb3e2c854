"""Reading facts out of model files without running them: format, precision, hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgeagent.errors import ModelError
from edgeagent.runtime.onnxproto import read_graph_facts

PRECISIONS = ("fp32", "fp16", "int8")

# Operators that only appear in integer-quantised ONNX graphs.
_INT8_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul",
})
_ONNX_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (models can be hundreds of MB)."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from exc
    return h.hexdigest()


def onnx_precision(path: Path) -> tuple[str, str]:
    """Guess an ONNX model's precision from its graph, with the reason.

    int8 when the graph holds quantisation operators, fp16 when its weights are float16,
    fp32 otherwise. Reads the protobuf itself (:mod:`edgeagent.runtime.onnxproto`): the box
    needs no ``onnx`` package.

    Raises:
        ModelError: the file is not a readable ONNX model.
    """
    facts = read_graph_facts(path)
    quant = sorted(facts.op_types & _INT8_OPS)
    if quant:
        return "int8", f"graph has quantisation operators ({', '.join(quant[:3])})"
    if _ONNX_FLOAT16 in facts.initializer_types:
        return "fp16", "weights are float16"
    return "fp32", "float32 weights, no quantisation operators"
