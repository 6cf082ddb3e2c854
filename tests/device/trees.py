"""Fake device trees built in tmp_path from real-world file contents."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeagent.device.facts import RuntimeFacts

ORT_GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ORT_CPU = ("AzureExecutionProvider", "CPUExecutionProvider")


def arm_cpuinfo(cores: int, implementer: str, part: str) -> str:
    """/proc/cpuinfo as arm64 kernels print it (no model name line)."""
    return "".join(
        f"processor\t: {i}\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 "
        f"crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
        f"CPU implementer\t: {implementer}\nCPU architecture: 8\nCPU variant\t: 0x1\n"
        f"CPU part\t: {part}\nCPU revision\t: 1\n\n"
        for i in range(cores)
    )


def x86_cpuinfo(cores: int, model: str) -> str:
    """/proc/cpuinfo as x86-64 kernels print it."""
    return "".join(
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 183\n"
        f"model name\t: {model}\nflags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr "
        f"pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx lm constant_tsc avx2\n\n"
        for i in range(cores)
    )


@dataclass
class Board:
    """What a fake tree holds."""

    cpuinfo: str
    mem_kb: int
    model: str | None = None
    compatible: tuple[str, ...] = ()
    tegra_release: str | None = None
    libs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dir -> file names
    files: dict[str, str] = field(default_factory=dict)  # extra files: path -> text
    runtimes: RuntimeFacts = field(default_factory=lambda: RuntimeFacts(ORT_CPU, litert=True))

    def build(self, root: Path) -> Path:
        """Write the tree under ``root`` and return it."""
        write(root, "proc/cpuinfo", self.cpuinfo)
        write(root, "proc/meminfo", f"MemTotal:       {self.mem_kb} kB\nMemFree:        "
                                    f"{self.mem_kb // 2} kB\n")
        if self.model is not None:
            # Real device trees store NUL-terminated strings.
            write(root, "proc/device-tree/model", self.model + "\0")
        if self.compatible:
            write(root, "proc/device-tree/compatible", "".join(c + "\0" for c in self.compatible))
        if self.tegra_release is not None:
            write(root, "etc/nv_tegra_release", self.tegra_release)
        for directory, names in self.libs.items():
            for name in names:
                write(root, f"{directory}/{name}", "\x7fELF")
        for path, text in self.files.items():
            write(root, path, text)
        return root


def write(root: Path, rel: str, text: str) -> Path:
    """Write ``text`` to ``root/rel``, creating folders."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _jetpack6(model: str, compatible: tuple[str, ...], cores: int, mem_kb: int) -> Board:
    return Board(
        cpuinfo=arm_cpuinfo(cores, "0x41", "0xd42"),
        mem_kb=mem_kb,
        model=model,
        compatible=compatible,
        tegra_release="# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, "
                      "EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024\n"
                      "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n",
        libs={
            "usr/lib/aarch64-linux-gnu": ("libnvinfer.so", "libnvinfer.so.10",
                                          "libnvinfer.so.10.3.0", "libcudnn.so.9",
                                          "libcudnn.so.9.3.0"),
            "usr/local/cuda-12.6/targets/aarch64-linux/lib": ("libcudart.so.12",
                                                             "libcudart.so.12.6.68"),
        },
        files={"usr/local/cuda/version.json":
               '{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}'},
        runtimes=RuntimeFacts(ORT_GPU, litert=True),
    )


BOARDS: dict[str, Board] = {
    "agx-orin": _jetpack6("NVIDIA Jetson AGX Orin Developer Kit",
                          ("nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"),
                          12, 64335836),
    "orin-nx": _jetpack6("NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
                         ("nvidia,p3768-0000+p3767-0000", "nvidia,p3767-0000", "nvidia,tegra234"),
                         8, 15655212),
    "orin-nano": _jetpack6("NVIDIA Jetson Orin Nano Developer Kit",
                           ("nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005",
                            "nvidia,tegra234"), 6, 7822716),
    "xavier-nx": Board(
        cpuinfo=arm_cpuinfo(6, "0x4e", "0x004"),
        mem_kb=7765188,
        model="NVIDIA Jetson Xavier NX Developer Kit",
        compatible=("nvidia,p3509-0000+p3668-0001", "nvidia,tegra194"),
        tegra_release="# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, "
                      "EABI: aarch64, DATE: Tue Feb 20 04:46:31 UTC 2024\n",
        libs={"usr/lib/aarch64-linux-gnu": ("libnvinfer.so.8", "libnvinfer.so.8.5.2",
                                            "libcudnn.so.8", "libcudnn.so.8.6.0"),
              "usr/local/cuda-11.4/lib64": ("libcudart.so.11.0", "libcudart.so.11.4.298")},
        files={"usr/local/cuda/version.json": '{"cuda": {"version": "11.4.315"}}'},
        runtimes=RuntimeFacts(ORT_GPU, litert=True),
    ),
    "nano": Board(
        cpuinfo=arm_cpuinfo(4, "0x41", "0xd07"),
        mem_kb=4051048,
        model="NVIDIA Jetson Nano Developer Kit",
        compatible=("nvidia,p3449-0000-b00+p3448-0002", "nvidia,jetson-nano", "nvidia,tegra210"),
        tegra_release="# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, "
                      "EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022\n",
        libs={"usr/lib/aarch64-linux-gnu": ("libnvinfer.so.8", "libnvinfer.so.8.2.1",
                                            "libcudnn.so.8", "libcudnn.so.8.2.1"),
              "usr/local/cuda-10.2/lib64": ("libcudart.so.10.2", "libcudart.so.10.2.300")},
        files={"usr/local/cuda/version.txt": "CUDA Version 10.2.300\n"},
        runtimes=RuntimeFacts(ORT_GPU, tflite_runtime=True),
    ),
    "pi5": Board(
        cpuinfo=arm_cpuinfo(4, "0x41", "0xd0b") + "Revision\t: d04170\nModel\t\t: "
                "Raspberry Pi 5 Model B Rev 1.0\n",
        mem_kb=8245384,
        model="Raspberry Pi 5 Model B Rev 1.0",
        compatible=("raspberrypi,5-model-b", "brcm,bcm2712"),
    ),
    "pi4": Board(
        cpuinfo=arm_cpuinfo(4, "0x41", "0xd08"),
        mem_kb=3885396,
        model="Raspberry Pi 4 Model B Rev 1.4",
        compatible=("raspberrypi,4-model-b", "brcm,bcm2711"),
    ),
    "rock5b": Board(
        cpuinfo=arm_cpuinfo(4, "0x41", "0xd05") + arm_cpuinfo(4, "0x41", "0xd0b"),
        mem_kb=16132156,
        model="Radxa ROCK 5B",
        compatible=("radxa,rock-5b", "rockchip,rk3588"),
    ),
    "x86-nvidia": Board(
        cpuinfo=x86_cpuinfo(16, "13th Gen Intel(R) Core(TM) i7-13700K"),
        mem_kb=65631404,
        libs={"usr/lib/x86_64-linux-gnu": ("libnvinfer.so.10", "libnvinfer.so.10.3.0",
                                           "libcudnn.so.9", "libcudnn.so.9.1.0"),
              "usr/local/cuda-12.4/lib64": ("libcudart.so.12", "libcudart.so.12.4.127")},
        files={
            "proc/driver/nvidia/gpus/0000:01:00.0/information":
                "Model: \t\t NVIDIA GeForce RTX 4090\nIRQ:   \t\t 186\n"
                "GPU UUID: \t GPU-5c1a1e0e-0000-0000-0000-000000000000\nBus Type: \t PCIe\n",
            "usr/local/cuda/version.json": '{"cuda": {"version": "12.4.127"}}',
        },
        runtimes=RuntimeFacts(ORT_GPU, litert=True),
    ),
    "x86-cpu": Board(cpuinfo=x86_cpuinfo(8, "Intel(R) Xeon(R) E-2388G CPU @ 3.20GHz"),
                     mem_kb=32768000),
}
