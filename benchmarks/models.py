"""The two benchmark models, made with the ``onnx`` helper API (deterministic weights).

- ``mlp``: float32 [N, 64] -> [N, 10], the tests' MLP (64 -> 32 -> 10): per-request overhead
  dominates, so it measures the serving path.
- ``cnn``: float32 [N, 3, 224, 224] -> [N, 1000], seven 3x3 convolutions with ReLU, global
  average pooling and a dense layer: about 0.47 GMAC per image, so it measures how much of the
  compute the serving path keeps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save_model

from tests.onnx_models import mlp

__all__ = ["CNN_LAYERS", "cnn", "cnn_macs", "mlp"]

#: (output channels, stride) of each 3x3 convolution; the input has 3 channels at 224x224.
CNN_LAYERS = ((32, 2), (64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2))


def cnn_macs() -> int:
    """Multiply-accumulates per image of :func:`cnn`."""
    macs, channels, side = 0, 3, 224
    for out, stride in CNN_LAYERS:
        side //= stride
        macs += side * side * out * channels * 9
        channels = out
    return macs + channels * 1000


def cnn(path: Path, seed: int = 0) -> Path:
    """Write the benchmark CNN (input ``image``, output ``logits``; batch dimension ``N``)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, channels = "image", 3
    for i, (out, stride) in enumerate(CNN_LAYERS):
        w = (rng.standard_normal((out, channels, 3, 3)) * np.sqrt(2 / (channels * 9)))
        b = rng.standard_normal(out) * 0.01
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3],
                                   strides=[stride, stride], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, channels = f"r{i}", out
    fc_w = (rng.standard_normal((channels, 1000)) / np.sqrt(channels)).astype(np.float32)
    fc_b = np.zeros(1000, np.float32)
    inits += [numpy_helper.from_array(fc_w, "fc_w"), numpy_helper.from_array(fc_b, "fc_b"),
              numpy_helper.from_array(np.array([-1, channels], np.int64), "flat")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"]),
              helper.make_node("Reshape", ["pooled", "flat"], ["features"]),
              helper.make_node("MatMul", ["features", "fc_w"], ["fc"]),
              helper.make_node("Add", ["fc", "fc_b"], ["logits"])]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, str(path))
    return path
