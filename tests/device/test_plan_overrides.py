"""Per-model overrides in the provider plan, and the variants tuning may try: table-driven."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any

import pytest

from edgeagent.device.facts import DeviceFacts, RuntimeFacts, collect_facts
from edgeagent.device.plan import PlanOverrides, loadable_variants, plan_providers, rank_variants
from edgeagent.device.profiles import DeviceProfile, load_profiles, select_profile
from tests.device.trees import BOARDS

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
HASH = "9f86d081884c7d659a2feaa0c55ad015"
CACHE = PurePath("/var/lib/edgeagent/trt-cache")
NOT_WANTED = "not in this model's providers"


def board(tmp_path: Path, name: str, runtimes: RuntimeFacts | None = None
          ) -> tuple[DeviceProfile, DeviceFacts]:
    spec = BOARDS[name]
    facts = collect_facts(spec.build(tmp_path), runtimes or spec.runtimes)
    return select_profile(load_profiles(), facts).profile, facts


# board, format, precision, override providers, planned (in order), excluded {name: reason part}
CASES: list[tuple[str, str, str, tuple[str, ...], list[str], dict[str, str]]] = [
    ("x86-nvidia", "onnx", "fp16", (CUDA,), [CUDA, CPU], {TRT: NOT_WANTED}),
    ("x86-nvidia", "onnx", "fp16", (CPU,), [CPU], {TRT: NOT_WANTED, CUDA: NOT_WANTED}),
    ("agx-orin", "onnx", "fp16", (CUDA, TRT), [CUDA, TRT, CPU], {}),
    ("agx-orin", "onnx", "fp16", (), [TRT, CUDA, CPU], {}),
    ("x86-cpu", "onnx", "int8", (CUDA, CPU), [CPU], {TRT: NOT_WANTED, CUDA: "no NVIDIA GPU"}),
    ("x86-cpu", "onnx", "fp32", ("OpenVINOExecutionProvider",), [CPU],
     {"OpenVINOExecutionProvider": "offers only", TRT: NOT_WANTED, CUDA: NOT_WANTED}),
    ("nano", "onnx", "int8", (TRT,), [CPU], {TRT: "does not allow int8", CUDA: NOT_WANTED}),
    ("pi5", "tflite", "int8", ("cpu",), [], {"xnnpack": NOT_WANTED, "edgetpu": NOT_WANTED}),
    ("pi5", "tflite", "int8", ("xnnpack",), ["xnnpack"], {"edgetpu": NOT_WANTED}),
    ("x86-cpu", "tflite", "fp32", ("gpu",), [],
     {"gpu": "lists no delegate", "edgetpu": NOT_WANTED, "xnnpack": NOT_WANTED}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{'+'.join(c[3]) or 'profile'}"
                                             for c in CASES])
def test_override_providers(tmp_path: Path, case: Any) -> None:
    name, fmt, precision, wanted, planned, excluded = case
    profile, facts = board(tmp_path, name)
    plan = plan_providers(profile, facts, fmt, precision, cache_dir=CACHE, model_hash=HASH,
                          overrides=PlanOverrides(wanted))
    assert [p.name for p in plan.providers] == planned
    reasons = {e.name: e.reason for e in plan.excluded}
    assert set(reasons) == set(excluded)
    for provider, part in excluded.items():
        assert part in reasons[provider], reasons[provider]


def test_overridden_tensorrt_keeps_its_cache_options(tmp_path: Path) -> None:
    profile, facts = board(tmp_path, "agx-orin")
    plan = plan_providers(profile, facts, "onnx", "fp16", cache_dir=CACHE, model_hash=HASH,
                          overrides=PlanOverrides((TRT,)))
    assert plan.providers[0].options["trt_engine_cache_enable"] is True
    assert plan.providers[0].options["trt_fp16_enable"] is True


@pytest.mark.parametrize(("threads", "expected"), [(None, 0), (0, 0), (1, 1), (6, 6)])
def test_override_threads(tmp_path: Path, threads: int | None, expected: int) -> None:
    profile, facts = board(tmp_path, "x86-cpu")
    assert profile.threads == 0
    for fmt in ("onnx", "tflite"):
        plan = plan_providers(profile, facts, fmt, "fp32", cache_dir=CACHE, model_hash=HASH,
                              overrides=PlanOverrides(threads=threads))
        assert plan.threads == expected


def _v(file: str, fmt: str = "onnx", precision: str = "fp32",
       needs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"file": file, "format": fmt, "precision": precision, "needs": needs or {}}


def test_loadable_variants_beyond_the_profiles_preference(tmp_path: Path) -> None:
    # x86-64-cpu prefers int8 then fp32; fp16 is not ranked, yet the runtime loads it.
    profile, facts = board(tmp_path, "x86-cpu", RuntimeFacts(ort_providers=(CPU,)))
    variants = [_v("m-fp16.onnx", precision="fp16"), _v("m.onnx"),
                _v("m-int8.onnx", precision="int8"), _v("m.tflite", "tflite"),
                _v("m-arm.onnx", needs={"arch": ["aarch64"]}),
                _v("m-trt.onnx", needs={"providers": [TRT]}), _v("m.xyz", "xyz")]
    ranked = rank_variants(profile, facts, variants)
    assert [v["file"] for v in ranked.ranked] == ["m-int8.onnx", "m.onnx"]
    usable = loadable_variants(profile, facts, variants)
    assert [v["file"] for v in usable.ranked] == ["m-int8.onnx", "m.onnx", "m-fp16.onnx"]
    reasons = {r.variant["file"]: r.reason for r in usable.rejected}
    assert set(reasons) == {"m.tflite", "m-arm.onnx", "m-trt.onnx", "m.xyz"}
    assert "LiteRT" in reasons["m.tflite"]
    assert "aarch64" in reasons["m-arm.onnx"]
    assert "needs TensorrtExecutionProvider" in reasons["m-trt.onnx"]
    assert "unknown format" in reasons["m.xyz"]


def test_probe_shows_the_overrides_and_their_plan(tmp_path: Path) -> None:
    from edgeagent.device.probe import ModelOverrides, format_probe_text, probe_report

    runtimes = RuntimeFacts(ort_providers=(CPU,))
    report = probe_report(BOARDS["x86-cpu"].build(tmp_path), None, tmp_path, runtimes=runtimes,
                          models=[ModelOverrides("det", "onnx", PlanOverrides((CUDA,), 2),
                                                 "fp32", "det.onnx", True)])
    (entry,) = report["models"]
    assert entry["overrides"] == {"providers": [CUDA], "threads": 2, "precision": "fp32",
                                  "variant": "det.onnx", "tune": True}
    assert [p["name"] for p in entry["plan"]["providers"]] == [CPU]
    assert entry["plan"]["threads"] == 2
    text = format_probe_text(report)
    assert "det: providers CUDAExecutionProvider; precision fp32; variant det.onnx; " \
           "threads 2; tuned on the box" in text
    assert "without CUDAExecutionProvider:" in text
