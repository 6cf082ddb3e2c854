"""Device profiles: loading, validation and selection.

A profile is a TOML file (data only, see ``docs/device_profiles.md``) that says how to recognise
a kind of box and what to run on it. The shipped ones live in ``device_profiles/`` (the package
``edgeagent.device_profiles``); operators may add a directory of their own, whose profiles
replace shipped ones of the same name. Every file is validated on load: unknown keys, wrong
types, unknown provider/delegate/precision names are a :class:`ProfileError` naming the file
and the key path.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.device.facts import LIBRARIES, DeviceFacts
from edgeagent.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite")
PRECISIONS = ("fp32", "fp16", "int8")
ARCHES = ("aarch64", "x86_64", "armv7l")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: onnxruntime execution providers a profile may name.
PROVIDERS = (
    TENSORRT,
    CUDA,
    "OpenVINOExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DnnlExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "XnnpackExecutionProvider",
    "QNNExecutionProvider",
    CPU,
)

#: LiteRT delegates a profile may name -> the library it is loaded from ("" = built in).
DELEGATES: dict[str, str] = {
    "edgetpu": "libedgetpu.so.1",
    "xnnpack": "",
    "gpu": "libtensorflowlite_gpu_delegate.so",
}

#: Options the planner sets itself, from the model precision and the cache directory.
PLANNER_OPTIONS = frozenset({
    "trt_fp16_enable", "trt_int8_enable",
    "trt_engine_cache_enable", "trt_engine_cache_path",
    "trt_timing_cache_enable", "trt_timing_cache_path",
})

_OptionType = type | tuple[str, ...]

#: Options a profile may set for TensorRT and CUDA, with their type or allowed values.
#: Other providers' options pass through as given (str, int, float or bool).
_PROVIDER_OPTIONS: dict[str, dict[str, _OptionType]] = {
    TENSORRT: {
        "device_id": int,
        "trt_max_workspace_size": int,
        "trt_max_partition_iterations": int,
        "trt_min_subgraph_size": int,
        "trt_builder_optimization_level": int,
        "trt_auxiliary_streams": int,
        "trt_dla_enable": bool,
        "trt_dla_core": int,
        "trt_layer_norm_fp32_fallback": bool,
        "trt_force_sequential_engine_build": bool,
        "trt_context_memory_sharing_enable": bool,
        "trt_build_heuristics_enable": bool,
        "trt_sparsity_enable": bool,
        "trt_cuda_graph_enable": bool,
        "trt_detailed_build_log": bool,
        "trt_engine_hw_compatible": bool,
        "trt_tactic_sources": str,
        "trt_extra_plugin_lib_paths": str,
    },
    CUDA: {
        "device_id": int,
        "gpu_mem_limit": int,
        "arena_extend_strategy": ("kNextPowerOfTwo", "kSameAsRequested"),
        "cudnn_conv_algo_search": ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
        "do_copy_in_default_stream": bool,
        "cudnn_conv_use_max_workspace": bool,
        "cudnn_conv1d_pad_to_nc1d": bool,
        "enable_cuda_graph": bool,
        "use_tf32": bool,
        "prefer_nhwc": bool,
        "tunable_op_enable": bool,
        "tunable_op_tuning_enable": bool,
    },
}

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


@dataclass(frozen=True)
class MatchRule:
    """How a profile recognises a box; every criterion given must hold.

    Attributes:
        device_model: Substrings, any of which the device-tree model must contain
            (case-insensitive).
        arch: Architectures, one of which the box must have.
        gpu: True: a GPU must be present; False: none may be; None: either.
        libraries: Library keys (``nvinfer``, ``edgetpu``...) that must all be present.
    """

    device_model: tuple[str, ...] = ()
    arch: tuple[str, ...] = ()
    gpu: bool | None = None
    libraries: tuple[str, ...] = ()

    @property
    def specificity(self) -> int:
        """How many criteria the rule has (breaks priority ties: the more specific wins)."""
        return sum((bool(self.device_model), bool(self.arch), self.gpu is not None,
                    bool(self.libraries)))

    def to_dict(self) -> dict[str, Any]:
        return {"device_model": list(self.device_model), "arch": list(self.arch),
                "gpu": self.gpu, "libraries": list(self.libraries)}


@dataclass(frozen=True)
class ProviderSpec:
    """An onnxruntime execution provider as the profile lists it.

    Attributes:
        name: Provider name.
        options: Options from the profile (the planner adds precision and cache options).
        fp16: TensorRT only: may build fp16 engines.
        int8: TensorRT only: may build int8 engines (false on GPUs without int8 support).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    fp16: bool = True
    int8: bool = True


@dataclass(frozen=True)
class DelegateSpec:
    """A LiteRT delegate as the profile lists it (``library`` empty: built into LiteRT)."""

    name: str
    library: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceProfile:
    """One device profile, validated.

    Attributes:
        name: The file's stem (``jetson-orin-nano``).
        source: The file it came from.
        description: One line for humans.
        priority: Higher wins when several profiles match.
        match: How the box is recognised.
        formats: Model formats in order of preference.
        onnx_precisions: Preferred precisions of ONNX variants, best first.
        onnx_providers: Execution providers in the order to try.
        tflite_precisions: Preferred precisions of TFLite variants, best first.
        tflite_delegates: Delegates in the order to try.
        threads: Intra-op threads (0 = all cores).
        memory_budget_mb: Memory the agent's models may use.
        gpu_install_hint: How to get onnxruntime with GPU providers on this kind of box.
        notes: Free text (caveats of the platform).
    """

    name: str
    source: str
    description: str
    priority: int
    match: MatchRule
    formats: tuple[str, ...]
    onnx_precisions: tuple[str, ...]
    onnx_providers: tuple[ProviderSpec, ...]
    tflite_precisions: tuple[str, ...]
    tflite_delegates: tuple[DelegateSpec, ...]
    threads: int = 0
    memory_budget_mb: int = 1024
    gpu_install_hint: str = ""
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "description": self.description,
            "priority": self.priority,
            "match": self.match.to_dict(),
            "formats": list(self.formats),
            "onnx": {
                "precisions": list(self.onnx_precisions),
                "providers": [{"name": p.name, "options": dict(p.options),
                               "fp16": p.fp16, "int8": p.int8} for p in self.onnx_providers],
            },
            "tflite": {
                "precisions": list(self.tflite_precisions),
                "delegates": [{"name": d.name, "library": d.library, "options": dict(d.options)}
                              for d in self.tflite_delegates],
            },
            "threads": self.threads,
            "memory_budget_mb": self.memory_budget_mb,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Candidate:
    """A profile considered during selection, and why it won or lost."""

    name: str
    matched: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "matched": self.matched, "reason": self.reason}


@dataclass(frozen=True)
class ProfileSelection:
    """The chosen profile, why, and the others considered (best first)."""

    profile: DeviceProfile
    reason: str
    candidates: tuple[Candidate, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "reason": self.reason,
                "candidates": [c.to_dict() for c in self.candidates]}


# --- loading ------------------------------------------------------------------------------------


def load_profiles(extra_dir: Path | None = None) -> dict[str, DeviceProfile]:
    """Load the shipped profiles, then those in ``extra_dir`` (which replace same-named ones).

    Args:
        extra_dir: An operator's directory of ``*.toml`` profiles (the config's
            ``agent.profiles_dir``), or None.

    Returns:
        Profiles by name, sorted by name.

    Raises:
        ProfileError: a file is invalid, or ``extra_dir`` is not a readable directory.
    """
    profiles: dict[str, DeviceProfile] = {}
    shipped = importlib.resources.files("edgeagent.device_profiles")
    for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml") and entry.is_file():
            name = entry.name[: -len(".toml")]
            profiles[name] = parse_profile(entry.read_bytes(), name, str(entry))
    if extra_dir is not None:
        if not Path(extra_dir).is_dir():
            raise ProfileError("profiles directory does not exist (agent.profiles_dir)",
                               file=str(extra_dir))
        try:
            files = sorted(Path(extra_dir).glob("*.toml"))
        except OSError as exc:
            raise ProfileError(f"profiles directory is not readable: {exc.strerror}",
                               file=str(extra_dir)) from exc
        for path in files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ProfileError(f"cannot read: {exc.strerror}", file=str(path)) from exc
            if path.stem in profiles:
                log.info("profile %s from %s replaces the shipped one", path.stem, path)
            profiles[path.stem] = parse_profile(data, path.stem, str(path))
    return dict(sorted(profiles.items()))


def parse_profile(data: bytes, name: str, source: str) -> DeviceProfile:
    """Parse and validate one profile document.

    Args:
        data: The TOML bytes.
        name: The profile's name (the file stem).
        source: The file, for error messages.

    Raises:
        ProfileError: naming ``source`` and the offending key path.
    """
    if not _NAME.fullmatch(name):
        raise ProfileError(f"profile name {name!r} must be lower-case letters, digits, "
                           "'-', '.' or '_'", file=source)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"not UTF-8 text: {exc}", file=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"invalid TOML: {exc}", file=source) from exc
    top = _Table(doc, source, "")
    onnx = top.table("onnx")
    tflite = top.table("tflite")
    profile = DeviceProfile(
        name=name,
        source=source,
        description=top.get("description", str),
        priority=top.get("priority", int),
        match=_parse_match(top.table("match")),
        formats=tuple(top.names("formats", FORMATS, default=list(FORMATS))),
        onnx_precisions=tuple(onnx.names("precisions", PRECISIONS)),
        onnx_providers=_parse_providers(onnx),
        tflite_precisions=tuple(tflite.names("precisions", PRECISIONS)),
        tflite_delegates=_parse_delegates(tflite),
        threads=top.get("threads", int, default=0, minimum=0),
        memory_budget_mb=top.get("memory_budget_mb", int, minimum=1),
        gpu_install_hint=top.get("gpu_install_hint", str, default=""),
        notes=top.get("notes", str, default=""),
    )
    for table in (onnx, tflite, top):
        table.done()
    return profile


def _parse_match(t: _Table) -> MatchRule:
    rule = MatchRule(
        device_model=tuple(t.strings("device_model")),
        arch=tuple(t.names("arch", ARCHES, default=[])),
        gpu=t.get("gpu", bool, default=None),
        libraries=tuple(t.names("libraries", tuple(LIBRARIES), default=[])),
    )
    t.done()
    return rule


def _parse_providers(onnx: _Table) -> tuple[ProviderSpec, ...]:
    specs: list[ProviderSpec] = []
    tables = onnx.tables("providers")
    for i, t in enumerate(tables):
        name = t.get("name", str)
        if name not in PROVIDERS:
            raise t.error("name", f"unknown execution provider {name!r} "
                                  f"(known: {', '.join(PROVIDERS)})")
        if name == CPU and i != len(tables) - 1:
            raise t.error("name", "CPUExecutionProvider must come last (it is the fallback)")
        if name in (s.name for s in specs):
            raise t.error("name", f"{name} is listed twice")
        if name == TENSORRT:
            fp16 = t.get("fp16", bool, default=True)
            int8 = t.get("int8", bool, default=True)
        else:
            fp16 = int8 = True
        options = _parse_options(t.table("options", required=False), name)
        t.done()
        specs.append(ProviderSpec(name, options, fp16=fp16, int8=int8))
    return tuple(specs)


def _parse_options(t: _Table, provider: str) -> dict[str, Any]:
    known = _PROVIDER_OPTIONS.get(provider)
    options: dict[str, Any] = {}
    for key in t.present():
        if key in PLANNER_OPTIONS:
            raise t.error(key, "set by the planner from the model precision and cache directory; "
                               "use the provider's fp16/int8 keys instead")
        if known is None:
            options[key] = t.get(key, (str, int, float, bool))
        elif key not in known:
            raise t.error(key, f"unknown {provider} option (known: {', '.join(sorted(known))})")
        else:
            kind = known[key]
            options[key] = t.choice(key, kind) if isinstance(kind, tuple) else t.get(key, kind)
    t.done()
    return options


def _parse_delegates(tflite: _Table) -> tuple[DelegateSpec, ...]:
    specs: list[DelegateSpec] = []
    for t in tflite.tables("delegates"):
        name = t.choice("name", tuple(DELEGATES))
        if name in (s.name for s in specs):
            raise t.error("name", f"delegate {name} is listed twice")
        default_library = DELEGATES[name]
        library = t.get("library", str, default=default_library)
        if not default_library and library:
            raise t.error("library", f"the {name} delegate is built into LiteRT; it has no library")
        options_table = t.table("options", required=False)
        options = {k: options_table.get(k, (str, int, float, bool))
                   for k in options_table.present()}
        options_table.done()
        t.done()
        specs.append(DelegateSpec(name, library, options))
    return tuple(specs)


class _Table:
    """A TOML table being validated: typed getters that remember which keys were read."""

    def __init__(self, data: Mapping[str, Any], source: str, path: str) -> None:
        self._data = data
        self._source = source
        self._path = path
        self._used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: str, message: str) -> ProfileError:
        return ProfileError(message, file=self._source, key_path=self._key(key))

    def present(self) -> list[str]:
        """The keys the table has."""
        return list(self._data)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...,
            minimum: int | None = None) -> Any:
        self._used.add(key)
        if key not in self._data:
            if default is ...:
                raise self.error(key, "required key is missing")
            return default
        value = self._data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python but not in TOML: `priority = true` is a mistake.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(key, f"expected {names}, got {_describe(value)}")
        if minimum is not None and isinstance(value, int) and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value: str = self.get(key, str)
        if value not in allowed:
            raise self.error(key, f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def strings(self, key: str) -> list[str]:
        values = self.get(key, list, default=[])
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise self.error(f"{key}[{i}]", f"expected a non-empty string, got "
                                                f"{_describe(value)}")
        return list(values)

    def names(self, key: str, allowed: tuple[str, ...], default: Any = ...) -> list[str]:
        if key not in self._data and default is not ...:
            self._used.add(key)
            return list(default)
        values = self.get(key, list)
        if not values and default is ...:
            raise self.error(key, "must not be empty")
        seen: list[str] = []
        for i, value in enumerate(values):
            if not isinstance(value, str) or value not in allowed:
                raise self.error(f"{key}[{i}]", f"{value!r} is not one of {', '.join(allowed)}")
            if value in seen:
                raise self.error(f"{key}[{i}]", f"{value!r} is listed twice")
            seen.append(value)
        return seen

    def table(self, key: str, required: bool = True) -> _Table:
        value = self.get(key, dict, default=... if required else {})
        return _Table(value, self._source, self._key(key))

    def tables(self, key: str) -> list[_Table]:
        values = self.get(key, list, default=[])
        out = []
        for i, value in enumerate(values):
            if not isinstance(value, dict):
                raise self.error(f"{key}[{i}]", f"expected a table, got {_describe(value)}")
            out.append(_Table(value, self._source, self._key(f"{key}[{i}]")))
        return out

    def done(self) -> None:
        """Raise for the first key that no getter asked for."""
        for key in self._data:
            if key not in self._used:
                raise self.error(key, "unknown key")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "a table"}


def _describe(value: Any) -> str:
    return f"{_TYPE_NAMES.get(type(value), type(value).__name__)} ({value!r})"


def _tie_break(winner: DeviceProfile, loser: DeviceProfile) -> str:
    if winner.priority != loser.priority:
        return f"on priority ({winner.priority} over {loser.priority})"
    if winner.match.specificity != loser.match.specificity:
        return (f"on specificity ({winner.match.specificity} criteria over "
                f"{loser.match.specificity})")
    return "on name order (same priority and specificity)"


# --- selection ----------------------------------------------------------------------------------


def match_profile(profile: DeviceProfile, facts: DeviceFacts) -> tuple[bool, str]:
    """Whether ``profile`` matches the box, with the human reason either way."""
    won: list[str] = []
    for ok, text in _criteria(profile.match, facts):
        if not ok:
            return False, text
        won.append(text)
    return True, "; ".join(won) or "no criteria (matches every box)"


def _criteria(rule: MatchRule, facts: DeviceFacts) -> Iterator[tuple[bool, str]]:
    """Each criterion of ``rule`` in turn: (holds, why)."""
    if rule.device_model:
        model = facts.device_model
        hit = next((s for s in rule.device_model if model and s.lower() in model.lower()), None)
        if model is None:
            yield False, "no device-tree model on this box"
        elif hit is None:
            wanted = ", ".join(repr(s) for s in rule.device_model)
            yield False, f"device-tree model {model!r} contains none of {wanted}"
        else:
            yield True, f"device-tree model {model!r} contains {hit!r}"
    if rule.arch:
        ok = facts.arch in rule.arch
        yield ok, (f"architecture {facts.arch}" if ok else
                   f"architecture {facts.arch or 'unknown'} is not {' or '.join(rule.arch)}")
    if rule.gpu is True:
        yield (bool(facts.gpus),
               f"GPU {facts.gpus[0].name}" if facts.gpus else "needs a GPU; none found")
    elif rule.gpu is False:
        yield (not facts.gpus,
               f"for boxes without a GPU; found {facts.gpus[0].name}" if facts.gpus else "no GPU")
    for key in rule.libraries:
        info = facts.libraries.get(key)
        yield (info is not None,
               f"{info.path} present" if info else f"needs {LIBRARIES[key][0]}; not found")


def select_profile(profiles: Mapping[str, DeviceProfile], facts: DeviceFacts,
                   forced: str | None = None) -> ProfileSelection:
    """Choose the profile for this box.

    Args:
        profiles: Profiles by name (from :func:`load_profiles`).
        facts: The box.
        forced: A profile name from the config (``agent.profile``); None or ``"auto"`` detects.

    Returns:
        The profile, the reason, and every other profile with why it lost.

    Raises:
        ProfileError: ``forced`` names no known profile, or no profile matches the box.
    """
    results = {name: match_profile(p, facts) for name, p in profiles.items()}
    matched = sorted((p for p in profiles.values() if results[p.name][0]),
                     key=lambda p: (-p.priority, -p.match.specificity, p.name))
    if forced not in (None, "auto"):
        if forced not in profiles:
            raise ProfileError(f"unknown device profile {forced!r} (known: "
                               f"{', '.join(sorted(profiles))})", key_path="agent.profile")
        chosen = profiles[forced]
        reason = f"forced by configuration (agent.profile = {forced!r})"
    elif matched:
        chosen = matched[0]
        reason = results[chosen.name][1]
    else:
        raise ProfileError(
            "no device profile matches this box (architecture "
            f"{facts.arch or 'unknown'}, device-tree model {facts.device_model!r}); set "
            f"agent.profile to one of: {', '.join(sorted(profiles))}", key_path="agent.profile")
    candidates = []
    for p in [*matched, *(p for p in profiles.values() if not results[p.name][0])]:
        if p.name == chosen.name:
            continue
        ok, why = results[p.name]
        if ok and forced in (None, "auto"):
            why = f"matched ({why}) but {chosen.name} wins {_tie_break(chosen, p)}"
        candidates.append(Candidate(p.name, ok, why))
    return ProfileSelection(chosen, reason, tuple(candidates))
