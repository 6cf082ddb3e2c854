"""Execution-provider plans and variant ranking: pure functions, table-driven."""

from __future__ import annotations

import platform
from dataclasses import replace
from pathlib import Path, PurePath
from typing import Any

import pytest

from edgeagent.device.facts import DeviceFacts, RuntimeFacts, collect_facts
from edgeagent.device.plan import plan_providers, preferred_precisions, rank_variants
from edgeagent.device.profiles import DeviceProfile, load_profiles, select_profile
from edgeagent.errors import ModelError
from tests.device.trees import BOARDS, ORT_CPU, ORT_GPU, write

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
CACHE = PurePath("/var/lib/edgeagent/trt-cache")


def board(tmp_path: Path, name: str, runtimes: RuntimeFacts | None = None
          ) -> tuple[DeviceProfile, DeviceFacts]:
    spec = BOARDS[name]
    facts = collect_facts(spec.build(tmp_path), runtimes or spec.runtimes)
    return select_profile(load_profiles(), facts).profile, facts


def plan(profile: DeviceProfile, facts: DeviceFacts, fmt: str, precision: str) -> Any:
    return plan_providers(profile, facts, fmt, precision, cache_dir=CACHE, model_hash=HASH)


# board, format, precision, planned (in order), excluded
PLANS = [
    ("agx-orin", "onnx", "fp16", [TRT, CUDA, CPU], []),
    ("orin-nx", "onnx", "int8", [TRT, CUDA, CPU], []),
    ("orin-nano", "onnx", "fp16", [TRT, CUDA, CPU], []),
    ("orin-nano", "tflite", "int8", ["xnnpack"], []),
    ("xavier-nx", "onnx", "fp32", [TRT, CUDA, CPU], []),
    ("nano", "onnx", "fp16", [TRT, CUDA, CPU], []),
    ("nano", "onnx", "int8", [CUDA, CPU], [TRT]),
    ("nano", "tflite", "fp32", ["xnnpack"], []),  # tflite-runtime, not LiteRT
    ("pi5", "onnx", "int8", [CPU], []),
    ("pi5", "tflite", "int8", ["xnnpack"], ["edgetpu"]),
    ("pi4", "tflite", "fp32", ["xnnpack"], ["edgetpu"]),
    ("rock5b", "tflite", "int8", ["xnnpack"], ["edgetpu", "gpu"]),
    ("x86-nvidia", "onnx", "fp16", [TRT, CUDA, CPU], []),
    ("x86-nvidia", "tflite", "int8", ["xnnpack"], ["edgetpu"]),
    ("x86-cpu", "onnx", "int8", [CPU], [TRT, CUDA]),
    ("x86-cpu", "tflite", "fp32", ["xnnpack"], ["edgetpu"]),
]


@pytest.mark.parametrize("case", PLANS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in PLANS])
def test_plans(tmp_path: Path, case: tuple[str, str, str, list[str], list[str]]) -> None:
    name, fmt, precision, planned, excluded = case
    profile, facts = board(tmp_path, name)
    result = plan(profile, facts, fmt, precision)
    assert [p.name for p in result.providers] == planned
    assert [e.name for e in result.excluded] == excluded
    assert (result.format, result.precision, result.threads) == (fmt, precision, 0)


def test_orin_nano_fp16_onnx(tmp_path: Path) -> None:
    profile, facts = board(tmp_path, "orin-nano")
    assert profile.name == "jetson-orin-nano"
    result = plan(profile, facts, "onnx", "fp16")
    assert [p.name for p in result.providers] == [TRT, CUDA, CPU]
    cache = str(CACHE / f"{HASH[:16]}-trt10.3.0-nvidia-jetson-orin-nano-developer-kit-fp16")
    assert dict(result.providers[0].options) == {
        "device_id": 0,
        "trt_max_workspace_size": 1 << 30,
        "trt_builder_optimization_level": 3,
        "trt_fp16_enable": True,
        "trt_int8_enable": False,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
    }
    assert dict(result.providers[1].options) == {
        "device_id": 0, "gpu_mem_limit": 2 << 30, "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC"}
    assert result.to_dict()["providers"][2] == {"name": CPU, "options": {}}


# precision -> (trt_fp16_enable, trt_int8_enable)
TRT_FLAGS = [("fp32", False, False), ("fp16", True, False), ("int8", True, True)]


@pytest.mark.parametrize(("precision", "fp16", "int8"), TRT_FLAGS)
def test_tensorrt_flags_follow_precision(tmp_path: Path, precision: str, fp16: bool,
                                        int8: bool) -> None:
    profile, facts = board(tmp_path, "x86-nvidia")
    options = plan(profile, facts, "onnx", precision).providers[0].options
    assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (fp16, int8)
    assert options["trt_engine_cache_path"].endswith(
        f"-trt10.3.0-nvidia-geforce-rtx-4090-{precision}")


def test_tensorrt_fp16_can_be_switched_off_by_the_profile(tmp_path: Path) -> None:
    profile, facts = board(tmp_path, "x86-nvidia")
    trt = replace(profile.onnx_providers[0], fp16=False)
    profile = replace(profile, onnx_providers=(trt, *profile.onnx_providers[1:]))
    assert plan(profile, facts, "onnx", "fp16").providers[0].options["trt_fp16_enable"] is False


def test_jetson_nano_has_no_int8_tensorrt(tmp_path: Path) -> None:
    profile, facts = board(tmp_path, "nano")
    result = plan(profile, facts, "onnx", "int8")
    assert result.excluded[0].reason == (
        "profile jetson-nano does not allow int8 TensorRT engines on this GPU")
    assert preferred_precisions(profile, "onnx") == ["fp16", "fp32"]


def test_this_machine_plans_cpu_only() -> None:
    if platform.machine() != "x86_64" or Path("/proc/driver/nvidia").exists():
        pytest.skip("expects the x86-64 development machine without an NVIDIA GPU")
    facts = collect_facts(Path("/"))
    if facts.runtimes.ort_providers is None or CUDA in facts.runtimes.ort_providers:
        pytest.skip("expects the CPU build of onnxruntime")
    profile = select_profile(load_profiles(), facts).profile
    assert profile.name == "x86-64-cpu"
    result = plan(profile, facts, "onnx", "fp32")
    assert [p.name for p in result.providers] == [CPU]
    reasons = {e.name: e.reason for e in result.excluded}
    offered = ", ".join(facts.runtimes.ort_providers)
    assert reasons[TRT].startswith(f"onnxruntime on this box offers only {offered} "
                                   "(install onnxruntime-gpu built with TensorRT)")
    assert "no NVIDIA GPU found" in reasons[TRT]
    assert reasons[CUDA].startswith(f"onnxruntime on this box offers only {offered} "
                                    "(install onnxruntime-gpu: pip install 'edgeagent[gpu]')")


def test_exclusion_reasons_name_what_is_missing(tmp_path: Path) -> None:
    # A Jetson with the GPU build of onnxruntime but a minimal L4T: no TensorRT, no cuDNN.
    spec = BOARDS["orin-nano"]
    root = spec.build(tmp_path)
    for lib in ("libnvinfer.so", "libnvinfer.so.10", "libnvinfer.so.10.3.0", "libcudnn.so.9",
                "libcudnn.so.9.3.0"):
        (root / "usr/lib/aarch64-linux-gnu" / lib).unlink()
    facts = collect_facts(root, spec.runtimes)
    profile = select_profile(load_profiles(), facts).profile
    result = plan(profile, facts, "onnx", "fp16")
    assert [p.name for p in result.providers] == [CPU]
    assert [e.to_dict() for e in result.excluded] == [
        {"name": TRT, "reason": "TensorRT: libnvinfer not found"},
        {"name": CUDA, "reason": "cuDNN: libcudnn not found"},
    ]


def test_jetson_without_gpu_onnxruntime_uses_the_profile_hint(tmp_path: Path) -> None:
    profile, facts = board(tmp_path, "orin-nano", RuntimeFacts(ORT_CPU, litert=True))
    reason = plan(profile, facts, "onnx", "fp16").excluded[0].reason
    assert reason == (f"onnxruntime on this box offers only {', '.join(ORT_CPU)} "
                      f"({profile.gpu_install_hint})")


def test_no_onnxruntime_still_ends_with_cpu(tmp_path: Path) -> None:
    profile, facts = board(tmp_path, "x86-nvidia", RuntimeFacts(None))
    result = plan(profile, facts, "onnx", "fp32")
    assert [p.name for p in result.providers] == [CPU]
    assert all(e.reason.startswith("onnxruntime cannot be imported") for e in result.excluded)


def test_edge_tpu_plans_for_int8_only(tmp_path: Path) -> None:
    spec = BOARDS["pi5"]
    root = spec.build(tmp_path)
    write(root, "dev/apex_0", "")
    write(root, "usr/lib/aarch64-linux-gnu/libedgetpu.so.1.0", "")
    facts = collect_facts(root, spec.runtimes)
    profile = select_profile(load_profiles(), facts).profile
    int8 = plan(profile, facts, "tflite", "int8")
    assert [p.to_dict() for p in int8.providers] == [
        {"name": "edgetpu", "options": {}, "library": "libedgetpu.so.1"},
        {"name": "xnnpack", "options": {}},
    ]
    fp32 = plan(profile, facts, "tflite", "fp32")
    assert [e.to_dict() for e in fp32.excluded] == [{
        "name": "edgetpu",
        "reason": "the Edge TPU runs only int8 models (compiled by edgetpu_compiler)"}]


def test_edge_tpu_without_its_library(tmp_path: Path) -> None:
    spec = BOARDS["pi4"]
    write(spec.build(tmp_path), "dev/apex_0", "")
    profile, facts = board(tmp_path, "pi4")
    assert plan(profile, facts, "tflite", "int8").excluded[0].reason == (
        "Edge TPU delegate: libedgetpu not found (install libedgetpu1-std from Coral's apt "
        "repository)")


def test_tflite_without_a_runtime(tmp_path: Path) -> None:
    profile, facts = board(tmp_path, "x86-cpu", RuntimeFacts(ORT_CPU))
    result = plan(profile, facts, "tflite", "fp32")
    assert result.providers == ()
    assert "neither LiteRT nor tflite-runtime is installed (pip install 'edgeagent[litert]')" in (
        result.excluded[-1].reason)


def test_gpu_delegate_when_its_library_is_there(tmp_path: Path) -> None:
    spec = BOARDS["rock5b"]
    write(spec.build(tmp_path), "usr/lib/libtensorflowlite_gpu_delegate.so", "")
    profile, facts = board(tmp_path, "rock5b")
    result = plan(profile, facts, "tflite", "fp16")
    assert [p.name for p in result.providers] == ["gpu", "xnnpack"]
    assert result.providers[0].library == "libtensorflowlite_gpu_delegate.so"


def test_planning_touches_no_files(tmp_path: Path) -> None:
    profile, facts = board(tmp_path / "root", "x86-nvidia")
    cache = tmp_path / "cache"
    result = plan_providers(profile, facts, "onnx", "fp16", cache_dir=cache, model_hash=HASH)
    assert result.providers[0].options["trt_engine_cache_path"].startswith(str(cache))
    assert not cache.exists()


@pytest.mark.parametrize(("fmt", "precision", "model_hash", "message"), [
    ("pytorch", "fp32", HASH, "unknown model format 'pytorch' (expected onnx or tflite)"),
    ("onnx", "bf16", HASH, "unknown precision 'bf16' (expected fp32, fp16, int8)"),
    ("onnx", "fp32", "../../etc", "model hash '../../etc' is not usable in a cache path"),
    ("onnx", "fp32", "", "model hash '' is not usable"),
])
def test_bad_plan_arguments(tmp_path: Path, fmt: str, precision: str, model_hash: str,
                            message: str) -> None:
    profile, facts = board(tmp_path, "x86-cpu")
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_providers(profile, facts, fmt, precision, cache_dir=CACHE, model_hash=model_hash)


def test_preferred_precisions(tmp_path: Path) -> None:
    profiles = load_profiles()
    assert preferred_precisions(profiles["jetson-orin-nano"], "onnx") == ["fp16", "int8", "fp32"]
    assert preferred_precisions(profiles["raspberry-pi-5"], "onnx") == ["int8", "fp32"]
    assert preferred_precisions(profiles["x86-64-cpu"], "onnx") == ["int8", "fp32"]
    assert preferred_precisions(profiles["x86-64-nvidia"], "onnx") == ["fp16", "int8", "fp32"]
    with pytest.raises(ModelError, match="unknown model format"):
        preferred_precisions(profiles["x86-64-cpu"], "caffe")


class Variant:
    """Variants may be objects as well as dicts."""

    def __init__(self, fmt: str, precision: str, needs: dict[str, list[str]] | None = None):
        self.format, self.precision, self.needs = fmt, precision, needs

    def __repr__(self) -> str:
        return f"{self.format}-{self.precision}{'-' + str(self.needs) if self.needs else ''}"


ONNX_FP32 = {"format": "onnx", "precision": "fp32"}
ONNX_FP16 = {"format": "onnx", "precision": "fp16"}
ONNX_INT8 = {"format": "onnx", "precision": "int8"}
TFL_INT8 = Variant("tflite", "int8")
TFL_FP32 = Variant("tflite", "fp32")
TFL_TPU = Variant("tflite", "int8", {"delegates": ["edgetpu"]})
ONNX_TRT = {"format": "onnx", "precision": "fp16", "needs": {"providers": [TRT]}}
ONNX_X86 = {"format": "onnx", "precision": "int8", "needs": {"arch": ["x86_64"]}}
ALL = [ONNX_FP32, ONNX_FP16, ONNX_INT8, TFL_INT8, TFL_FP32, TFL_TPU, ONNX_TRT, ONNX_X86]

# board, runtimes (None: the board's), ranked best first, rejected
RANKINGS: list[tuple[str, RuntimeFacts | None, list[Any], list[Any]]] = [
    ("orin-nano", None, [ONNX_TRT, ONNX_FP16, ONNX_INT8, ONNX_FP32, TFL_INT8, TFL_FP32],
     [TFL_TPU, ONNX_X86]),
    # Without onnxruntime-gpu the Orin is a CPU box: int8 first, fp16 last.
    ("orin-nano", RuntimeFacts(ORT_CPU, litert=True),
     [ONNX_INT8, ONNX_FP32, ONNX_FP16, TFL_INT8, TFL_FP32], [TFL_TPU, ONNX_TRT, ONNX_X86]),
    ("nano", None, [ONNX_TRT, ONNX_FP16, ONNX_FP32, TFL_INT8, TFL_FP32],
     [ONNX_INT8, TFL_TPU, ONNX_X86]),
    ("pi5", None, [TFL_INT8, TFL_FP32, ONNX_INT8, ONNX_FP32],
     [ONNX_FP16, TFL_TPU, ONNX_TRT, ONNX_X86]),
    ("x86-cpu", None, [ONNX_INT8, ONNX_X86, ONNX_FP32, TFL_INT8, TFL_FP32],
     [ONNX_FP16, TFL_TPU, ONNX_TRT]),
    ("x86-cpu", RuntimeFacts(ORT_CPU), [ONNX_INT8, ONNX_X86, ONNX_FP32],
     [ONNX_FP16, TFL_INT8, TFL_FP32, TFL_TPU, ONNX_TRT]),
    ("x86-nvidia", RuntimeFacts(ORT_GPU),
     [ONNX_TRT, ONNX_FP16, ONNX_INT8, ONNX_X86, ONNX_FP32], [TFL_INT8, TFL_FP32, TFL_TPU]),
]


@pytest.mark.parametrize(("name", "runtimes", "ranked", "rejected"), RANKINGS)
def test_rank_variants(tmp_path: Path, name: str, runtimes: RuntimeFacts | None,
                       ranked: list[Any], rejected: list[Any]) -> None:
    profile, facts = board(tmp_path, name, runtimes)
    result = rank_variants(profile, facts, ALL)
    assert list(result.ranked) == ranked
    assert [r.variant for r in result.rejected] == rejected


def test_rank_variants_with_an_edge_tpu(tmp_path: Path) -> None:
    spec = BOARDS["pi5"]
    root = spec.build(tmp_path)
    write(root, "dev/apex_0", "")
    write(root, "usr/lib/aarch64-linux-gnu/libedgetpu.so.1", "")
    facts = collect_facts(root, spec.runtimes)
    profile = select_profile(load_profiles(), facts).profile
    assert rank_variants(profile, facts, ALL).ranked[:3] == (TFL_TPU, TFL_INT8, TFL_FP32)


def test_rejection_reasons(tmp_path: Path) -> None:
    profile, facts = board(tmp_path, "pi5")
    result = rank_variants(profile, facts, [
        ONNX_FP16, TFL_TPU, ONNX_TRT, ONNX_X86, {"format": "pt", "precision": "fp32"},
        {"format": "onnx", "precision": None}])
    assert [r.reason for r in result.rejected] == [
        "fp16 is not among profile raspberry-pi-5's onnx precisions",
        "needs edgetpu, none usable here (edgetpu: no Edge TPU found (/dev/apex_0 or a Coral USB "
        "Accelerator); Edge TPU delegate: libedgetpu not found (install libedgetpu1-std from "
        "Coral's apt repository))",
        "fp16 is not among profile raspberry-pi-5's onnx precisions",
        "needs architecture x86_64; this box is aarch64",
        "unknown format 'pt'",
        "unknown precision None",
    ]
    int8_trt = {"format": "onnx", "precision": "int8", "needs": {"providers": [TRT]}}
    assert rank_variants(profile, facts, [int8_trt]).rejected[0].reason == (
        "needs TensorrtExecutionProvider, none usable here (TensorrtExecutionProvider: not "
        "listed by profile raspberry-pi-5)")
