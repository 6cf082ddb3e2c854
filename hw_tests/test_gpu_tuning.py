"""On a real NVIDIA box: the tuning search over TensorRT/CUDA/CPU and fp32/fp16/int8 variants
of one model, every candidate gated on the checks, the chosen one passing them, and TensorRT
engines built during tuning landing in the engine cache the activation uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeagent.config import ModelSection, TuneSection
from edgeagent.device import DeviceFacts, load_profiles, plan_providers, select_profile
from edgeagent.device.plan import TRT_CACHE_DIRNAME, PlanOverrides, ProviderPlan
from edgeagent.runtime.checks import ModelCheck
from edgeagent.runtime.manager import ModelSource
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.tuning import TimedMeasurer, Tuner, VariantFile
from edgeagent.tuning.candidates import candidates, default_candidate
from tests import onnx_models

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def _variants(tmp_path: Path) -> list[tuple[Path, str]]:
    from edgeconvert.cli import main as edgeconvert

    fp32 = onnx_models.mlp(tmp_path / "m.onnx", n_in=64, n_hidden=256, n_out=10)
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=np.random.default_rng(0).standard_normal((64, 64)).astype(
        np.float32))
    fp16, int8 = tmp_path / "m-fp16.onnx", tmp_path / "m-int8.onnx"
    assert edgeconvert(["fp16", str(fp32), "--keep-io-types", "--out", str(fp16)]) == 0
    assert edgeconvert(["quantize", str(fp32), "--out", str(int8), "--calibration",
                        str(samples), "--format", "qdq", "--per-channel"]) == 0
    return [(fp32, "fp32"), (fp16, "fp16"), (int8, "int8")]


def test_search_over_gpu_providers_and_precisions(gpu_facts: DeviceFacts,
                                                  tmp_path: Path) -> None:
    profile = select_profile(load_profiles(), gpu_facts).profile
    cache = tmp_path / TRT_CACHE_DIRNAME
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    files = []
    for path, precision in _variants(tmp_path):
        want = ort.InferenceSession(str(path if precision == "fp32" else tmp_path / "m.onnx"),
                                    providers=[CPU]).run(None, {"input": x})[0]
        checks = (ModelCheck({"input": x}, {"logits": want}, atol=None, rtol=None,
                             min_cosine=0.99),)
        sha = f"{precision}{'0' * 60}"
        files.append(VariantFile(path.name, "onnx", precision, sha,
                                 ModelSource(path, 1, precision, checks=checks, sha256=sha)))

    def planner(fmt: str, precision: str, sha: str, overrides: PlanOverrides) -> ProviderPlan:
        return plan_providers(profile, gpu_facts, fmt, precision, cache_dir=cache,
                              model_hash=sha, overrides=overrides)

    def variant_planner(fmt: str, precision: str, overrides: PlanOverrides) -> ProviderPlan:
        return planner(fmt, precision, "0" * 64, overrides)

    section = ModelSection(name="m", path="m.onnx", max_batch_size=8,
                           tune=TuneSection(budget_s=90.0, threads=(1, 4)))
    default = default_candidate(files[0], variant_planner("onnx", "fp32", PlanOverrides()),
                                section)
    cands = candidates(files, variant_planner, section, gpu_facts.cpu_count or 1, default)
    providers = {c.provider for c in cands}
    assert {CUDA, CPU} <= providers, providers
    assert {c.precision for c in cands} == {"fp32", "fp16", "int8"}

    from edgeagent.tuning.search import nvml_used_mb

    result = Tuner(BackendRegistry(), planner, TimedMeasurer(),
                   device_memory=nvml_used_mb).search(section, 1, files, cands)
    rows = {r.candidate.id: r for r in result.rows}
    for row in rows.values():
        print(f"{row.candidate.describe():<70} {row.outcome:<14} "
              f"{row.figures.to_dict() if row.figures else ''} {row.why}")
    assert result.chosen is not None
    assert result.elapsed_s < section.tune.budget_s + 60  # the budget, plus one load
    cuda = [r for r in result.rows if r.candidate.provider == CUDA and r.figures]
    assert cuda, "no CUDA candidate was measured"
    assert all(r.figures is not None and r.figures.device_mb is not None for r in cuda)
    assert all(r.outcome != "failed checks" for r in cuda if r.candidate.precision == "fp32")
    if TRT in providers and any(r.candidate.provider == TRT and r.figures for r in result.rows):
        assert any(cache.rglob("*")), "TensorRT engines built while tuning are not cached"

