"""LiteRT backend: signatures, parity with a direct interpreter, delegate fallback, bad files,
bad input, dynamic shapes, thread safety, and a box without LiteRT."""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.errors import BackendUnavailable, InferenceError, InferenceInputError, ModelError
from edgeagent.runtime.base import LoadedModel
from edgeagent.runtime.litert_backend import LiteRTBackend, LiteRTModel
from edgeagent.runtime.registry import BackendRegistry

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tflite"
IN_MLP = "serving_default_features:0"
IN_CNN = "serving_default_image:0"
OUT = "StatefulPartitionedCall_1:0"


def plan(*providers: PlannedProvider, precision: str = "fp32", threads: int = 1) -> ProviderPlan:
    return ProviderPlan("tflite", precision, providers, threads=threads)


Signature = tuple[str, str, tuple[int, ...]]
XNNPACK_PLAN = plan(PlannedProvider("xnnpack"))


@pytest.fixture(scope="module")
def backend() -> LiteRTBackend:
    return LiteRTBackend()


def sample(model: LoadedModel, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for spec in model.inputs:
        shape = tuple((batch or 1) if d == -1 else d for d in spec.shape)
        if spec.datatype == "INT8":
            out[spec.name] = rng.integers(-128, 128, shape).astype(np.int8)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def direct(path: Path, inputs: dict[str, np.ndarray], default_delegates: bool = True) -> np.ndarray:
    """The same model run through LiteRT's own Python API, as a user would."""
    interpreter = Interpreter(
        model_path=str(path), num_threads=1,
        experimental_op_resolver_type=(
            OpResolverType.AUTO if default_delegates
            else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
    (detail,) = interpreter.get_input_details()
    value = inputs[detail["name"]]
    if tuple(value.shape) != tuple(detail["shape"]):
        interpreter.resize_tensor_input(detail["index"], list(value.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    result: np.ndarray = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    return result


@pytest.mark.parametrize(
    ("fixture", "inputs", "outputs"),
    [
        ("mlp_fp32", [(IN_MLP, "FP32", (1, 16))], [(OUT, "FP32", (1, 4))]),
        ("mlp_int8", [(IN_MLP, "INT8", (1, 16))], [(OUT, "INT8", (1, 4))]),
        ("cnn_fp32", [(IN_CNN, "FP32", (1, 8, 8, 3))], [(OUT, "FP32", (1, 5))]),
        ("mlp_dynamic_fp32", [(IN_MLP, "FP32", (-1, 16))], [(OUT, "FP32", (-1, 4))]),
    ],
)
def test_signatures(backend: LiteRTBackend, fixture: str, inputs: list[Signature],
                    outputs: list[Signature]) -> None:
    model = backend.load(FIXTURES / f"{fixture}.tflite", XNNPACK_PLAN)
    assert model.platform == "tensorflow_lite"
    assert [(s.name, s.datatype, s.shape) for s in model.inputs] == inputs
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == outputs
    if not fixture.endswith("int8"):
        assert all(s.quantization is None for s in model.inputs + model.outputs)


def test_int8_tensors_carry_their_quantisation(backend: LiteRTBackend) -> None:
    path = FIXTURES / "mlp_int8.tflite"
    model = backend.load(path, plan(PlannedProvider("xnnpack"), precision="int8"))
    reference = Interpreter(model_path=str(path))
    details = reference.get_input_details() + reference.get_output_details()
    for spec, detail in zip(model.inputs + model.outputs, details, strict=True):
        q = spec.quantization
        assert q is not None
        assert len(q.scale) == len(q.zero_point) == 1
        assert q.axis == 0
        assert 0.0 < q.scale[0] < 1.0
        assert -128 <= q.zero_point[0] <= 127
        assert (q.scale[0], q.zero_point[0]) == pytest.approx(detail["quantization"])
        assert spec.to_dict()["quantization"] == {
            "scale": list(q.scale), "zero_point": list(q.zero_point), "axis": 0}


@pytest.mark.parametrize("fixture", ["mlp_fp32", "mlp_int8", "cnn_fp32"])
def test_same_outputs_as_direct_litert(backend: LiteRTBackend, fixture: str) -> None:
    path = FIXTURES / f"{fixture}.tflite"
    model = backend.load(path, XNNPACK_PLAN)
    assert model.provider == "xnnpack"
    assert [(a.name, a.ok) for a in model.attempts] == [("xnnpack", True)]
    assert model.fallback_reason == ""
    for seed in range(3):
        inputs = sample(model, seed)
        got = model.run(model.validate(inputs))
        assert list(got) == [OUT]
        np.testing.assert_array_equal(got[OUT], direct(path, inputs))


def test_without_xnnpack_in_the_plan_the_builtin_kernels_run(backend: LiteRTBackend) -> None:
    path = FIXTURES / "cnn_fp32.tflite"
    model = backend.load(path, plan(threads=0))
    assert model.provider == "cpu"
    assert [(a.name, a.ok) for a in model.attempts] == [("cpu", True)]
    inputs = sample(model)
    got = model.run(model.validate(inputs))[OUT]
    np.testing.assert_array_equal(got, direct(path, inputs, default_delegates=False))
    np.testing.assert_allclose(got, direct(path, inputs), rtol=1e-5, atol=1e-6)


def test_missing_edgetpu_library_falls_back_and_says_why(backend: LiteRTBackend,
                                                        tmp_path: Path) -> None:
    missing = tmp_path / "libedgetpu.so.1"
    model = backend.load(FIXTURES / "mlp_int8.tflite", plan(
        PlannedProvider("edgetpu", {"device": "usb"}, library=str(missing)),
        PlannedProvider("xnnpack"), precision="int8"))
    assert model.provider == "xnnpack"
    assert [(a.name, a.ok) for a in model.attempts] == [("edgetpu", False), ("xnnpack", True)]
    assert model.fallback_reason.startswith("edgetpu: ")
    assert str(missing) in model.fallback_reason


def test_every_delegate_failing_leaves_the_cpu_kernels(backend: LiteRTBackend,
                                                       tmp_path: Path) -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    model = backend.load(FIXTURES / "mlp_fp32.tflite", plan(
        PlannedProvider("edgetpu", library=str(tmp_path / "libedgetpu.so.1")),
        PlannedProvider("gpu", library=libc),  # a library that loads but is no delegate
        PlannedProvider("npu"),  # no library known for it
    ))
    assert model.provider == "cpu"
    assert [(a.name, a.ok) for a in model.attempts] == [
        ("edgetpu", False), ("gpu", False), ("npu", False), ("cpu", True)]
    reasons = {a.name: a.reason for a in model.attempts}
    assert reasons["gpu"] == f"{libc} is not a TFLite external delegate"
    assert reasons["npu"] == "unknown delegate and no library given for it"
    inputs = sample(model)
    assert model.run(model.validate(inputs))[OUT].shape == (1, 4)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"this is not a flatbuffer at all" * 4, "not a valid Flatbuffer"),
        (b"", "empty"),
        ((FIXTURES / "mlp_fp32.tflite").read_bytes()[:1000], "not a valid Flatbuffer"),
        ((FIXTURES / "mlp_int8.tflite").read_bytes()[:-1], "not a valid Flatbuffer"),
    ],
    ids=["garbage", "empty", "truncated", "one-byte-short"],
)
def test_bad_files_are_model_errors_naming_the_file(backend: LiteRTBackend, tmp_path: Path,
                                                    content: bytes, words: str) -> None:
    path = tmp_path / "broken.tflite"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=words) as info:
        backend.load(path, XNNPACK_PLAN)
    assert "broken.tflite" in str(info.value)
    # Also when a delegate is tried first: the file's fault is still the error reported.
    with pytest.raises(ModelError, match=r"broken\.tflite"):
        backend.load(path, plan(PlannedProvider("edgetpu", library=str(tmp_path / "none.so"))))


def test_missing_file_is_a_model_error(backend: LiteRTBackend, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        backend.load(tmp_path / "absent.tflite", XNNPACK_PLAN)


@pytest.mark.parametrize(
    ("fixture", "value", "words"),
    [
        ("mlp_fp32", np.zeros((1, 16), np.float64), "datatype FP64 does not match .* FP32"),
        ("mlp_int8", np.zeros((1, 16), np.float32), "datatype FP32 does not match .* INT8"),
        ("mlp_fp32", np.zeros((2, 16), np.float32), r"shape \[2, 16\] does not match"),
        ("mlp_fp32", np.zeros((16,), np.float32), r"shape \[16\] does not match"),
        ("mlp_dynamic_fp32", np.zeros((3, 15), np.float32), r"shape \[3, 15\] does not match"),
    ],
)
def test_validate_refuses_wrong_dtype_and_shape(backend: LiteRTBackend, fixture: str,
                                                value: np.ndarray, words: str) -> None:
    model = backend.load(FIXTURES / f"{fixture}.tflite", XNNPACK_PLAN)
    with pytest.raises(InferenceInputError, match=words):
        model.validate({IN_MLP: value})


def test_dynamic_batch_resizes_the_interpreter(backend: LiteRTBackend) -> None:
    path = FIXTURES / "mlp_dynamic_fp32.tflite"
    model = backend.load(path, XNNPACK_PLAN)
    for seed, batch in enumerate([3, 3, 1, 7]):
        inputs = sample(model, seed, batch)
        got = model.run(model.validate(inputs))[OUT]
        assert got.shape == (batch, 4)
        np.testing.assert_array_equal(got, direct(path, inputs))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (np.zeros((2, 16), np.float32), "only allows mutating unknown dimensions"),
        (np.zeros((1, 16), np.float64), "Got value of type FLOAT64"),
    ],
    ids=["fixed-dimension-resized", "wrong-dtype"],
)
def test_runtime_failures_are_inference_errors(backend: LiteRTBackend, value: np.ndarray,
                                               words: str) -> None:
    model = backend.load(FIXTURES / "mlp_fp32.tflite", XNNPACK_PLAN)
    # Skipping validate(), so the interpreter itself refuses the input.
    with pytest.raises(InferenceError, match=f"LiteRT failed: .*{words}") as info:
        model.run({IN_MLP: value})
    assert info.value.__cause__ is not None
    # ...and the model still serves valid requests afterwards.
    assert model.run(model.validate(sample(model)))[OUT].shape == (1, 4)


def test_outputs_are_copies_not_interpreter_buffers(backend: LiteRTBackend) -> None:
    model = backend.load(FIXTURES / "mlp_fp32.tflite", XNNPACK_PLAN)
    first = model.run(model.validate(sample(model, 1)))[OUT]
    kept = first.copy()
    second = model.run(model.validate(sample(model, 2)))[OUT]
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, kept)


def test_unknown_output_name_is_refused(backend: LiteRTBackend) -> None:
    model = backend.load(FIXTURES / "mlp_fp32.tflite", XNNPACK_PLAN)
    inputs = model.validate(sample(model))
    assert list(model.run(inputs, [OUT])) == [OUT]
    with pytest.raises(InferenceInputError, match="unknown output 'nope'"):
        model.run(inputs, ["nope"])


def test_concurrent_runs_are_serialised(backend: LiteRTBackend) -> None:
    path = FIXTURES / "mlp_dynamic_fp32.tflite"
    model = backend.load(path, XNNPACK_PLAN)
    # Different batch sizes force resizes between runs, the unsafe part without the lock.
    requests = [sample(model, seed, batch=1 + seed % 4) for seed in range(40)]
    expected = [direct(path, r) for r in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda r: model.run(model.validate(r))[OUT], requests))
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_closed_model_refuses_to_run(backend: LiteRTBackend) -> None:
    model = backend.load(FIXTURES / "mlp_fp32.tflite", XNNPACK_PLAN)
    inputs = model.validate(sample(model))
    model.close()
    with pytest.raises(InferenceError, match="closed"):
        model.run(inputs)


def test_versions_and_registry(backend: LiteRTBackend) -> None:
    version = importlib.metadata.version("ai-edge-litert")
    assert backend.versions() == {"litert": version, "distribution": f"ai-edge-litert {version}"}
    found = BackendRegistry().for_format("tflite")
    assert isinstance(found, LiteRTBackend)
    assert found.formats == ("tflite",)
    assert isinstance(found.load(FIXTURES / "cnn_fp32.tflite", XNNPACK_PLAN), LiteRTModel)


def test_no_interpreter_module_means_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable) as info:
        LiteRTBackend(modules=[("no_such_litert.interpreter", "no-such-litert"),
                               ("no_such_tflite.interpreter", "no-such-tflite")])
    assert info.value.backend == "litert"
    assert info.value.hint == "pip install 'edgeagent[litert]'"
    assert "no_such_litert.interpreter: No module named 'no_such_litert'" in str(info.value)
    assert "no_such_tflite.interpreter" in str(info.value)


@pytest.fixture
def broken_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for packages whose ``interpreter`` module fails to import."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _package(root: Path, name: str, body: str) -> str:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    (root / name / "interpreter.py").write_text(body)
    return f"{name}.interpreter"


def test_numpy1_build_under_numpy2_is_reported_and_skipped(broken_packages: Path) -> None:
    # What a tflite-runtime wheel built against NumPy 1 does when imported under NumPy 2.
    old = _package(broken_packages, "old_tflite_runtime",
                   "raise AttributeError('_ARRAY_API not found')\n")
    with pytest.raises(BackendUnavailable, match=r"_ARRAY_API not found.*needs NumPy 1"):
        LiteRTBackend(modules=[(old, "tflite-runtime")])
    # With a working module after it, the broken one is passed over.
    good = LiteRTBackend(modules=[(old, "tflite-runtime"),
                                  ("ai_edge_litert.interpreter", "ai-edge-litert")])
    assert good.versions()["distribution"].startswith("ai-edge-litert ")


def test_a_bug_in_an_interpreter_module_is_not_swallowed(broken_packages: Path) -> None:
    buggy = _package(broken_packages, "buggy_litert", "1 / 0\n")
    with pytest.raises(ZeroDivisionError):
        LiteRTBackend(modules=[(buggy, "buggy-litert")])
