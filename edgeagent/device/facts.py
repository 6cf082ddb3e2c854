"""Device facts: what this box is, read from a root directory.

Every file-level fact is read under ``root`` (``/`` on a real box, a fake tree in tests), and a
missing, unreadable or garbled file yields ``None`` ("unknown"), never an exception. Facts about
this Python environment (onnxruntime's providers, LiteRT, NVML, package versions) are
:class:`RuntimeFacts`; they are detected live unless passed in, so tests can build a fake Jetson
on an x86 laptop.

Architecture on a fake root: the live ``platform.machine()`` is used only when root is ``/``.
Under any other root the architecture comes from ``proc/sys/kernel/arch`` (the ``kernel.arch``
sysctl, Linux 6.1+), else it is inferred from ``proc/cpuinfo`` (``CPU architecture: 8`` is
aarch64, ``flags`` with ``lm`` is x86_64), so a fake tree claims aarch64 with real file shapes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Directories (relative to root) searched for CUDA, cuDNN, TensorRT and delegate libraries.
#: Globs are expanded in sorted order; JetPack keeps CUDA under /usr/local/cuda-12.x.
LIB_DIRS: tuple[str, ...] = (
    "usr/lib/aarch64-linux-gnu",
    "usr/lib/aarch64-linux-gnu/tegra",
    "usr/lib/aarch64-linux-gnu/nvidia",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "usr/local/lib",
    "usr/local/cuda/lib64",
    "usr/local/cuda/targets/*/lib",
    "usr/local/cuda-*/lib64",
    "usr/local/cuda-*/targets/*/lib",
)

#: Library key -> (file name stem, pip distributions that ship the same library).
LIBRARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cudart": ("libcudart.so", ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu11")),
    "cudnn": ("libcudnn.so", ("nvidia-cudnn-cu12", "nvidia-cudnn-cu11")),
    "nvinfer": ("libnvinfer.so", ("tensorrt", "tensorrt-cu12-libs", "tensorrt-libs")),
    "edgetpu": ("libedgetpu.so", ()),
    "tflite_gpu": ("libtensorflowlite_gpu_delegate.so", ()),
}

#: Runtime packages whose versions probe reports (distribution names as pip knows them).
RUNTIME_PACKAGES: tuple[str, ...] = (
    "onnxruntime",
    "onnxruntime-gpu",
    "ai-edge-litert",
    "tflite-runtime",
    "tensorrt",
    "tensorrt-cu12-libs",
    "tensorrt-libs",
    "nvidia-ml-py",
    "nvidia-cuda-runtime-cu12",
    "nvidia-cuda-runtime-cu11",
    "nvidia-cudnn-cu12",
    "nvidia-cudnn-cu11",
)

#: USB ids of the Coral USB Accelerator, before and after its firmware is loaded.
_CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}

#: (implementer, part) from /proc/cpuinfo -> core name, for ARM boards that print no model name.
_ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd04"): "Cortex-A35",
    ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd41"): "Cortex-A78",
    ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x41", "0xd4b"): "Cortex-A78C",
    ("0x4e", "0x003"): "NVIDIA Denver 2",
    ("0x4e", "0x004"): "NVIDIA Carmel",
}

_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x86-64": "x86_64", "x64": "x86_64"}

_MAX_READ = 1 << 20  # fact files are small; a huge one is not what we think it is


@dataclass(frozen=True)
class GpuInfo:
    """One GPU.

    Attributes:
        name: Marketing name (``NVIDIA GeForce RTX 3060``); for a Jetson's integrated GPU, the
            board's device-tree model, which is what identifies it for TensorRT engine caches.
        memory_mb: Dedicated memory, or ``None`` (integrated GPUs share system memory).
        integrated: True for a Tegra (Jetson) GPU.
        source: Where it was seen: ``nvml``, ``procfs`` or ``tegra``.
    """

    name: str
    memory_mb: int | None = None
    integrated: bool = False
    source: str = "nvml"
    compute_capability: str | None = None
    """``8.7`` (NVML), or None when unknown (what TensorRT engines and tuning results key on)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "memory_mb": self.memory_mb,
                "integrated": self.integrated, "source": self.source}


@dataclass(frozen=True)
class LibraryInfo:
    """A shared library found on the box (or shipped by a pip wheel in this environment).

    Attributes:
        name: The library key (``cudart``, ``cudnn``, ``nvinfer``, ``edgetpu``, ``tflite_gpu``).
        path: Where it was found (relative to root shown as absolute), or ``pip:DIST``.
        version: Version from the file name (``libnvinfer.so.10.3.0`` -> ``10.3.0``), if any.
    """

    name: str
    path: str
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "version": self.version}


@dataclass(frozen=True)
class RuntimeFacts:
    """Facts about this Python environment rather than the file tree.

    Attributes:
        ort_providers: What ``onnxruntime.get_available_providers()`` returns, or ``None`` when
            onnxruntime cannot be imported.
        litert: ``ai_edge_litert.interpreter`` is importable.
        tflite_runtime: ``tflite_runtime.interpreter`` is importable.
        nvml_gpus: GPUs NVML reports, or ``None`` when NVML is unavailable or was not asked.
        packages: Installed versions of :data:`RUNTIME_PACKAGES` (absent = not installed).
    """

    ort_providers: tuple[str, ...] | None = None
    litert: bool = False
    tflite_runtime: bool = False
    nvml_gpus: tuple[GpuInfo, ...] | None = None
    packages: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ort_providers": None if self.ort_providers is None else list(self.ort_providers),
            "litert": self.litert,
            "tflite_runtime": self.tflite_runtime,
            "nvml_gpus": None if self.nvml_gpus is None else [g.to_dict() for g in self.nvml_gpus],
            "packages": dict(self.packages),
        }


@dataclass(frozen=True)
class DeviceFacts:
    """What the box is. ``None`` means unknown (file missing, unreadable or garbled).

    Attributes:
        root: The root directory the facts were read under.
        arch: Normalised machine architecture (``aarch64``, ``x86_64``, ``armv7l``).
        cpu_count: Logical CPUs.
        cpu_model: CPU model name, or the ARM core name from its part number.
        memory_mb: Total memory.
        device_model: Device-tree model (``NVIDIA Jetson Orin Nano Developer Kit``).
        device_compatible: Device-tree ``compatible`` entries (``nvidia,tegra234``).
        l4t_release: Jetson Linux release (``36.3.0``) from ``/etc/nv_tegra_release``.
        cuda_version: CUDA toolkit version.
        cudnn_version: cuDNN version.
        tensorrt_version: TensorRT version.
        libraries: Libraries found, by key.
        edgetpu_devices: Edge TPUs found (``/dev/apex_0``, ``usb:1-1``).
        gpus: GPUs found (NVML, then ``/proc/driver/nvidia``, then a Tegra integrated GPU).
        runtimes: Facts about this Python environment.
    """

    root: str
    arch: str | None = None
    cpu_count: int | None = None
    cpu_model: str | None = None
    memory_mb: int | None = None
    device_model: str | None = None
    device_compatible: tuple[str, ...] = ()
    l4t_release: str | None = None
    cuda_version: str | None = None
    cudnn_version: str | None = None
    tensorrt_version: str | None = None
    libraries: Mapping[str, LibraryInfo] = field(default_factory=dict)
    edgetpu_devices: tuple[str, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    runtimes: RuntimeFacts = field(default_factory=RuntimeFacts)
    cpu_flags: tuple[str, ...] = ()
    """The CPU's feature flags (x86 ``flags``, ARM ``Features`` of /proc/cpuinfo), sorted: what
    a tuning result is keyed on besides the model (another vector unit, another winner)."""

    @property
    def is_tegra(self) -> bool:
        """True on an NVIDIA Jetson (Jetson Linux release file or a Tegra device tree)."""
        return self.l4t_release is not None or any(
            c.startswith("nvidia,tegra") for c in self.device_compatible
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``edgeagent probe --json`` and MQTT ``reported`` carry)."""
        return {
            "root": self.root,
            "arch": self.arch,
            "cpu_count": self.cpu_count,
            "cpu_model": self.cpu_model,
            "memory_mb": self.memory_mb,
            "device_model": self.device_model,
            "device_compatible": list(self.device_compatible),
            "l4t_release": self.l4t_release,
            "cuda_version": self.cuda_version,
            "cudnn_version": self.cudnn_version,
            "tensorrt_version": self.tensorrt_version,
            "libraries": {k: v.to_dict() for k, v in sorted(self.libraries.items())},
            "edgetpu_devices": list(self.edgetpu_devices),
            "gpus": [g.to_dict() for g in self.gpus],
            "runtimes": self.runtimes.to_dict(),
        }


def collect_facts(root: Path = Path("/"), runtimes: RuntimeFacts | None = None) -> DeviceFacts:
    """Read the device facts under ``root``.

    Args:
        root: Root of the file tree to read (``/`` on a real box).
        runtimes: Facts about the Python environment; detected live when omitted (NVML is
            asked only when root is ``/``: a fake tree's GPUs are not this machine's).

    Returns:
        The facts; unknown ones are ``None``. Never raises for unreadable files.
    """
    root = Path(root)
    live = _is_live(root)
    if runtimes is None:
        runtimes = detect_runtimes(nvml=live)
    cpuinfo = _read_text(root, "proc/cpuinfo")
    libraries = _find_libraries(root, runtimes.packages)
    device_model = _read_dt_string(root, "model")
    compatible = _read_dt_list(root, "compatible")
    l4t = _l4t_release(root)
    facts = DeviceFacts(
        root=str(root),
        arch=_arch(root, cpuinfo, live),
        cpu_count=_cpu_count(cpuinfo, live),
        cpu_model=_cpu_model(cpuinfo),
        memory_mb=_memory_mb(root),
        device_model=device_model,
        device_compatible=compatible,
        l4t_release=l4t,
        cuda_version=_cuda_version(root) or _version_of(libraries, "cudart"),
        cudnn_version=_version_of(libraries, "cudnn"),
        tensorrt_version=_version_of(libraries, "nvinfer"),
        libraries=libraries,
        edgetpu_devices=_edgetpu_devices(root),
        runtimes=runtimes,
        cpu_flags=_cpu_flags(cpuinfo),
    )
    gpus = runtimes.nvml_gpus or _procfs_gpus(root)
    if not gpus and facts.is_tegra:
        gpus = (GpuInfo(name=device_model or "NVIDIA Tegra", integrated=True, source="tegra"),)
    return replace(facts, gpus=gpus)


def detect_runtimes(nvml: bool = True) -> RuntimeFacts:
    """Detect what this Python environment offers.

    Args:
        nvml: Whether to ask NVML for GPUs (only meaningful for the live root).
    """
    return RuntimeFacts(
        ort_providers=_ort_providers(),
        litert=module_installed("ai_edge_litert.interpreter"),
        tflite_runtime=module_installed("tflite_runtime.interpreter"),
        nvml_gpus=_nvml_gpus() if nvml else None,
        packages=installed_packages(),
    )


def installed_packages(names: tuple[str, ...] = RUNTIME_PACKAGES) -> dict[str, str]:
    """Versions of the installed distributions among ``names`` (missing ones left out)."""
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def normalise_arch(value: str) -> str:
    """``arm64`` -> ``aarch64``, ``amd64`` -> ``x86_64``; others lower-cased as they are."""
    value = value.strip().lower()
    return _ARCH_ALIASES.get(value, value)


# --- file readers (all take root, all return None on trouble) ---------------------------------


def _is_live(root: Path) -> bool:
    try:
        return root.resolve() == Path("/")
    except OSError:
        return False


def _read_bytes(root: Path, rel: str) -> bytes | None:
    try:
        with (root / rel).open("rb") as f:
            return f.read(_MAX_READ)
    except OSError:  # missing, a directory, permission denied, I/O error
        return None


def _read_text(root: Path, rel: str) -> str | None:
    data = _read_bytes(root, rel)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_dt_raw(root: Path, prop: str) -> bytes | None:
    # /proc/device-tree is a symlink to /sys/firmware/devicetree/base; try both.
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        data = _read_bytes(root, f"{base}/{prop}")
        if data is not None:
            return data
    return None


def _read_dt_list(root: Path, prop: str) -> tuple[str, ...]:
    data = _read_dt_raw(root, prop)
    if data is None:
        return ()
    try:
        items = data.decode("ascii").split("\0")
    except UnicodeDecodeError:
        return ()
    return tuple(i.strip() for i in items if i.strip() and i.strip().isprintable())


def _read_dt_string(root: Path, prop: str) -> str | None:
    # Device-tree strings are NUL-terminated ASCII; anything else is not a model name.
    items = _read_dt_list(root, prop)
    return items[0] if items else None


def _cpuinfo_fields(cpuinfo: str, key: str) -> list[str]:
    out = []
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == key:
            out.append(value.strip())
    return out


def _arch(root: Path, cpuinfo: str | None, live: bool) -> str | None:
    if live and platform.machine():
        return normalise_arch(platform.machine())
    text = _read_text(root, "proc/sys/kernel/arch")
    if text and text.strip().isidentifier():
        return normalise_arch(text)
    return _arch_from_cpuinfo(cpuinfo) if cpuinfo is not None else None


def _arch_from_cpuinfo(cpuinfo: str) -> str | None:
    arm = _cpuinfo_fields(cpuinfo, "cpu architecture")
    if arm:
        if arm[0] == "8":
            return "aarch64"
        if arm[0] == "7":
            return "armv7l"
    flags = _cpuinfo_fields(cpuinfo, "flags")
    if flags:
        return "x86_64" if "lm" in flags[0].split() else "i686"
    return None


def _cpu_flags(cpuinfo: str | None) -> tuple[str, ...]:
    if cpuinfo is None:
        return ()
    found = _cpuinfo_fields(cpuinfo, "flags") or _cpuinfo_fields(cpuinfo, "features")
    return tuple(sorted(set(found[0].split()))) if found else ()


def _cpu_count(cpuinfo: str | None, live: bool) -> int | None:
    if cpuinfo is not None:
        count = len(_cpuinfo_fields(cpuinfo, "processor"))
        if count:
            return count
    return os.cpu_count() if live else None


def _cpu_model(cpuinfo: str | None) -> str | None:
    if cpuinfo is None:
        return None
    names = _cpuinfo_fields(cpuinfo, "model name")
    if names and names[0]:
        return names[0]
    implementers = _cpuinfo_fields(cpuinfo, "cpu implementer")
    parts = _cpuinfo_fields(cpuinfo, "cpu part")
    cores = sorted({_ARM_PARTS.get((i.lower(), p.lower()), f"ARM part {p}")
                    for i, p in zip(implementers, parts, strict=False)})
    return " + ".join(cores) if cores else None


def _memory_mb(root: Path) -> int | None:
    text = _read_text(root, "proc/meminfo")
    if text is None:
        return None
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) // 1024 if match else None


def _l4t_release(root: Path) -> str | None:
    text = _read_text(root, "etc/nv_tegra_release")
    if text is None:
        return None
    # "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, ..."
    match = re.match(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    return f"{match.group(1)}.{match.group(2)}.{match.group(3)}" if match else None


def _cuda_version(root: Path) -> str | None:
    text = _read_text(root, "usr/local/cuda/version.json")
    if text is not None:
        try:
            version = json.loads(text)["cuda"]["version"]
        except (ValueError, KeyError, TypeError):
            version = None
        if isinstance(version, str) and re.fullmatch(r"\d+(\.\d+)*", version):
            return version
    text = _read_text(root, "usr/local/cuda/version.txt")  # CUDA 10.x (JetPack 4)
    match = re.search(r"CUDA Version\s+(\d+(?:\.\d+)*)", text or "")
    return match.group(1) if match else None


def _lib_dirs(root: Path) -> list[Path]:
    dirs: list[Path] = []
    for pattern in LIB_DIRS:
        try:
            found = sorted(root.glob(pattern)) if "*" in pattern else [root / pattern]
        except OSError:
            continue
        dirs.extend(d for d in found if d.is_dir())
    return dirs


def _parse_version(text: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        return None
    return tuple(int(p) for p in text.split("."))


def _find_libraries(root: Path, packages: Mapping[str, str]) -> dict[str, LibraryInfo]:
    # Index each directory once; several keys look in the same directories.
    listings: list[tuple[Path, list[str]]] = []
    for d in _lib_dirs(root):
        try:
            listings.append((d, sorted(os.listdir(d))))
        except OSError:
            continue
    found: dict[str, LibraryInfo] = {}
    for key, (stem, dists) in LIBRARIES.items():
        best: tuple[tuple[int, ...], str] | None = None
        for d, names in listings:
            for name in names:
                if name != stem and not name.startswith(stem + "."):
                    continue
                version = _parse_version(name[len(stem) + 1:]) if name != stem else ()
                if version is None:
                    continue
                shown = "/" + str((d / name).relative_to(root))
                if best is None or version > best[0]:
                    best = (version, shown)
        if best is not None:
            text = ".".join(str(p) for p in best[0]) or None
            found[key] = LibraryInfo(key, best[1], text)
            continue
        # Wheels such as nvidia-cudnn-cu12 or tensorrt ship the library inside site-packages.
        for dist in dists:
            if dist in packages:
                found[key] = LibraryInfo(key, f"pip:{dist}", packages[dist])
                break
    return found


def _version_of(libraries: Mapping[str, LibraryInfo], key: str) -> str | None:
    info = libraries.get(key)
    return info.version if info else None


def _edgetpu_devices(root: Path) -> tuple[str, ...]:
    found: list[str] = []
    with contextlib.suppress(OSError):
        found.extend("/" + str(p.relative_to(root)) for p in sorted(root.glob("dev/apex_*")))
    try:
        usb = sorted((root / "sys/bus/usb/devices").iterdir())
    except OSError:
        usb = []
    for dev in usb:
        ids = (_read_text(dev, "idVendor"), _read_text(dev, "idProduct"))
        if ids[0] and ids[1] and (ids[0].strip(), ids[1].strip()) in _CORAL_USB_IDS:
            found.append(f"usb:{dev.name}")
    return tuple(found)


def _procfs_gpus(root: Path) -> tuple[GpuInfo, ...]:
    # The NVIDIA driver lists each GPU as /proc/driver/nvidia/gpus/<bus id>/information,
    # also inside containers run with the NVIDIA container toolkit.
    try:
        entries = sorted((root / "proc/driver/nvidia/gpus").iterdir())
    except OSError:
        return ()
    gpus = []
    for entry in entries:
        text = _read_text(entry, "information")
        match = re.search(r"^Model:\s*(.+)$", text or "", re.MULTILINE)
        if match:
            gpus.append(GpuInfo(name=match.group(1).strip(), source="procfs"))
    return tuple(gpus)


# --- runtime detection --------------------------------------------------------------------------


def module_installed(module: str) -> bool:
    """Whether ``package.module`` can be imported, without importing either: the parent is
    looked up, not run (``ai_edge_litert``'s ``__init__`` loads its 11 MB runtime library,
    which a box serving only ONNX models should not carry), then the submodule is looked up in
    the parent's folders."""
    parent, _, child = module.rpartition(".")
    try:
        if not parent or parent in sys.modules:  # nothing left to run: find it plainly
            return importlib.util.find_spec(module) is not None
        spec = importlib.util.find_spec(parent)
        if spec is None or spec.submodule_search_locations is None:
            return False
        found = importlib.machinery.PathFinder.find_spec(child, spec.submodule_search_locations)
        return found is not None
    except (ImportError, ValueError):
        return False


def _ort_providers() -> tuple[str, ...] | None:
    if not module_installed("onnxruntime"):
        return None
    try:
        ort = importlib.import_module("onnxruntime")
        return tuple(ort.get_available_providers())
    except ImportError as exc:  # e.g. a GPU build whose CUDA libraries are missing
        log.warning("onnxruntime is installed but cannot be imported: %s", exc)
        return None


def _nvml_gpus() -> tuple[GpuInfo, ...] | None:
    try:
        pynvml = importlib.import_module("pynvml")
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver: NVML cannot tell, so unknown
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # nvidia-ml-py before 11.5 returned bytes
                name = name.decode("utf-8", "replace")
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1 << 20)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability: str | None = f"{major}.{minor}"
            except (pynvml.NVMLError, AttributeError):  # older drivers or bindings lack it
                capability = None
            gpus.append(GpuInfo(name=str(name), memory_mb=int(memory), source="nvml",
                                compute_capability=capability))
        return tuple(gpus)
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs: %s", exc)
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
