"""The demo model served on embedded defaults, made here (no download from anywhere).

A tiny deterministic classifier: ``input`` FP32 [-1, 4] -> ``probabilities`` FP32 [-1, 3]
(a dense layer and a softmax), so that the README's first ``curl`` has something to answer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEMO_NAME = "demo"
WEIGHTS = np.array(
    [[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.9], [0.5, 0.5, 0.5]], dtype=np.float32
)
BIAS = np.array([0.1, 0.0, -0.1], dtype=np.float32)


def build_demo_model() -> bytes:
    """Serialise the demo model (ONNX, opset 13)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "demo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(WEIGHTS, "W"), numpy_helper.from_array(BIAS, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="edgeagent-demo")
    model.ir_version = 8
    return bytes(model.SerializeToString())


def ensure_demo_model(directory: Path) -> Path:
    """Write the demo model under ``directory`` (atomically) unless it is already there."""
    path = directory / f"{DEMO_NAME}.onnx"
    data = build_demo_model()
    if path.is_file() and path.read_bytes() == data:
        return path
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
