"""On a real NVIDIA box: the profile, the plan and the provider actually running a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeagent.device import DeviceFacts, load_profiles, plan_providers, select_profile
from edgeagent.runtime.onnx_backend import OnnxBackend
from tests import onnx_models


def test_profile_is_an_nvidia_one(gpu_facts: DeviceFacts) -> None:
    selection = select_profile(load_profiles(), gpu_facts)
    assert selection.profile.name.startswith(("x86-64-nvidia", "jetson-")), selection.reason


def test_model_runs_on_the_gpu_and_matches_cpu(gpu_facts: DeviceFacts, tmp_path: Path) -> None:
    path = onnx_models.mlp(tmp_path / "mlp.onnx")
    profile = select_profile(load_profiles(), gpu_facts).profile
    plan = plan_providers(profile, gpu_facts, "onnx", "fp32", cache_dir=tmp_path / "trt",
                          model_hash="0" * 64)
    assert plan.providers[0].name in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    model = OnnxBackend().load(path, plan)
    assert model.provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"), model.attempts
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    got = model.run(model.validate({"input": x}))["logits"]
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = cpu.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_tensorrt_fp16_builds_its_engine_cache(gpu_facts: DeviceFacts, tmp_path: Path) -> None:
    if "TensorrtExecutionProvider" not in (gpu_facts.runtimes.ort_providers or ()):
        pytest.skip("this onnxruntime build has no TensorRT execution provider")
    path = onnx_models.mlp(tmp_path / "mlp.onnx")
    profile = select_profile(load_profiles(), gpu_facts).profile
    plan = plan_providers(profile, gpu_facts, "onnx", "fp16", cache_dir=tmp_path / "trt",
                          model_hash="a" * 64)
    model = OnnxBackend().load(path, plan)
    assert model.provider == "TensorrtExecutionProvider", model.attempts
    model.run(model.validate({"input": np.ones((1, 64), np.float32)}))
    assert any((tmp_path / "trt").rglob("*")), "TensorRT wrote no engine or timing cache"
