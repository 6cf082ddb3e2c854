"""Model manager: load, swap under load, checks, failure keeps the old version, unload."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.errors import InferenceInputError, ModelError, ModelNotFound, ModelNotReady
from edgeagent.runtime.base import Backend, LoadedModel, ProviderAttempt, TensorSpec
from edgeagent.runtime.checks import ModelCheck
from edgeagent.runtime.manager import ModelManager, ModelSource
from edgeagent.runtime.registry import BackendRegistry
from tests import onnx_models


def cpu_planner(fmt: str, precision: str, sha: str, overrides: object = None) -> ProviderPlan:
    return ProviderPlan(fmt, precision, (PlannedProvider("CPUExecutionProvider"),), threads=1)


class GatedModel(LoadedModel):
    """Answers ``x * factor`` once its gate opens; records whether it was closed."""

    platform = "onnxruntime_onnx"

    def __init__(self, factor: float, gate: threading.Event) -> None:
        self.factor, self.gate, self.closed = factor, gate, False
        self.threads: list[threading.Thread] = []
        self.inputs = (TensorSpec("x", "FP32", (-1,)),)
        self.outputs = (TensorSpec("y", "FP32", (-1,)),)
        self.provider = "CPUExecutionProvider"
        self.attempts = [ProviderAttempt("CPUExecutionProvider", True)]

    def run(self, inputs: Mapping[str, np.ndarray],
            output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        assert not self.closed, "ran on a closed session"
        self.threads.append(threading.current_thread())
        self.gate.wait(10)
        return {"y": inputs["x"] * self.factor}

    def close(self) -> None:
        self.closed = True


class GatedBackend(Backend):
    """A backend whose model file holds the factor (an ONNX-looking file, for the sniffing)."""

    name = "gated"
    formats = ("onnx",)
    gate = threading.Event()
    made: ClassVar[list[GatedModel]] = []

    def load(self, path: Path, plan: ProviderPlan) -> LoadedModel:
        factor = float(path.read_bytes()[1:].decode())
        if factor < 0:
            raise ModelError("negative factors do not load")
        model = GatedModel(factor, self.gate)
        self.made.append(model)
        return model

    def versions(self) -> dict[str, str]:
        return {"gated": "1"}


def gated_file(tmp_path: Path, name: str, factor: float) -> Path:
    p = tmp_path / f"{name}.onnx"
    p.write_bytes(b"\x08" + str(factor).encode())
    return p


@pytest.fixture
def gated_manager() -> ModelManager:
    GatedBackend.gate = threading.Event()
    GatedBackend.made = []
    registry = BackendRegistry({"onnx": (__name__, "GatedBackend")})
    return ModelManager(registry, cpu_planner)


def test_loads_real_onnx_and_answers(tmp_path: Path) -> None:
    path = onnx_models.mlp(tmp_path / "mlp.onnx")

    async def go() -> None:
        mgr = ModelManager(BackendRegistry(), cpu_planner)
        mgr.declare("mlp")
        assert not mgr.ready("mlp")
        with pytest.raises(ModelNotReady, match="unloaded"):
            mgr.get("mlp")
        mv = await mgr.load("mlp", ModelSource(path, version=3))
        assert mgr.ready("mlp") and mgr.ready("mlp", 3) and not mgr.ready("mlp", 2)
        assert mv.precision == "fp32" and mv.format == "onnx" and len(mv.sha256) == 64
        _, out = await mgr.infer("mlp", {"input": np.ones((2, 64), np.float32)})
        assert out["logits"].shape == (2, 10)
        with pytest.raises(ModelNotFound, match="version 2 is not loaded"):
            await mgr.infer("mlp", {"input": np.ones((2, 64), np.float32)}, version=2)
        with pytest.raises(InferenceInputError):
            await mgr.infer("mlp", {"input": np.ones((2, 63), np.float32)})
        with pytest.raises(InferenceInputError, match="unknown output"):
            await mgr.infer("mlp", {"input": np.ones((2, 64), np.float32)}, ["nope"])
        with pytest.raises(ModelNotFound):
            mgr.get("other")
        status = mgr.status()[0]
        assert status["state"] == "ready" and status["provider"] == "CPUExecutionProvider"
        await mgr.close()

    asyncio.run(go())


def test_swap_lets_running_requests_finish_on_the_old_version(
        tmp_path: Path, gated_manager: ModelManager) -> None:
    async def go() -> None:
        mgr = gated_manager
        GatedBackend.gate.set()  # warm-up must pass
        await mgr.load("m", ModelSource(gated_file(tmp_path, "v1", 2.0), precision="fp32",
                                        version=1))
        GatedBackend.gate.clear()
        x = np.array([1.0, 2.0], np.float32)
        running = asyncio.create_task(mgr.infer("m", {"x": x}))
        while mgr.oldest_running_s() == 0.0:
            await asyncio.sleep(0.01)
        # Load v2 while v1 has a request in flight: v2's warm-up is gated too, so open the gate
        # from a thread shortly after v2's load has started.
        threading.Timer(0.2, GatedBackend.gate.set).start()
        await mgr.load("m", ModelSource(gated_file(tmp_path, "v2", 10.0), precision="fp32",
                                        version=2))
        v1_model, v2_model = GatedBackend.made
        mv, out = await running
        assert mv.version == 1
        np.testing.assert_array_equal(out["y"], x * 2.0)  # answered by v1, not v2
        assert v1_model.closed and not v2_model.closed
        _, out = await mgr.infer("m", {"x": x})
        np.testing.assert_array_equal(out["y"], x * 10.0)
        await mgr.close()
        assert v2_model.closed

    asyncio.run(go())


def test_failed_load_keeps_old_version_serving(tmp_path: Path, gated_manager: ModelManager) -> None:
    async def go() -> None:
        mgr = gated_manager
        GatedBackend.gate.set()
        await mgr.load("m", ModelSource(gated_file(tmp_path, "v1", 2.0), precision="fp32",
                                        version=1))
        with pytest.raises(ModelError, match="negative"):
            await mgr.load("m", ModelSource(gated_file(tmp_path, "v2", -1.0), precision="fp32",
                                            version=2))
        assert mgr.get("m").version == 1
        assert mgr.slot("m").state == "ready"
        assert "negative" in mgr.slot("m").last_error
        x = np.ones(3, np.float32)
        bad_check = ModelCheck({"x": x}, {"y": x * 3.0}, atol=1e-6, rtol=0)
        with pytest.raises(ModelError, match=r"check 0: output 'y' is off by up to 1"):
            await mgr.load("m", ModelSource(gated_file(tmp_path, "v3", 4.0), precision="fp32",
                                            version=3, checks=(bad_check,)))
        assert mgr.get("m").version == 1
        assert GatedBackend.made[-1].closed  # the refused version's session is released
        good_check = ModelCheck({"x": x}, {"y": x * 5.0})
        await mgr.load("m", ModelSource(gated_file(tmp_path, "v4", 5.0), precision="fp32",
                                        version=4, checks=(good_check,)))
        assert mgr.get("m").version == 4
        await mgr.unload("m")
        with pytest.raises(ModelNotReady):
            mgr.get("m")
        await mgr.close()

    asyncio.run(go())


def test_first_load_failure_marks_failed(tmp_path: Path, gated_manager: ModelManager) -> None:
    async def go() -> None:
        with pytest.raises(ModelError):
            await gated_manager.load("m", ModelSource(gated_file(tmp_path, "v", -1.0),
                                                      precision="fp32"))
        assert gated_manager.slot("m").state == "failed"
        with pytest.raises(ModelNotReady, match=r"failed: .*negative"):
            gated_manager.get("m")
        await gated_manager.close()

    asyncio.run(go())


def test_tiny_runs_stay_on_the_loop_and_the_rest_go_to_workers(
        tmp_path: Path, gated_manager: ModelManager) -> None:
    async def go() -> None:
        mgr = gated_manager
        GatedBackend.gate.set()
        mv = await mgr.load("m", ModelSource(gated_file(tmp_path, "v1", 2.0), precision="fp32",
                                             version=1))
        model = GatedBackend.made[-1]
        loop_thread = threading.current_thread()
        x = np.array([1.0, 2.0], np.float32)

        async def ran_on() -> threading.Thread:
            _, out = await mgr.infer("m", {"x": x})
            np.testing.assert_array_equal(out["y"], x * 2)
            return model.threads[-1]

        assert await ran_on() is not loop_thread  # no run timed yet: to a worker
        assert mv.ns_per_byte is not None
        mv.ns_per_byte = 1.0  # 8 bytes of input: predicted 8 ns
        assert await ran_on() is loop_thread
        with mgr.lease("m"):  # another request holding the version, not running: no matter
            assert await ran_on() is loop_thread
        # Another run of this version in a worker: a backend that serialises runs would make
        # the loop wait for it, so the tiny one goes to a worker too.
        GatedBackend.gate.clear()
        mv.ns_per_byte = 1e6  # predicted 8 ms: to a worker, where it waits for the gate
        runs = len(model.threads)
        slow = asyncio.ensure_future(mgr.infer("m", {"x": x}))
        while len(model.threads) == runs:  # until the slow run is in its worker
            await asyncio.sleep(0.005)
        mv.ns_per_byte = 1.0
        tiny = asyncio.ensure_future(ran_on())
        await asyncio.sleep(0.05)
        GatedBackend.gate.set()
        assert await tiny is not loop_thread
        await slow
        mv.ns_per_byte = 1e6  # predicted 8 ms
        assert await ran_on() is not loop_thread
        await mgr.close()

    asyncio.run(go())
