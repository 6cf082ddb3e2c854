"""Hardware tests: they need a real NVIDIA GPU (x86-64 or Jetson) and the GPU build of
onnxruntime, and skip with the reason everywhere else. Run: ``python -m pytest hw_tests -v``."""

from __future__ import annotations

import pytest

from edgeagent.device import DeviceFacts, collect_facts


@pytest.fixture(scope="session")
def facts() -> DeviceFacts:
    return collect_facts()


@pytest.fixture(scope="session")
def gpu_facts(facts: DeviceFacts) -> DeviceFacts:
    if not facts.gpus:
        pytest.skip("no NVIDIA GPU on this box (NVML, /proc/driver/nvidia or a Jetson iGPU)")
    providers = facts.runtimes.ort_providers or ()
    if "CUDAExecutionProvider" not in providers:
        pytest.skip(f"onnxruntime here offers only {', '.join(providers)}: install onnxruntime-gpu")
    return facts
