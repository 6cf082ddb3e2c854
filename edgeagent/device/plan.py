"""Execution-provider planning: a pure function of profile, device facts and model.

No environment reads, no file writes, no imports of runtimes: everything the decision needs is
passed in, so the choice is tested table-driven on fake device trees.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from edgeagent.device.facts import LIBRARIES, DeviceFacts
from edgeagent.device.profiles import (
    CPU,
    CUDA,
    FORMATS,
    PRECISIONS,
    TENSORRT,
    DelegateSpec,
    DeviceProfile,
    ProviderSpec,
)
from edgeagent.errors import ModelError

#: Folder under the agent's state_dir that holds TensorRT engine and timing caches.
TRT_CACHE_DIRNAME = "trt-cache"

#: Order in which CPU kernels are fastest; used for variants when no accelerator is usable
#: (an fp16 model on CPU runs through casts and is the slowest of the three).
CPU_PRECISION_ORDER = ("int8", "fp32", "fp16")

_LITERT_HINT = "pip install 'edgeagent[litert]'"
_ORT_HINTS = {
    TENSORRT: "install onnxruntime-gpu built with TensorRT",
    CUDA: "install onnxruntime-gpu: pip install 'edgeagent[gpu]'",
}


@dataclass(frozen=True)
class PlannedProvider:
    """One execution provider (onnxruntime) or delegate (LiteRT) to try, with its options.

    Attributes:
        name: onnxruntime provider name (``TensorrtExecutionProvider``) or delegate name
            (``edgetpu``, ``xnnpack``, ``gpu``).
        options: Provider options passed to the runtime as they are (strings/ints/bools).
        library: For delegates loaded from a shared library: its file name or path.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    library: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "options": dict(self.options)}
        if self.library:
            out["library"] = self.library
        return out


@dataclass(frozen=True)
class Exclusion:
    """A provider or delegate the profile lists but the plan leaves out, and why."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class ProviderPlan:
    """What a backend should try, in order, for one model on this box.

    Attributes:
        format: ``onnx`` or ``tflite``.
        precision: ``fp32``, ``fp16`` or ``int8`` (of the model variant).
        providers: Ordered providers/delegates; the backend falls back along this list. For ONNX
            it always ends with ``CPUExecutionProvider``; for TFLite the built-in CPU kernels
            are the implicit last resort.
        excluded: What the profile wanted but this box cannot have, with reasons.
        threads: Intra-op threads (onnxruntime) / interpreter threads (LiteRT); 0 = runtime default.
    """

    format: str
    precision: str
    providers: tuple[PlannedProvider, ...]
    excluded: tuple[Exclusion, ...] = ()
    threads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "precision": self.precision,
            "providers": [p.to_dict() for p in self.providers],
            "excluded": [e.to_dict() for e in self.excluded],
            "threads": self.threads,
        }


@dataclass(frozen=True)
class PlanOverrides:
    """What one model's ``[[models]]`` entry (or its tuning result) says instead of the profile.

    Attributes:
        providers: Providers (ONNX) or delegates (TFLite) to use, in this order; empty = the
            profile's. ONNX plans still end with ``CPUExecutionProvider`` (named or not); for
            TFLite, ``cpu`` alone means the built-in kernels only.
        threads: Threads instead of the profile's; None = the profile's (0 = runtime default).
    """

    providers: tuple[str, ...] = ()
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"providers": list(self.providers), "threads": self.threads}


NO_OVERRIDES = PlanOverrides()


@dataclass(frozen=True)
class RejectedVariant:
    """A model variant :func:`rank_variants` left out, and why."""

    variant: Any
    reason: str


@dataclass(frozen=True)
class VariantRanking:
    """Variants usable on this box, best first, and the rejected ones with reasons."""

    ranked: tuple[Any, ...]
    rejected: tuple[RejectedVariant, ...]


def preferred_precisions(profile: DeviceProfile, fmt: str) -> list[str]:
    """The precisions the profile prefers for a model format, best first.

    Raises:
        ModelError: ``fmt`` is not ``onnx`` or ``tflite``.
    """
    _check_format(fmt)
    return list(profile.onnx_precisions if fmt == "onnx" else profile.tflite_precisions)


def plan_providers(profile: DeviceProfile, facts: DeviceFacts, fmt: str, precision: str, *,
                   cache_dir: str | PurePath, model_hash: str,
                   overrides: PlanOverrides = NO_OVERRIDES) -> ProviderPlan:
    """Decide which providers (ONNX) or delegates (TFLite) to try for one model on this box.

    Pure: everything comes from the arguments. A provider the profile lists but the box cannot
    use is left out with an :class:`Exclusion` saying why; CPU is never excluded (it runs every
    precision, only slower). For ONNX the plan always ends with ``CPUExecutionProvider``.

    TensorRT gets ``trt_fp16_enable`` for fp16 and int8 models (int8 engines keep their
    unquantised layers in fp16) when the profile allows fp16, ``trt_int8_enable`` for int8
    models, and engine and timing caches in
    ``{cache_dir}/{model_hash[:16]}-trt{version}-{gpu}-{precision}``, so an engine is never
    reused across a TensorRT upgrade, another GPU or another precision.

    Args:
        profile: The device profile.
        facts: The box.
        fmt: ``onnx`` or ``tflite``.
        precision: ``fp32``, ``fp16`` or ``int8`` (of the model variant).
        cache_dir: Directory for TensorRT caches (``state_dir / TRT_CACHE_DIRNAME``).
        model_hash: Content hash of the model file (hex).
        overrides: The model's own providers (in order) and threads; what the profile lists
            and the override leaves out is excluded with the reason.

    Raises:
        ModelError: unknown format or precision, or a model hash unusable in a path.
    """
    _check_format(fmt)
    _check_precision(precision)
    if not re.fullmatch(r"[0-9A-Za-z_{}<>-]+", model_hash):
        raise ModelError(f"model hash {model_hash!r} is not usable in a cache path")
    threads = profile.threads if overrides.threads is None else overrides.threads
    if fmt == "tflite":
        delegates, excluded = _decide_delegates(profile, facts, precision, overrides.providers)
        planned = tuple(PlannedProvider(d.name, dict(d.options), d.library) for d in delegates)
        return ProviderPlan(fmt, precision, planned, tuple(excluded), threads)
    providers, excluded = _decide_providers(profile, facts, precision, overrides.providers)
    planned_list = []
    for spec in providers:
        options = dict(spec.options)
        if spec.name == TENSORRT:
            options.update(_tensorrt_options(spec, facts, precision, cache_dir, model_hash))
        planned_list.append(PlannedProvider(spec.name, options))
    return ProviderPlan(fmt, precision, tuple(planned_list), tuple(excluded), threads)


def rank_variants(profile: DeviceProfile, facts: DeviceFacts,
                  variants: Iterable[Any]) -> VariantRanking:
    """Order model variants best first for this box, rejecting those it cannot run.

    A variant is a mapping or an object with ``format``, ``precision`` and optional ``needs``
    (``arch``: architectures, one of which the box must have; ``providers`` / ``delegates``:
    at least one of them must be in the variant's plan). The order: variants that use an
    accelerator first, then the profile's format preference, then its precision preference
    (CPU order :data:`CPU_PRECISION_ORDER` when only the CPU is usable), then variants built
    for a specific accelerator before generic ones. Pure, like :func:`plan_providers`.
    """
    scored: list[tuple[tuple[int, ...], int, Any]] = []
    rejected: list[RejectedVariant] = []
    for index, variant in enumerate(variants):
        verdict = _score_variant(profile, facts, variant)
        if isinstance(verdict, str):
            rejected.append(RejectedVariant(variant, verdict))
        else:
            scored.append((verdict, index, variant))
    scored.sort(key=lambda item: (item[0], item[1]))
    return VariantRanking(tuple(v for _, _, v in scored), tuple(rejected))


def loadable_variants(profile: DeviceProfile, facts: DeviceFacts,
                      variants: Iterable[Any]) -> VariantRanking:
    """The variants the runtimes on this box can load, whatever the profile prefers (what
    tuning tries): those :func:`rank_variants` ranks first, in its order, then the rest in
    bundle order; rejected only for a format or precision nobody knows, a runtime that is
    missing, an architecture or a provider the box lacks. Pure."""
    variants = list(variants)
    ranked = rank_variants(profile, facts, variants).ranked
    rest: list[Any] = []
    rejected: list[RejectedVariant] = []
    for variant in variants:
        if any(variant is r for r in ranked):
            continue
        fmt, precision, needs = (_get(variant, k) for k in ("format", "precision", "needs"))
        problem = _variant_problem(profile, facts, fmt, precision, needs, strict=False)
        if problem is None:
            problem = _needs_problem(profile, facts, fmt, precision, needs)
        if problem is None:
            rest.append(variant)
        else:
            rejected.append(RejectedVariant(variant, problem))
    return VariantRanking((*ranked, *rest), tuple(rejected))


# --- the decisions --------------------------------------------------------------------------


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ModelError(f"unknown model format {fmt!r} (expected {' or '.join(FORMATS)})")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r} (expected {', '.join(PRECISIONS)})")


def _library(facts: DeviceFacts, key: str, what: str, hint: str = "") -> list[str]:
    if key in facts.libraries:
        return []
    library = LIBRARIES[key][0].removesuffix(".so")
    return [f"{what}: {library} not found" + (f" ({hint})" if hint else "")]


_NOT_WANTED = "not in this model's providers"


def _decide_providers(profile: DeviceProfile, facts: DeviceFacts, precision: str,
                      wanted: Sequence[str] = ()) -> tuple[list[ProviderSpec], list[Exclusion]]:
    offered = facts.runtimes.ort_providers
    chosen: list[ProviderSpec] = []
    excluded: list[Exclusion] = []
    cpu = next((s for s in profile.onnx_providers if s.name == CPU), ProviderSpec(CPU))
    specs = list(profile.onnx_providers)
    if wanted:
        listed = {s.name: s for s in specs}
        excluded += [Exclusion(s.name, _NOT_WANTED) for s in specs
                     if s.name not in wanted and s.name != CPU]
        specs = [listed.get(n, ProviderSpec(n)) for n in wanted]
    for spec in specs:
        if spec.name == CPU:
            continue
        reasons: list[str] = []
        if offered is None:
            reasons.append("onnxruntime cannot be imported on this box")
        elif spec.name not in offered:
            hint = ((profile.gpu_install_hint or _ORT_HINTS[spec.name])
                    if spec.name in _ORT_HINTS
                    else f"install an onnxruntime build with {spec.name}")
            reasons.append(f"onnxruntime on this box offers only {', '.join(offered)} ({hint})")
        if spec.name in (TENSORRT, CUDA) and not facts.gpus:
            reasons.append("no NVIDIA GPU found")
        if spec.name == TENSORRT:
            reasons += _library(facts, "nvinfer", "TensorRT")
            reasons += _library(facts, "cudart", "CUDA runtime")
            if precision == "int8" and not spec.int8:
                reasons.append(f"profile {profile.name} does not allow int8 TensorRT engines "
                               "on this GPU")
        elif spec.name == CUDA:
            reasons += _library(facts, "cudart", "CUDA runtime")
            reasons += _library(facts, "cudnn", "cuDNN")
        if reasons:
            excluded.append(Exclusion(spec.name, "; ".join(reasons)))
        else:
            chosen.append(spec)
    chosen.append(cpu)
    return chosen, excluded


def _decide_delegates(profile: DeviceProfile, facts: DeviceFacts, precision: str,
                      wanted: Sequence[str] = ()) -> tuple[list[DelegateSpec], list[Exclusion]]:
    runtimes = facts.runtimes
    chosen: list[DelegateSpec] = []
    excluded: list[Exclusion] = []
    specs = list(profile.tflite_delegates)
    if wanted:
        listed = {s.name: s for s in specs}
        excluded += [Exclusion(s.name, _NOT_WANTED) for s in specs if s.name not in wanted]
        excluded += [Exclusion(n, f"profile {profile.name} lists no delegate {n!r} (no library "
                                  "to load it from)")
                     for n in wanted if n not in listed and n != "cpu"]
        specs = [listed[n] for n in wanted if n in listed]
    for spec in specs:
        reasons: list[str] = []
        if not (runtimes.litert or runtimes.tflite_runtime):
            reasons.append(f"neither LiteRT nor tflite-runtime is installed ({_LITERT_HINT})")
        if spec.name == "edgetpu":
            if precision != "int8":
                reasons.append("the Edge TPU runs only int8 models (compiled by edgetpu_compiler)")
            if not facts.edgetpu_devices:
                reasons.append("no Edge TPU found (/dev/apex_0 or a Coral USB Accelerator)")
            reasons += _library(facts, "edgetpu", "Edge TPU delegate",
                                "install libedgetpu1-std from Coral's apt repository")
        elif spec.name == "gpu":
            reasons += _library(facts, "tflite_gpu", "TFLite GPU delegate",
                                "build it for this board's GPU driver")
        if reasons:
            excluded.append(Exclusion(spec.name, "; ".join(reasons)))
        else:
            chosen.append(spec)
    return chosen, excluded


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _tensorrt_options(spec: ProviderSpec, facts: DeviceFacts, precision: str,
                      cache_dir: str | PurePath, model_hash: str) -> dict[str, Any]:
    device_id = spec.options.get("device_id", 0)
    gpu = facts.gpus[device_id] if device_id < len(facts.gpus) else facts.gpus[0]
    key = (f"{model_hash[:16]}-trt{facts.tensorrt_version or 'unknown'}-{_slug(gpu.name)}"
           f"-{precision}")
    cache = str(PurePath(cache_dir) / key)
    return {
        "trt_fp16_enable": spec.fp16 and precision in ("fp16", "int8"),
        "trt_int8_enable": precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
    }


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [str(value)]
    return [str(v) for v in value]


def _variant_problem(profile: DeviceProfile, facts: DeviceFacts, fmt: Any, precision: Any,
                     needs: Any, *, strict: bool = True) -> str | None:
    """Why a variant cannot run here on its face (before planning), or None. Not ``strict``:
    what the profile prefers does not count (only what the box can load)."""
    arches = _names(_get(needs, "arch"))
    problems = [
        (fmt not in FORMATS, f"unknown format {fmt!r}"),
        (precision not in PRECISIONS, f"unknown precision {precision!r}"),
        (strict and fmt not in profile.formats,
         f"profile {profile.name} does not run {fmt} models"),
        (strict and fmt in FORMATS and precision not in preferred_precisions(profile, fmt),
         f"{precision} is not among profile {profile.name}'s {fmt} precisions"),
        (bool(arches) and facts.arch not in arches,
         f"needs architecture {' or '.join(arches)}; this box is {facts.arch or 'unknown'}"),
        (fmt == "onnx" and facts.runtimes.ort_providers is None,
         "onnxruntime cannot be imported on this box"),
        (fmt == "tflite" and not (facts.runtimes.litert or facts.runtimes.tflite_runtime),
         f"neither LiteRT nor tflite-runtime is installed ({_LITERT_HINT})"),
    ]
    return next((text for bad, text in problems if bad), None)


def _planned(profile: DeviceProfile, facts: DeviceFacts, fmt: Any,
             precision: Any) -> tuple[list[str], list[Exclusion]]:
    """The providers (ONNX) or delegates (TFLite) the profile plans here, best first, and
    those it left out with why."""
    if fmt == "onnx":
        providers, excluded = _decide_providers(profile, facts, precision)
        return [s.name for s in providers], excluded
    delegates, excluded = _decide_delegates(profile, facts, precision)
    return [d.name for d in delegates], excluded


def _unmet_needs(profile: DeviceProfile, needs: Any, planned: list[str],
                 excluded: list[Exclusion]) -> str | None:
    wanted = _names(_get(needs, "providers")) + _names(_get(needs, "delegates"))
    if wanted and not set(wanted) & set(planned):
        why = {e.name: e.reason for e in excluded}
        detail = "; ".join(f"{w}: {why.get(w, f'not listed by profile {profile.name}')}"
                           for w in wanted)
        return f"needs {' or '.join(wanted)}, none usable here ({detail})"
    return None


def _needs_problem(profile: DeviceProfile, facts: DeviceFacts, fmt: Any, precision: Any,
                   needs: Any) -> str | None:
    """Why a variant's ``needs.providers``/``delegates`` cannot be met here, or None."""
    return _unmet_needs(profile, needs, *_planned(profile, facts, fmt, precision))


def _score_variant(profile: DeviceProfile, facts: DeviceFacts,
                   variant: Any) -> tuple[int, ...] | str:
    fmt, precision, needs = (_get(variant, k) for k in ("format", "precision", "needs"))
    problem = _variant_problem(profile, facts, fmt, precision, needs)
    if problem is not None:
        return problem
    planned, excluded = _planned(profile, facts, fmt, precision)
    problem = _unmet_needs(profile, needs, planned, excluded)
    if problem is not None:
        return problem
    plain = CPU if fmt == "onnx" else "xnnpack"
    accelerated = any(name != plain for name in planned)
    wanted = _names(_get(needs, "providers")) + _names(_get(needs, "delegates"))
    preferred = preferred_precisions(profile, fmt)
    if not accelerated:
        preferred.sort(key=CPU_PRECISION_ORDER.index)
    return (0 if accelerated else 1, profile.formats.index(fmt), preferred.index(precision),
            0 if wanted else 1)
