"""The scheduler without batching: concurrency limit, bounded queue, statistics, status."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeagent.config import ModelSection
from edgeagent.errors import (
    DeadlineExceeded,
    InferenceInputError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
)
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


@pytest.mark.parametrize("max_batch_size", [0, 1])
def test_higher_priority_runs_first_and_an_expired_request_never_runs(
        tmp_path: Path, max_batch_size: int) -> None:
    """Priority 1 is the highest and 0 (the default) ranks last; a request whose timeout
    passes while queued is answered with DeadlineExceeded and never run (batched or not)."""
    GatedBackend.gate = threading.Event()
    GatedBackend.made = []
    registry = BackendRegistry({"onnx": ("tests.runtime.test_manager", "GatedBackend")})

    async def go() -> None:
        mgr = ModelManager(registry, cpu_planner)
        GatedBackend.gate.set()  # warm-up
        await mgr.load("m", ModelSource(gated_file(tmp_path, "x2", 2.0), precision="fp32"))
        GatedBackend.gate.clear()
        sched = InferenceScheduler(mgr)
        sched.configure({"m": ModelLimits(max_batch_size=max_batch_size, max_concurrency=1)})
        order: list[str] = []

        async def call(tag: str, **kw: int) -> np.ndarray:
            _, out = await sched.infer("m", {"x": np.ones(1, np.float32)}, **kw)
            order.append(tag)
            return out["y"]

        running = asyncio.create_task(call("running"))
        while mgr.oldest_running_s() == 0.0:
            await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(call("default")),
                 asyncio.create_task(call("low", priority=5)),
                 asyncio.create_task(call("high", priority=1))]
        while sched.queue_depth("m") < 3:
            await asyncio.sleep(0)
        with pytest.raises(DeadlineExceeded, match="request timeout expired"):
            await call("expired", timeout_us=1000)
        assert sched.stats("m").fail.count == 1
        GatedBackend.gate.set()
        for task in (running, *tasks):
            np.testing.assert_array_equal(await task, [2.0])
        assert order == ["running", "high", "low", "default"]
        assert sched.stats("m").execution_count == 4
        assert sched.stats("m").inference_count == 4
        await finish(mgr)

    asyncio.run(go())


def test_statistics_counts_agree_as_triton_tools_expect(tmp_path: Path) -> None:
    path = onnx_models.mlp(tmp_path / "mlp.onnx")

    async def go() -> None:
        for limits in (ModelLimits(), ModelLimits(max_batch_size=8)):
            mgr = ModelManager(BackendRegistry(), cpu_planner)
            await mgr.load("m", ModelSource(path, precision="fp32"))
            sched = InferenceScheduler(mgr)
            sched.configure({"m": limits})
            x = {"input": np.ones((1, 64), np.float32)}
            await asyncio.gather(*(sched.infer("m", x) for _ in range(6)))
            s = sched.stats("m").triton("1")
            counts = {k: v["count"] for k, v in s["inference_stats"].items()}
            assert counts["success"] == counts["queue"] == counts["compute_input"] \
                == counts["compute_infer"] == counts["compute_output"] == 6
            for entry in s["batch_stats"]:
                assert entry["compute_input"]["count"] == entry["compute_infer"]["count"] \
                    == entry["compute_output"]["count"]
            await finish(mgr)

    asyncio.run(go())
