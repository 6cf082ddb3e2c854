"""``edgeagent probe``: what this box is, which profile it gets and what would run on it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.device.facts import DeviceFacts, RuntimeFacts, collect_facts
from edgeagent.device.plan import TRT_CACHE_DIRNAME, PlanOverrides, plan_providers
from edgeagent.device.profiles import (
    CUDA,
    PRECISIONS,
    TENSORRT,
    DeviceProfile,
    load_profiles,
    select_profile,
)

NO_BUILD_FIX = "pip install 'edgeagent[cpu]' (or 'edgeagent[gpu]' on an NVIDIA box)"
BOTH_BUILDS_FIX = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                   "'edgeagent[gpu]' (or 'edgeagent[cpu]')")

#: Stands for the model's content hash in the cache paths probe shows.
MODEL_HASH_PLACEHOLDER = "{model_hash}"

#: (profile, facts) -> per configured hub model, the variant it would run on this box.
HubVariants = Callable[[DeviceProfile, DeviceFacts], list[dict[str, Any]]]


@dataclass(frozen=True)
class ModelOverrides:
    """A configured model's own choices (its ``[[models]]`` overrides), for the probe."""

    name: str
    format: str
    """``onnx`` or ``tflite`` (a path model's suffix; hub models: ``onnx``)."""
    overrides: PlanOverrides
    precision: str = ""
    variant: str = ""
    tune: bool = False


def probe_report(root: Path, forced_profile: str | None, state_dir: Path, *,
                 profiles_dir: Path | None = None,
                 runtimes: RuntimeFacts | None = None,
                 hub_variants: HubVariants | None = None,
                 cache_dir: Path | None = None,
                 models: Sequence[ModelOverrides] = ()) -> dict[str, Any]:
    """Everything ``edgeagent probe`` shows, as a JSON-able dict.

    Args:
        root: Root of the device tree (``/`` on a real box).
        forced_profile: The config's ``agent.profile`` (None or ``"auto"``: detect).
        state_dir: The agent's state directory (TensorRT caches go under it).
        profiles_dir: The operator's extra profile directory, if any.
        runtimes: Python-environment facts; detected live when omitted.
        hub_variants: Gives, for the chosen profile and the facts, the variant each configured
            hub model would run here (the caller knows the hub; the device side does not).
        cache_dir: Where TensorRT caches go (default ``state_dir``; ``$CACHE_DIRECTORY``
            under systemd).
        models: The configured models' overrides; each gets the plan they make.

    Returns:
        ``facts``, ``profile`` (name, reason, candidates, the profile itself), ``plans`` (one per
        format and precision, the profile's preferred ones first), ``installed`` (runtime
        package versions), ``missing`` (what to install, with the command) and ``hub_models``
        (per configured hub model: the variant this box would run, or why it is not known)
        and ``models`` (per model with overrides: them, and the plan they give).

    Raises:
        ProfileError: a profile file is invalid, the forced profile is unknown, or none matches.
    """
    facts = collect_facts(Path(root), runtimes)
    profiles = load_profiles(profiles_dir)
    selection = select_profile(profiles, facts, forced_profile)
    profile = selection.profile
    trt_cache = Path(cache_dir or state_dir) / TRT_CACHE_DIRNAME
    plans = []
    for fmt, preferred in (("onnx", profile.onnx_precisions),
                           ("tflite", profile.tflite_precisions)):
        ordered = [*preferred, *(p for p in PRECISIONS if p not in preferred)]
        for precision in ordered:
            plan = plan_providers(profile, facts, fmt, precision, cache_dir=trt_cache,
                                  model_hash=MODEL_HASH_PLACEHOLDER).to_dict()
            plan["preferred"] = precision in preferred
            plans.append(plan)
    return {
        "facts": facts.to_dict(),
        "profile": {**selection.to_dict(), "details": profile.to_dict()},
        "plans": plans,
        "installed": dict(facts.runtimes.packages),
        "onnxruntime_build": onnxruntime_build(facts.runtimes.packages),
        "missing": _missing(profile, facts),
        "hub_models": hub_variants(profile, facts) if hub_variants is not None else [],
        "models": [_model_plan(profile, facts, m, trt_cache) for m in models],
    }


def _model_plan(profile: DeviceProfile, facts: DeviceFacts, m: ModelOverrides,
                cache_dir: Path) -> dict[str, Any]:
    preferred = profile.onnx_precisions if m.format == "onnx" else profile.tflite_precisions
    precision = m.precision or (preferred[0] if preferred else "fp32")
    plan = plan_providers(profile, facts, m.format, precision, cache_dir=cache_dir,
                          model_hash=MODEL_HASH_PLACEHOLDER, overrides=m.overrides)
    return {"name": m.name, "overrides": {**m.overrides.to_dict(), "precision": m.precision,
                                          "variant": m.variant, "tune": m.tune},
            "plan": plan.to_dict()}


def onnxruntime_build(packages: Mapping[str, str]) -> dict[str, Any]:
    """Which onnxruntime build is installed: ``cpu`` (onnxruntime), ``gpu`` (onnxruntime-gpu),
    ``both`` (they overwrite each other's files: a warning) or ``none``, with the versions."""
    cpu, gpu = packages.get("onnxruntime"), packages.get("onnxruntime-gpu")
    build = "both" if cpu and gpu else "cpu" if cpu else "gpu" if gpu else "none"
    out: dict[str, Any] = {"build": build,
                           "packages": {k: v for k, v in (("onnxruntime", cpu),
                                                          ("onnxruntime-gpu", gpu)) if v}}
    if build == "both":
        out["warning"] = (f"onnxruntime {cpu} and onnxruntime-gpu {gpu} are both installed: they "
                          "install the same module and whichever came last wins; keep one: "
                          + BOTH_BUILDS_FIX)
    elif build == "none":
        out["warning"] = "no onnxruntime build: ONNX models cannot run; " + NO_BUILD_FIX
    return out


def _missing(profile: DeviceProfile, facts: DeviceFacts) -> list[dict[str, str]]:
    packages = facts.runtimes.packages
    out: list[dict[str, str]] = []

    def need(what: str, why: str, hint: str) -> None:
        out.append({"package": what, "why": why, "hint": hint})

    if "onnxruntime" not in packages and "onnxruntime-gpu" not in packages:
        need("onnxruntime", "runs ONNX models (the core names no build: add one)", NO_BUILD_FIX)
    elif "onnxruntime" in packages and "onnxruntime-gpu" in packages:
        # Both install the same `onnxruntime` module; whichever was installed last wins.
        need("one onnxruntime build", "onnxruntime and onnxruntime-gpu are both installed and "
             "overwrite each other", BOTH_BUILDS_FIX)
    if not (facts.runtimes.litert or facts.runtimes.tflite_runtime):
        need("ai-edge-litert", "runs TFLite models", "pip install 'edgeagent[litert]'")
    offered = facts.runtimes.ort_providers or ()
    listed = {p.name for p in profile.onnx_providers}
    if facts.gpus and listed & {TENSORRT, CUDA} and CUDA not in offered:
        need("onnxruntime-gpu", "the GPU is there but onnxruntime offers no CUDA provider",
             profile.gpu_install_hint or "pip install 'edgeagent[gpu]'")
    if any(not g.integrated for g in facts.gpus) and "nvidia-ml-py" not in packages:
        need("nvidia-ml-py", "GPU telemetry and names through NVML",
             "pip install 'edgeagent[gpu]'")
    wants_tpu = any(d.name == "edgetpu" for d in profile.tflite_delegates)
    if wants_tpu and facts.edgetpu_devices and "edgetpu" not in facts.libraries:
        need("libedgetpu1-std", "an Edge TPU is attached but its delegate library is missing",
             "apt install libedgetpu1-std (from Coral's apt repository)")
    return out


def format_probe_text(report: dict[str, Any]) -> str:
    """Render :func:`probe_report`'s dict for a terminal."""
    facts = report["facts"]
    lines = ["Device"]

    def row(label: str, value: Any) -> None:
        lines.append(f"  {label:<18} {'unknown' if value in (None, '', []) else value}")

    row("architecture", facts["arch"])
    row("CPU", f"{facts['cpu_model'] or 'unknown'} x {facts['cpu_count'] or '?'}")
    row("memory", f"{facts['memory_mb']} MB" if facts["memory_mb"] else None)
    row("device-tree model", facts["device_model"])
    row("Jetson Linux", facts["l4t_release"])
    row("CUDA", facts["cuda_version"])
    row("cuDNN", facts["cudnn_version"])
    row("TensorRT", facts["tensorrt_version"])
    row("GPUs", ", ".join(f"{g['name']} ({g['source']})" for g in facts["gpus"]) or "none")
    row("Edge TPUs", ", ".join(facts["edgetpu_devices"]) or "none")
    runtimes = facts["runtimes"]
    ort = runtimes["ort_providers"]
    row("onnxruntime", ", ".join(ort) if ort is not None else "not importable")
    build = report["onnxruntime_build"]
    row("onnxruntime build", build["build"] + "".join(
        f", {k} {v}" for k, v in build["packages"].items()))
    tflite = [n for n, ok in (("LiteRT", runtimes["litert"]),
                              ("tflite-runtime", runtimes["tflite_runtime"])) if ok]
    row("TFLite", ", ".join(tflite) or "not installed")

    profile = report["profile"]
    lines += ["", f"Profile  {profile['profile']}: {profile['details']['description']}",
              f"  why: {profile['reason']}"]
    for cand in profile["candidates"]:
        lines.append(f"  not {cand['name']}: {cand['reason']}")
    if profile["details"]["notes"]:
        lines.append(f"  notes: {profile['details']['notes']}")

    lines += ["", "Plans (model format / precision: what is tried, in order)"]
    for plan in report["plans"]:
        mark = "" if plan["preferred"] else "  (not preferred by the profile)"
        names = " -> ".join(p["name"] for p in plan["providers"])
        if plan["format"] == "tflite":
            names = " -> ".join([*(p["name"] for p in plan["providers"]), "built-in CPU kernels"])
        lines.append(f"  {plan['format']} {plan['precision']}: {names}{mark}")
        for excl in plan["excluded"]:
            lines.append(f"      without {excl['name']}: {excl['reason']}")

    lines += ["", "Installed"]
    for name, version in sorted(report["installed"].items()):
        lines.append(f"  {name} {version}")
    if not report["installed"]:
        lines.append("  no runtime packages")
    if report.get("hub_models"):
        lines += ["", "Hub models (the variant this box would run)"]
        for m in report["hub_models"]:
            where = f" v{m['version']}" if m["version"] is not None else ""
            lines.append(f"  {m['name']}{where}: {m['variant'] or 'unknown'}")
            lines.append(f"      {m['reason']}")
    if "warning" in build:
        lines += ["", f"WARNING: {build['warning']}"]
    lines += _model_lines(report.get("models") or [])
    if report["missing"]:
        lines += ["", "Missing"]
        for item in report["missing"]:
            lines.append(f"  {item['package']}: {item['why']}")
            lines.append(f"      {item['hint']}")
    return "\n".join(lines) + "\n"


def _model_lines(models: list[dict[str, Any]]) -> list[str]:
    if not models:
        return []
    lines = ["", "Model overrides ([[models]] providers, precision, variant, threads, tune)"]
    for m in models:
        o, plan = m["overrides"], m["plan"]
        said = [f"providers {', '.join(o['providers'])}" if o["providers"] else "",
                f"precision {o['precision']}" if o["precision"] else "",
                f"variant {o['variant']}" if o["variant"] else "",
                f"threads {o['threads']}" if o["threads"] is not None else "",
                "tuned on the box" if o["tune"] else ""]
        lines.append(f"  {m['name']}: {'; '.join(x for x in said if x) or 'none'}")
        names = " -> ".join(p["name"] for p in plan["providers"]) or "built-in CPU kernels"
        lines.append(f"      {plan['format']} {plan['precision']}: {names}, "
                     f"{plan['threads'] or 'default'} thread(s)")
        for excl in plan["excluded"]:
            lines.append(f"      without {excl['name']}: {excl['reason']}")
    return lines
