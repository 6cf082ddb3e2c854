"""Small real ONNX models for tests, made with the ``onnx`` helper API (deterministic weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save_model


def _save(graph: object, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    save_model(model, str(path))
    return path


def mlp(path: Path, n_in: int = 64, n_hidden: int = 32, n_out: int = 10, seed: int = 0,
        batch: str | int = "batch") -> Path:
    """float32 [batch, n_in] -> dense -> relu -> dense -> float32 [batch, n_out] ('logits')."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in)).astype(np.float32)
    b1 = (rng.standard_normal(n_hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((n_hidden, n_out)) / np.sqrt(n_hidden)).astype(np.float32)
    b2 = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
            helper.make_node("Add", ["h3", "b2"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, n_out])],
        initializer=[numpy_helper.from_array(a, n) for a, n in
                     ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    return _save(graph, path)


def mlp_int8(path: Path, fp32_path: Path) -> Path:
    """Dynamic int8 quantisation of an fp32 model with onnxruntime's own tooling."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8)
    return path


def multi_io(path: Path) -> Path:
    """Two inputs of different datatypes, two outputs: ``x`` FP32 [-1,3] and ``k`` INT64 [-1,3].

    ``sum`` = x + cast(k), ``k2`` = k * 2 (INT64).
    """
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "kf"], ["sum"]),
            helper.make_node("Add", ["k", "k"], ["k2"]),
        ],
        "multi_io",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("k", TensorProto.INT64, ["n", 3])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("k2", TensorProto.INT64, ["n", 3])],
    )
    return _save(graph, path)


def lookup(path: Path) -> Path:
    """``idx`` INT64 [n] -> ``rows`` FP32 [n, 2]: rows of a fixed 4x2 table.

    An index outside 0..3 (or -4..-1) passes validation but fails inside onnxruntime: a valid
    request that errors at run time.
    """
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 2])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    return _save(graph, path)


def string_identity(path: Path) -> Path:
    """A BYTES (ONNX string) tensor in and out: ``text`` [-1] -> Identity -> ``echo`` [-1]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "string_identity",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["n"])],
    )
    return _save(graph, path)


def doubled(path: Path) -> Path:
    """``x`` FP32 [n] -> ``twice`` FP32 [m] = x followed by x: an output whose first dimension
    is dynamic but is not the batch (2n rows for n)."""
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["twice"], axis=0)],
        "doubled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("twice", TensorProto.FLOAT, ["m"])],
    )
    return _save(graph, path)
