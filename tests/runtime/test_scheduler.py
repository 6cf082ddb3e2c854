"""The scheduler without batching: concurrency limit, bounded queue, statistics, status."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeagent.config import ModelSection
from edgeagent.errors import InferenceInputError, ModelNotFound, ModelNotReady, Overloaded
from edgeagent.runtime.manager import ModelManager, ModelSource
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.runtime.scheduler import InferenceScheduler, ModelLimits
from tests import onnx_models
from tests.runtime.test_batching import finish
from tests.runtime.test_manager import GatedBackend, cpu_planner, gated_file


def test_limits_come_from_the_models_section() -> None:
    section = ModelSection(name="m", path="m.onnx", max_batch_size=8, max_queue_delay_ms=5,
                           max_queue_size=10, max_concurrency=3)
    assert ModelLimits.from_section(section) == ModelLimits(8, 5, 10, 3)


def test_runs_requests_and_counts_them(tmp_path: Path) -> None:
    path = onnx_models.mlp(tmp_path / "mlp.onnx")

    async def go() -> None:
        mgr = ModelManager(BackendRegistry(), cpu_planner)
        sched = InferenceScheduler(mgr)
        with pytest.raises(ModelNotFound):
            await sched.infer("m", {"input": np.ones((1, 64), np.float32)})
        mgr.declare("m")
        with pytest.raises(ModelNotReady):
            await sched.infer("m", {"input": np.ones((1, 64), np.float32)})
        await mgr.load("m", ModelSource(path, precision="fp32"))
        sched.configure({"m": ModelLimits(max_concurrency=1)})
        results = await asyncio.gather(
            *(sched.infer("m", {"input": np.ones((n, 64), np.float32)}) for n in (1, 2, 3)))
        assert [out["logits"].shape[0] for _, out in results] == [1, 2, 3]
        with pytest.raises(InferenceInputError):
            await sched.infer("m", {"input": np.ones((1, 3), np.float32)})
        stats = sched.stats("m")
        assert stats.inference_count == stats.execution_count == 3
        assert dict(stats.batch_sizes) == {1: 1, 2: 1, 3: 1}
        assert stats.fail.count == 1
        assert sched.describe("m") == {
            "max_batch_size": 0, "max_queue_delay_ms": 2.0, "max_queue_size": 64,
            "max_concurrency": 1, "queue_depth": 0, "batching": "off"}
        await finish(mgr)

    asyncio.run(go())


def test_concurrency_limit_queues_and_a_full_queue_refuses(tmp_path: Path) -> None:
    GatedBackend.gate = threading.Event()
    GatedBackend.made = []
    registry = BackendRegistry({"onnx": ("tests.runtime.test_manager", "GatedBackend")})

    async def go() -> None:
        mgr = ModelManager(registry, cpu_planner)
        GatedBackend.gate.set()  # warm-up
        await mgr.load("m", ModelSource(gated_file(tmp_path, "x3", 3.0), precision="fp32"))
        GatedBackend.gate.clear()
        sched = InferenceScheduler(mgr)
        sched.configure({"m": ModelLimits(max_queue_size=1, max_concurrency=1)})
        x = np.ones(2, np.float32)
        running = asyncio.create_task(sched.infer("m", {"x": x}))
        while mgr.oldest_running_s() == 0.0:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(sched.infer("m", {"x": x}))
        while sched.queue_depth("m") < 1:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="retry later") as refused:
            await sched.infer("m", {"x": x})
        assert refused.value.retry_after_s > 0
        assert sched.stats("m").in_flight == 1
        assert sched.stats("m").rejected == 1
        GatedBackend.gate.set()
        for task in (running, queued):
            _, out = await task
            np.testing.assert_array_equal(out["y"], x * 3)
        assert sched.stats("m").inference_count == 2
        await finish(mgr)

    asyncio.run(go())
