"""onnxruntime backend: signatures, parity with a direct session, fallback, bad files, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.errors import InferenceInputError, ModelError
from edgeagent.runtime.inspect import onnx_precision
from edgeagent.runtime.onnx_backend import OnnxBackend
from edgeagent.runtime.registry import BackendRegistry, model_format
from tests import onnx_models

CPU_PLAN = ProviderPlan("onnx", "fp32", (PlannedProvider("CPUExecutionProvider"),), threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    fp32 = onnx_models.mlp(d / "mlp.onnx")
    return {
        "fp32": fp32,
        "int8": onnx_models.mlp_int8(d / "mlp_int8.onnx", fp32),
        "multi": onnx_models.multi_io(d / "multi.onnx"),
    }


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_same_outputs_as_direct_onnxruntime(models: dict[str, Path], kind: str) -> None:
    model = OnnxBackend().load(models[kind], CPU_PLAN)
    assert model.platform == "onnxruntime_onnx"
    assert [s.to_dict() for s in model.inputs] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [s.to_dict() for s in model.outputs] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    got = model.run(model.validate({"input": x}))["logits"]
    want = ort.InferenceSession(str(models[kind]), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)
    assert model.provider == "CPUExecutionProvider"
    assert model.fallback_reason == ""


def test_precision_detection(models: dict[str, Path]) -> None:
    assert onnx_precision(models["fp32"])[0] == "fp32"
    precision, why = onnx_precision(models["int8"])
    assert precision == "int8" and "quantisation operators" in why


def test_falls_back_along_the_plan_and_says_why(models: dict[str, Path]) -> None:
    plan = ProviderPlan("onnx", "fp16", (
        PlannedProvider("TensorrtExecutionProvider", {"trt_fp16_enable": True}),
        PlannedProvider("CUDAExecutionProvider", {"device_id": 0}),
        PlannedProvider("CPUExecutionProvider"),
    ))
    model = OnnxBackend().load(models["fp32"], plan)
    assert model.provider == "CPUExecutionProvider"
    assert [(a.name, a.ok) for a in model.attempts] == [
        ("TensorrtExecutionProvider", False), ("CUDAExecutionProvider", False),
        ("CPUExecutionProvider", True)]
    assert "not offered by this onnxruntime build" in model.fallback_reason


def test_multiple_inputs_and_output_subset(models: dict[str, Path]) -> None:
    model = OnnxBackend().load(models["multi"], CPU_PLAN)
    x = np.ones((2, 3), np.float32)
    k = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = model.run(model.validate({"x": x, "k": k}), ["k2"])
    assert list(out) == ["k2"]
    np.testing.assert_array_equal(out["k2"], k * 2)


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ({"x": np.ones((2, 3), np.float32)}, "missing input 'k'"),
        ({"x": np.ones((2, 3), np.float32), "k": np.ones((2, 3), np.int64),
          "z": np.ones(1)}, "unknown input 'z'"),
        ({"x": np.ones((2, 3), np.float64), "k": np.ones((2, 3), np.int64)},
         "datatype FP64 does not match the model's FP32"),
        ({"x": np.ones((2, 4), np.float32), "k": np.ones((2, 4), np.int64)},
         "shape [2, 4] does not match the model's [-1, 3]"),
        ({"x": np.ones((3,), np.float32), "k": np.ones((2, 3), np.int64)}, "shape [3]"),
    ],
)
def test_bad_inputs_are_refused_clearly(models: dict[str, Path], inputs: dict, words: str) -> None:
    model = OnnxBackend().load(models["multi"], CPU_PLAN)
    with pytest.raises(InferenceInputError) as info:
        model.validate(inputs)
    assert words in str(info.value)


def test_unknown_output_is_refused(models: dict[str, Path]) -> None:
    model = OnnxBackend().load(models["multi"], CPU_PLAN)
    with pytest.raises(InferenceInputError, match="unknown output 'nope'"):
        model.output_spec("nope")


def test_bad_model_files(tmp_path: Path, models: dict[str, Path]) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08" + b"\xff" * 64)
    with pytest.raises(ModelError, match="no execution provider could load"):
        OnnxBackend().load(garbage, CPU_PLAN)
    truncated = tmp_path / "truncated.onnx"
    data = models["fp32"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError):
        OnnxBackend().load(truncated, CPU_PLAN)
    with pytest.raises(ModelError, match="no such model file"):
        OnnxBackend().load(tmp_path / "absent.onnx", CPU_PLAN)


def test_model_format_sniffing(tmp_path: Path, models: dict[str, Path]) -> None:
    assert model_format(models["fp32"]) == "onnx"
    for name, content, words in [
        ("m.pt", b"x", "expected .onnx or .tflite"),
        ("m.tflite", b"\x00" * 16, "TFL3"),
        ("m.onnx", b"PK\x03\x04", "not an ONNX protobuf"),
    ]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ModelError, match=words):
            model_format(p)


def test_registry_reports_missing_backend_with_hint() -> None:
    registry = BackendRegistry({"onnx": ("edgeagent.runtime.onnx_backend", "OnnxBackend")})
    status = registry.status()
    assert status["onnx"]["available"] is True
    with pytest.raises(ModelError, match="no backend for model format"):
        registry.for_format("pt")
