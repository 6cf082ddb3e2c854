"""System figures for telemetry, read from procfs and sysfs under a root directory.

Every reader takes the root, so tests build a fake device tree in a temporary folder. Figures a
box does not have are left out rather than reported as zero. NVML (NVIDIA's management library)
is used only on the live system, only where ``pynvml`` is installed, and loaded lazily.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Jetson's integrated GPU load, in tenths of a percent (the path moved between L4T releases).
GPU_LOAD_PATHS = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
INA3221_GLOB = "sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def read_cpu_times(root: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies from the ``cpu`` line of /proc/stat."""
    text = _read(root / "proc/stat")
    if not text:
        return None
    fields = text.splitlines()[0].split()
    if fields[0] != "cpu" or len(fields) < 5:
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time: count it once.
    total = sum(values[:8])
    return total - idle, total


def read_memory(root: Path) -> dict[str, float] | None:
    """Total and available memory (MB) from /proc/meminfo."""
    text = _read(root / "proc/meminfo")
    if not text:
        return None
    kb: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key] = int(parts[0])
    if "MemTotal" not in kb:
        return None
    total = kb["MemTotal"]
    available = kb.get("MemAvailable", kb.get("MemFree", 0))
    return {"total_mb": round(total / 1024, 1), "available_mb": round(available / 1024, 1),
            "used_percent": round(100 * (total - available) / total, 1) if total else 0.0}


def read_load(root: Path) -> list[float] | None:
    text = _read(root / "proc/loadavg")
    try:
        return [float(v) for v in text.split()[:3]] if text else None
    except ValueError:
        return None


def read_temperatures(root: Path) -> dict[str, float]:
    """Degrees Celsius per thermal zone, named by its type (``cpu-thermal``, ``GPU-therm``)."""
    out: dict[str, float] = {}
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        millideg = _int(zone / "temp")
        if millideg is None:
            continue
        name = _read(zone / "type") or zone.name
        if name in out:
            name = f"{name}-{zone.name}"
        out[name] = millideg / 1000
    return out


def read_gpu_load(root: Path) -> float | None:
    """Jetson integrated GPU load in percent."""
    for rel in GPU_LOAD_PATHS:
        value = _int(root / rel)
        if value is not None:
            return value / 10
    return None


def read_power_rails(root: Path) -> dict[str, dict[str, float]]:
    """Jetson INA3221 rails: voltage (mV), current (mA) and power (mW) per labelled channel."""
    out: dict[str, dict[str, float]] = {}
    for hwmon in sorted(root.glob(INA3221_GLOB)):
        for label_file in sorted(hwmon.glob("in*_label")):
            channel = label_file.name[2:-len("_label")]
            label = _read(label_file)
            mv = _int(hwmon / f"in{channel}_input")
            ma = _int(hwmon / f"curr{channel}_input")
            if not label or label.startswith("Sum of") or mv is None or ma is None:
                continue
            out[label] = {"mv": mv, "ma": ma, "mw": round(mv * ma / 1000, 1)}
    return out


def read_disk(path: Path) -> dict[str, float] | None:
    """Free and total space (MB) of the file system holding ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return {"total_mb": round(total / 2**20, 1), "free_mb": round(free / 2**20, 1),
            "used_percent": round(100 * (total - free) / total, 1) if total else 0.0}


class SystemSampler:
    """Takes one sample of the system figures per telemetry interval.

    Args:
        root: Where procfs and sysfs are (``/`` on a live box).
        disk_path: Whose file system to report (the state directory).
        nvml: Ask NVML for discrete NVIDIA GPUs (live boxes only).
    """

    def __init__(self, root: Path = Path("/"), disk_path: Path | None = None,
                 nvml: bool | None = None) -> None:
        self.root = root
        self.disk_path = disk_path or root
        self._nvml_wanted = root == Path("/") if nvml is None else nvml
        self._nvml: Any = None
        self._last_cpu: tuple[int, int] | None = None

    def sample(self) -> dict[str, Any]:
        """The figures now; CPU use is measured since the previous sample."""
        out: dict[str, Any] = {}
        cpu = read_cpu_times(self.root)
        if cpu is not None:
            if self._last_cpu is not None and cpu[1] > self._last_cpu[1]:
                busy = cpu[0] - self._last_cpu[0]
                out["cpu_percent"] = round(100 * busy / (cpu[1] - self._last_cpu[1]), 1)
            self._last_cpu = cpu
        for key, value in (("memory", read_memory(self.root)), ("load", read_load(self.root)),
                           ("disk", read_disk(self.disk_path)),
                           ("temperatures_c", read_temperatures(self.root)),
                           ("gpu_load_percent", read_gpu_load(self.root)),
                           ("power", read_power_rails(self.root)),
                           ("gpus", self._nvml_gpus())):
            if value not in (None, {}, []):
                out[key] = value
        return out

    def _nvml_gpus(self) -> list[dict[str, Any]] | None:
        if not self._nvml_wanted:
            return None
        if self._nvml is None:
            try:
                import pynvml  # optional: the nvidia-ml-py package
                pynvml.nvmlInit()
            except Exception as exc:  # not installed, no driver: no discrete GPU figures
                log.debug("NVML unavailable: %s", exc)
                self._nvml_wanted = False
                return None
            self._nvml = pynvml
        nv = self._nvml
        gpus = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                gpus.append({
                    "index": i, "load_percent": util.gpu,
                    "memory_used_mb": round(mem.used / 2**20, 1),
                    "memory_total_mb": round(mem.total / 2**20, 1),
                    "temperature_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                    "power_mw": nv.nvmlDeviceGetPowerUsage(h),
                })
        except nv.NVMLError as exc:
            log.warning("NVML query failed: %s", exc)
        return gpus
