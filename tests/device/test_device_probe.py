"""``probe_report`` / ``format_probe_text`` on fake trees and on this machine."""

from __future__ import annotations

import importlib.resources
import json
import platform
from pathlib import Path

import pytest

import edgeagent.device
from edgeagent.device.facts import RuntimeFacts
from edgeagent.device.probe import format_probe_text, probe_report
from edgeagent.errors import ProfileError
from tests.device.trees import BOARDS, ORT_CPU, ORT_GPU, write


def test_public_api() -> None:
    assert sorted(edgeagent.device.__all__) == [
        "Candidate", "DeviceFacts", "DeviceProfile", "Exclusion", "GpuInfo", "LibraryInfo",
        "PlannedProvider", "ProfileSelection", "ProviderPlan", "RejectedVariant", "RuntimeFacts",
        "TRT_CACHE_DIRNAME", "VariantRanking", "collect_facts", "detect_runtimes",
        "format_probe_text", "load_profiles", "plan_providers", "preferred_precisions",
        "probe_report", "rank_variants", "select_profile",
    ]


def test_probe_a_fake_orin_nano(tmp_path: Path) -> None:
    spec = BOARDS["orin-nano"]
    runtimes = RuntimeFacts(ORT_GPU, litert=True,
                            packages={"onnxruntime-gpu": "1.20.0", "ai-edge-litert": "1.2.0"})
    report = probe_report(spec.build(tmp_path / "root"), None, tmp_path / "state",
                          runtimes=runtimes)
    assert json.loads(json.dumps(report)) == report
    assert report["facts"]["device_model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert report["profile"]["profile"] == "jetson-orin-nano"
    assert report["profile"]["reason"] == (
        "device-tree model 'NVIDIA Jetson Orin Nano Developer Kit' contains 'Orin Nano'")
    plans = [(p["format"], p["precision"], p["preferred"]) for p in report["plans"]]
    assert plans == [("onnx", "fp16", True), ("onnx", "int8", True), ("onnx", "fp32", True),
                     ("tflite", "int8", True), ("tflite", "fp32", True),
                     ("tflite", "fp16", False)]
    fp16 = report["plans"][0]
    assert [p["name"] for p in fp16["providers"]] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert fp16["providers"][0]["options"]["trt_engine_cache_path"] == str(
        tmp_path / "state" / "trt-cache"
        / "{model_hash}-trt10.3.0-nvidia-jetson-orin-nano-developer-kit-fp16")
    assert report["installed"] == {"onnxruntime-gpu": "1.20.0", "ai-edge-litert": "1.2.0"}
    assert report["missing"] == []  # NVML does not exist on Jetson: no nvidia-ml-py needed
    text = format_probe_text(report)
    assert "Profile  jetson-orin-nano: NVIDIA Jetson Orin Nano" in text
    assert "  onnx fp16: TensorrtExecutionProvider -> CUDAExecutionProvider -> " \
           "CPUExecutionProvider\n" in text
    assert "  tflite fp16: xnnpack -> built-in CPU kernels  (not preferred by the profile)" in text


def test_probe_lists_what_is_missing(tmp_path: Path) -> None:
    spec = BOARDS["x86-nvidia"]
    write(spec.build(tmp_path / "root"), "dev/apex_0", "")
    runtimes = RuntimeFacts(ORT_CPU, packages={"onnxruntime": "1.20.0"})
    report = probe_report(tmp_path / "root", None, tmp_path / "state", runtimes=runtimes)
    missing = {m["package"]: m["hint"] for m in report["missing"]}
    assert missing == {
        "ai-edge-litert": "pip install 'edgeagent[litert]'",
        "onnxruntime-gpu": "pip uninstall onnxruntime && pip install 'edgeagent[gpu]' "
                           "(onnxruntime-gpu; TensorRT also needs the tensorrt wheel or "
                           "NVIDIA's libnvinfer packages)",
        "nvidia-ml-py": "pip install 'edgeagent[gpu]'",
        "libedgetpu1-std": "apt install libedgetpu1-std (from Coral's apt repository)",
    }
    text = format_probe_text(report)
    assert "Missing\n  ai-edge-litert: runs TFLite models\n" in text
    assert "      without TensorrtExecutionProvider: onnxruntime on this box offers only " in text


def test_probe_flags_both_onnxruntime_builds(tmp_path: Path) -> None:
    runtimes = RuntimeFacts(ORT_GPU, litert=True,
                            packages={"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"})
    report = probe_report(BOARDS["x86-cpu"].build(tmp_path), None, tmp_path, runtimes=runtimes)
    assert [m["package"] for m in report["missing"]] == ["one onnxruntime build"]
    build = report["onnxruntime_build"]
    assert build["build"] == "both"
    assert build["packages"] == {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"}
    assert "both installed" in build["warning"] and "pip uninstall -y" in build["warning"]
    text = format_probe_text(report)
    assert "  onnxruntime build  both, onnxruntime 1.20.0, onnxruntime-gpu 1.20.0\n" in text
    assert "\nWARNING: onnxruntime 1.20.0 and onnxruntime-gpu 1.20.0 are both installed" in text


@pytest.mark.parametrize(("packages", "build"), [
    ({"onnxruntime": "1.20.0"}, "cpu"), ({"onnxruntime-gpu": "1.20.0"}, "gpu")])
def test_probe_names_the_onnxruntime_build(tmp_path: Path, packages: dict[str, str],
                                           build: str) -> None:
    report = probe_report(BOARDS["x86-cpu"].build(tmp_path), None, tmp_path,
                          runtimes=RuntimeFacts(ORT_CPU, litert=True, packages=packages))
    assert report["onnxruntime_build"] == {"build": build, "packages": packages}
    assert "WARNING" not in format_probe_text(report)


def test_probe_without_onnxruntime(tmp_path: Path) -> None:
    report = probe_report(BOARDS["pi4"].build(tmp_path), None, tmp_path,
                          runtimes=RuntimeFacts(None, litert=True))
    assert report["missing"] == [
        {"package": "onnxruntime", "why": "runs ONNX models (the core names no build: add one)",
         "hint": "pip install 'edgeagent[cpu]' (or 'edgeagent[gpu]' on an NVIDIA box)"}]
    assert report["onnxruntime_build"]["build"] == "none"
    text = format_probe_text(report)
    assert "  onnxruntime        not importable\n" in text
    assert "  onnxruntime build  none\n" in text
    assert "WARNING: no onnxruntime build: ONNX models cannot run" in text


def test_probe_forced_and_operator_profiles(tmp_path: Path) -> None:
    extra = tmp_path / "profiles"
    shipped = importlib.resources.files("edgeagent.device_profiles").joinpath(
        "generic-arm64.toml").read_text()
    write(extra, "my-board.toml", shipped)
    report = probe_report(BOARDS["pi5"].build(tmp_path / "root"), "my-board", tmp_path,
                          profiles_dir=extra, runtimes=RuntimeFacts(ORT_CPU, litert=True))
    assert report["profile"]["profile"] == "my-board"
    assert report["profile"]["details"]["source"] == str(extra / "my-board.toml")
    with pytest.raises(ProfileError, match="unknown device profile 'nope'"):
        probe_report(tmp_path / "root", "nope", tmp_path, runtimes=RuntimeFacts())


def test_probe_an_empty_tree_says_unknown(tmp_path: Path) -> None:
    write(tmp_path, "proc/sys/kernel/arch", "aarch64\n")
    report = probe_report(tmp_path, "auto", tmp_path, runtimes=RuntimeFacts())
    assert report["profile"]["profile"] == "generic-arm64"
    text = format_probe_text(report)
    assert "  CPU                unknown x ?\n" in text
    assert "  memory             unknown\n" in text
    assert "  GPUs               none\n" in text


def test_probe_this_machine(tmp_path: Path) -> None:
    if platform.machine() != "x86_64" or Path("/proc/driver/nvidia").exists():
        pytest.skip("expects the x86-64 development machine without an NVIDIA GPU")
    report = probe_report(Path("/"), None, tmp_path)
    assert report["profile"]["profile"] == "x86-64-cpu"
    assert report["installed"]["onnxruntime"]
    json.dumps(report)
    assert "Profile  x86-64-cpu" in format_probe_text(report)
    assert list(tmp_path.iterdir()) == []  # probing writes nothing
