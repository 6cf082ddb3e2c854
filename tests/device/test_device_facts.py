"""Device facts read from fake device trees (and from this machine)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from edgeagent.device.facts import (
    DeviceFacts,
    GpuInfo,
    RuntimeFacts,
    collect_facts,
    detect_runtimes,
)
from tests.device.trees import BOARDS, arm_cpuinfo, write

NO_RUNTIMES = RuntimeFacts()

FIELDS = ("arch", "cpu_count", "cpu_model", "memory_mb", "device_model", "l4t_release",
          "cuda_version", "cudnn_version", "tensorrt_version")

# board: the facts above in that order, then the GPU found
EXPECTED: dict[str, tuple[object, ...]] = {
    "agx-orin": ("aarch64", 12, "Cortex-A78AE", 62827, "NVIDIA Jetson AGX Orin Developer Kit",
                 "36.3.0", "12.6.68", "9.3.0", "10.3.0", "NVIDIA Jetson AGX Orin Developer Kit"),
    "orin-nx": ("aarch64", 8, "Cortex-A78AE", 15288,
                "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "36.3.0", "12.6.68",
                "9.3.0", "10.3.0", "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"),
    "orin-nano": ("aarch64", 6, "Cortex-A78AE", 7639, "NVIDIA Jetson Orin Nano Developer Kit",
                  "36.3.0", "12.6.68", "9.3.0", "10.3.0",
                  "NVIDIA Jetson Orin Nano Developer Kit"),
    "xavier-nx": ("aarch64", 6, "NVIDIA Carmel", 7583, "NVIDIA Jetson Xavier NX Developer Kit",
                  "35.5.0", "11.4.315", "8.6.0", "8.5.2",
                  "NVIDIA Jetson Xavier NX Developer Kit"),
    "nano": ("aarch64", 4, "Cortex-A57", 3956, "NVIDIA Jetson Nano Developer Kit", "32.7.1",
             "10.2.300", "8.2.1", "8.2.1", "NVIDIA Jetson Nano Developer Kit"),
    "pi5": ("aarch64", 4, "Cortex-A76", 8052, "Raspberry Pi 5 Model B Rev 1.0", None, None, None,
            None, None),
    "pi4": ("aarch64", 4, "Cortex-A72", 3794, "Raspberry Pi 4 Model B Rev 1.4", None, None, None,
            None, None),
    "rock5b": ("aarch64", 8, "Cortex-A55 + Cortex-A76", 15754, "Radxa ROCK 5B", None, None,
               None, None, None),
    "x86-nvidia": ("x86_64", 16, "13th Gen Intel(R) Core(TM) i7-13700K", 64093, None, None,
                   "12.4.127", "9.1.0", "10.3.0", "NVIDIA GeForce RTX 4090"),
    "x86-cpu": ("x86_64", 8, "Intel(R) Xeon(R) E-2388G CPU @ 3.20GHz", 32000, None, None, None,
                None, None, None),
}


@pytest.mark.parametrize("board", sorted(EXPECTED))
def test_facts_from_fake_trees(tmp_path: Path, board: str) -> None:
    spec = BOARDS[board]
    facts = collect_facts(spec.build(tmp_path), spec.runtimes)
    *expected, gpu = EXPECTED[board]
    assert tuple(getattr(facts, f) for f in FIELDS) == tuple(expected)
    assert [g.name for g in facts.gpus] == ([gpu] if gpu else [])
    assert facts.is_tegra == (facts.l4t_release is not None)
    json.dumps(facts.to_dict())  # JSON-able as it is


def test_library_paths_are_shown_as_on_the_box(tmp_path: Path) -> None:
    facts = collect_facts(BOARDS["orin-nano"].build(tmp_path), NO_RUNTIMES)
    assert facts.libraries["nvinfer"].path == "/usr/lib/aarch64-linux-gnu/libnvinfer.so.10.3.0"
    assert facts.libraries["cudart"].path == (
        "/usr/local/cuda-12.6/targets/aarch64-linux/lib/libcudart.so.12.6.68")


def test_highest_library_version_wins(tmp_path: Path) -> None:
    for name in ("libcudart.so.11.8.89", "libcudart.so.12", "libcudart.so.12.2.140",
                 "libcudart.so.12.bak"):
        write(tmp_path, f"usr/lib/x86_64-linux-gnu/{name}", "")
    facts = collect_facts(tmp_path, NO_RUNTIMES)
    assert facts.libraries["cudart"].version == "12.2.140"
    assert facts.cuda_version == "12.2.140"  # no version.json: from the library


def test_pip_wheels_stand_in_for_system_libraries(tmp_path: Path) -> None:
    runtimes = RuntimeFacts(packages={"tensorrt": "10.3.0", "nvidia-cudnn-cu12": "9.1.0.70"})
    facts = collect_facts(tmp_path, runtimes)
    assert facts.tensorrt_version == "10.3.0"
    assert facts.libraries["nvinfer"].path == "pip:tensorrt"
    assert facts.cudnn_version == "9.1.0.70"


def test_arch_from_kernel_arch_file(tmp_path: Path) -> None:
    write(tmp_path, "proc/sys/kernel/arch", "arm64\n")
    assert collect_facts(tmp_path, NO_RUNTIMES).arch == "aarch64"


def test_arch_from_32_bit_arm_cpuinfo(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", arm_cpuinfo(4, "0x41", "0xd08").replace(
        "CPU architecture: 8", "CPU architecture: 7"))
    assert collect_facts(tmp_path, NO_RUNTIMES).arch == "armv7l"


def test_edge_tpus_pcie_and_usb(tmp_path: Path) -> None:
    write(tmp_path, "dev/apex_0", "")
    write(tmp_path, "sys/bus/usb/devices/2-1/idVendor", "18d1\n")
    write(tmp_path, "sys/bus/usb/devices/2-1/idProduct", "9302\n")
    write(tmp_path, "sys/bus/usb/devices/1-1/idVendor", "046d\n")  # a keyboard
    write(tmp_path, "sys/bus/usb/devices/1-1/idProduct", "c31c\n")
    write(tmp_path, "usr/lib/aarch64-linux-gnu/libedgetpu.so.1.0", "")
    facts = collect_facts(tmp_path, NO_RUNTIMES)
    assert facts.edgetpu_devices == ("/dev/apex_0", "usb:2-1")
    assert facts.libraries["edgetpu"].version == "1.0"


def test_nvml_gpus_take_precedence(tmp_path: Path) -> None:
    spec = BOARDS["x86-nvidia"]
    nvml = (GpuInfo("NVIDIA GeForce RTX 4090", 24564), GpuInfo("NVIDIA RTX A2000", 6138))
    facts = collect_facts(spec.build(tmp_path), RuntimeFacts(nvml_gpus=nvml))
    assert facts.gpus == nvml


def test_empty_tree_is_all_unknown(tmp_path: Path) -> None:
    facts = collect_facts(tmp_path, NO_RUNTIMES)
    assert facts.to_dict() == {
        "root": str(tmp_path), "arch": None, "cpu_count": None, "cpu_model": None,
        "memory_mb": None, "device_model": None, "device_compatible": [], "l4t_release": None,
        "cuda_version": None, "cudnn_version": None, "tensorrt_version": None, "libraries": {},
        "edgetpu_devices": [], "gpus": [], "runtimes": NO_RUNTIMES.to_dict(),
    }


FACT_FILES = [
    "proc/cpuinfo", "proc/meminfo", "proc/device-tree/model", "proc/device-tree/compatible",
    "etc/nv_tegra_release", "usr/local/cuda/version.json", "usr/local/cuda/version.txt",
    "proc/sys/kernel/arch", "proc/driver/nvidia/gpus/0000:01:00.0/information",
]


@pytest.mark.parametrize("rel", FACT_FILES)
def test_a_directory_where_a_file_is_expected_is_unknown(tmp_path: Path, rel: str) -> None:
    (tmp_path / rel).mkdir(parents=True)
    assert collect_facts(tmp_path, NO_RUNTIMES) == DeviceFacts(root=str(tmp_path),
                                                               runtimes=NO_RUNTIMES)


BINARY_GARBAGE = [b"\xff\xfe\x00garbage\x80\x81", b"", b"\x00\x00\x00", b"\x07\x1b[2J"]
# Text that is garbage for every file except the device tree's, where any printable string is
# a valid model name.
TEXT_GARBAGE = [b"hello world\n", b'{"cuda": 12}', b"# R36 (release), REVISION: x"]
GARBAGE_CASES = [(rel, g) for rel in FACT_FILES for g in BINARY_GARBAGE] + [
    (rel, g) for rel in FACT_FILES if "device-tree" not in rel for g in TEXT_GARBAGE]


@pytest.mark.parametrize(("rel", "garbage"), GARBAGE_CASES)
def test_garbage_in_a_fact_file_is_unknown(tmp_path: Path, rel: str, garbage: bytes) -> None:
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)
    facts = collect_facts(tmp_path, NO_RUNTIMES)
    assert (facts.arch, facts.cpu_count, facts.memory_mb) == (None, None, None)
    assert (facts.device_model, facts.device_compatible) == (None, ())
    assert (facts.l4t_release, facts.cuda_version, facts.gpus) == (None, None, ())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, "proc/meminfo", "MemTotal: 1024 kB\n")
    path.chmod(0)
    assert collect_facts(tmp_path, NO_RUNTIMES).memory_mb is None


def test_a_library_dir_that_is_a_file_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "usr/lib/x86_64-linux-gnu", "not a directory")
    write(tmp_path, "usr/lib64/libnvinfer.so.10.3.0", "")
    assert collect_facts(tmp_path, NO_RUNTIMES).tensorrt_version == "10.3.0"


def test_this_machine() -> None:
    facts = collect_facts(Path("/"))
    assert facts.arch == {"amd64": "x86_64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower())
    assert (facts.cpu_count or 0) >= 1
    assert (facts.memory_mb or 0) > 0
    assert facts.runtimes.ort_providers is not None
    assert "CPUExecutionProvider" in facts.runtimes.ort_providers
    assert facts.runtimes.litert  # ai-edge-litert is in the dev environment
    assert facts.runtimes.packages["onnxruntime"]
    json.dumps(facts.to_dict())


def test_fake_root_does_not_ask_nvml(tmp_path: Path) -> None:
    # NVML would describe this machine's GPUs, not the fake tree's.
    assert collect_facts(tmp_path).runtimes.nvml_gpus is None
    assert detect_runtimes(nvml=False).nvml_gpus is None
