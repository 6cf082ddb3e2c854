"""Reading facts out of model files without running them: format, precision, hash."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from edgeagent.errors import ModelError

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
    fp32 otherwise. Needs the ``onnx`` package; without it the answer is fp32, said so.
    """
    if importlib.util.find_spec("onnx") is None:
        return "fp32", "assumed: the onnx package is not installed to inspect the graph"
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf
        raise ModelError(f"{path.name}: not a readable ONNX model: {exc}") from exc
    ops = {node.op_type for node in model.graph.node}
    quant = sorted(ops & _INT8_OPS)
    if quant:
        return "int8", f"graph has quantisation operators ({', '.join(quant[:3])})"
    if any(t.data_type == _ONNX_FLOAT16 for t in model.graph.initializer):
        return "fp16", "weights are float16"
    return "fp32", "float32 weights, no quantisation operators"
