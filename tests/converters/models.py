"""Small real models and sample sets for the edgeconvert tests (deterministic weights).

The MLP is the shared one from ``tests.onnx_models``; the CNN is built here with the ``onnx``
helper API. Sample sets are "well separated": drawn at random, then only the samples whose
top-1 logit beats the runner-up by a clear margin are kept, so that top-1 agreement between
fp32 and a quantised variant measures the variant, not coin flips between tied classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, save_model

from tests.onnx_models import mlp

__all__ = ["broken_copy", "cnn", "mlp", "separated_samples"]


def cnn(path: Path, seed: int = 1, opset: int = 17) -> Path:
    """float32 [batch, 3, 32, 32] -> conv-relu-pool, conv, 8x8 avg pool, dense -> [batch, 10]."""
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    params = {
        "c1w": weights(8, 3, 3, 3), "c1b": (rng.standard_normal(8) * 0.1).astype(np.float32),
        "c2w": weights(16, 8, 3, 3), "c2b": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "fcw": weights(10, 64), "fcb": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Conv", ["p1", "c2w", "c2b"], ["c2"], pads=[1, 1, 1, 1]),
            # No ReLU here: signed features keep the classes apart after pooling, where
            # non-negative ones share a large common part that picks one class for every image.
            helper.make_node("AveragePool", ["c2"], ["g"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "fcw", "fcb"], ["logits"], transB=1),
        ],
        "cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(a, n) for n, a in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    save_model(model, str(path))
    return path


def onnx_logits(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function running a single-input ONNX model on a batch, for choosing samples."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: np.asarray(session.run(None, {name: x})[0])


def separated_samples(
    logits: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], count: int,
    seed: int = 7, margin_quantile: float = 0.5,
) -> np.ndarray:
    """``count`` inputs of ``shape`` (no batch axis) whose fp32 top-1 class is clear.

    Draws ``count / (1 - margin_quantile)`` candidates, ranks them by the gap between the two
    largest logits, and keeps the ``count`` widest gaps.
    """
    rng = np.random.default_rng(seed)
    n = int(count / (1 - margin_quantile))
    candidates = rng.standard_normal((n, *shape))
    if len(shape) == 3:
        # Images: noise alone averages out in a CNN's global pooling and every image lands in
        # the same class; a coarse 4x4 pattern per image gives each its own content.
        channels, height, width = shape
        coarse = rng.standard_normal((n, channels, 4, 4)) * 2.0
        candidates = 0.5 * candidates + np.kron(coarse, np.ones((1, 1, height // 4, width // 4)))
    candidates = candidates.astype(np.float32)
    out = logits(candidates)
    top2 = np.sort(out, axis=-1)[:, -2:]
    keep = np.argsort(top2[:, 1] - top2[:, 0])[::-1][:count]
    return candidates[np.sort(keep)]


def broken_copy(source: Path, dest: Path, scale: float = 3.0) -> Path:
    """A copy of an ONNX model whose first float weight is scaled and sign-flipped."""
    import onnx

    model = onnx.load(str(source))
    init = next(i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT)
    init.CopyFrom(numpy_helper.from_array(-scale * numpy_helper.to_array(init), init.name))
    onnx.save_model(model, str(dest))
    return dest
