"""The agent's own ONNX reader (no ``onnx`` package on the box) against the onnx package."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeagent.errors import ModelError
from edgeagent.runtime.inspect import onnx_precision
from edgeagent.runtime.onnxproto import parse_graph_facts, read_graph_facts
from tests import onnx_models


def _fp16(path: Path) -> Path:
    w = numpy_helper.from_array(np.ones((4, 3), np.float16), "W")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["x16"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["x16", "W"], ["y16"]),
         helper.make_node("Cast", ["y16"], ["output"], to=TensorProto.FLOAT)],
        "fp16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                    str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnxproto")
    fp32 = onnx_models.mlp(d / "mlp.onnx")
    return {
        "fp32": fp32,
        "int8": onnx_models.mlp_int8(d / "mlp_int8.onnx", fp32),
        "fp16": _fp16(d / "fp16.onnx"),
        "multi": onnx_models.multi_io(d / "multi.onnx"),
        "lookup": onnx_models.lookup(d / "lookup.onnx"),
        "strings": onnx_models.string_identity(d / "strings.onnx"),
    }


@pytest.mark.parametrize("kind", ["fp32", "int8", "fp16", "multi", "lookup", "strings"])
def test_reads_what_the_onnx_package_reads(models: dict[str, Path], kind: str) -> None:
    model = onnx.load_model(str(models[kind]), load_external_data=False)
    facts = read_graph_facts(models[kind])
    assert facts.op_types == {n.op_type for n in model.graph.node}
    assert facts.initializer_types == {t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize(("kind", "want"), [("fp32", "fp32"), ("int8", "int8"),
                                            ("fp16", "fp16")])
def test_precision_from_the_light_reader(models: dict[str, Path], kind: str, want: str) -> None:
    assert onnx_precision(models[kind])[0] == want


@pytest.mark.parametrize("content", [b"", b"not a model at all\n", b"\x3a\xff\xff\xff\xff\x0f",
                                     b"\x08\x08", b"\x0f"])
def test_bad_files_are_a_clear_model_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"bad\.onnx: not a readable ONNX model"):
        onnx_precision(path)


def test_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        read_graph_facts(tmp_path / "gone.onnx")


def test_truncated_and_corrupted_models_never_escape_as_other_errors(
        models: dict[str, Path]) -> None:
    """Every prefix and many random corruptions of a real model: a result or a ValueError."""
    data = models["int8"].read_bytes()
    for cut in range(len(data)):
        with contextlib.suppress(ValueError):
            parse_graph_facts(data[:cut])
    rng = np.random.default_rng(7)
    for _ in range(2000):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 8))):
            buf[int(pos)] = int(rng.integers(0, 256))
        with contextlib.suppress(ValueError):
            parse_graph_facts(bytes(buf))
