"""Dynamic batching with real onnxruntime models: callers get exactly their own rows.

A request to an idle model runs at once; requests that arrive while every concurrency slot is
busy form the next batch. The tests make batches deterministic by holding every slot
(:func:`queued`) until the requests are queued, so they know which requests share a run.

onnxruntime's CPU GEMM gave bit-identical rows for every batch size measured here (1 to 64
rows of the test MLP, 1 and 2 threads: max difference 0 ULP), so outputs are compared exactly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

import edgeagent.runtime.manager as manager_module
import edgeagent.runtime.scheduler as scheduler_module
from edgeagent.errors import InferenceError, InferenceInputError, Overloaded
from edgeagent.runtime.base import TensorSpec
from edgeagent.runtime.batching import Gate
from edgeagent.runtime.manager import ModelManager, ModelSource
from edgeagent.runtime.onnx_backend import OnnxBackend
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.runtime.scheduler import InferenceScheduler, ModelLimits
from tests import onnx_models
from tests.runtime.test_manager import GatedBackend, cpu_planner, gated_file

T = TypeVar("T")

LONG_MS = 60_000.0
"""A queue delay no request waits for: the collector never waits to fill a batch."""


async def queued(sched: InferenceScheduler, calls: Sequence[Awaitable[T]],
                 name: str = "m") -> list[T | BaseException]:
    """Run ``calls`` with every concurrency slot of the model held until all of them are
    queued, so they form batches in queue order (the results, or their exceptions)."""
    lane = sched._lane(name)
    slots = lane.limits.max_concurrency
    for _ in range(slots):
        await lane.running.acquire()
    tasks = [asyncio.ensure_future(c) for c in calls]
    while sched.queue_depth(name) < len(tasks) and not any(t.done() for t in tasks):
        await asyncio.sleep(0)
    for _ in range(slots):
        lane.running.release()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def serving(path: Path, limits: ModelLimits, name: str = "m",
                  registry: BackendRegistry | None = None,
                  ) -> tuple[ModelManager, InferenceScheduler]:
    mgr = ModelManager(registry or BackendRegistry(), cpu_planner)
    await mgr.load(name, ModelSource(path, precision="fp32"))
    sched = InferenceScheduler(mgr)
    sched.configure({name: limits})
    return mgr, sched


async def finish(mgr: ModelManager) -> None:
    """Close the manager and check that batching left no task behind."""
    await mgr.close()
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leftovers, leftovers


def alone(mgr: ModelManager, inputs: dict[str, np.ndarray],
          outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """What the model gives for one request run by itself."""
    model = mgr.get("m").model
    return model.run(model.validate(inputs), outputs)


def test_concurrent_callers_get_exactly_their_rows(tmp_path: Path) -> None:
    path = onnx_models.mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(7)
    sizes = [1, 3, 2, 5, 1, 4, 2, 6]  # 24 rows: one batch of 24
    requests = [{"input": rng.standard_normal((n, 64)).astype(np.float32)} for n in sizes]

    async def go() -> None:
        mgr, sched = await serving(path, ModelLimits(max_batch_size=24, max_queue_delay_ms=LONG_MS))
        results: list[Any] = await queued(sched, [sched.infer("m", r) for r in requests])
        for req, (mv, out) in zip(requests, results, strict=False):
            assert mv.version == 1
            assert out["logits"].shape == (req["input"].shape[0], 10)
            np.testing.assert_array_equal(out["logits"], alone(mgr, req)["logits"])
        stats = sched.stats("m")
        assert stats.inference_count == len(sizes)
        assert stats.execution_count == 1
        assert dict(stats.batch_sizes) == {24: 1}
        triton = stats.triton("1")
        assert triton["batch_stats"][0]["batch_size"] == 24
        assert triton["batch_stats"][0]["compute_infer"]["ns"] > 0
        assert sched.describe("m")["batching"] == "on"
        await finish(mgr)

    asyncio.run(go())


def test_batches_never_exceed_max_batch_size_and_keep_arrival_order(tmp_path: Path) -> None:
    path = onnx_models.mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(3)
    # At most 8 rows: [3, 5], [4, 4], [2, 6], [7, 1]; every batch starts because it is full.
    sizes = [3, 5, 4, 4, 2, 6, 7, 1]
    requests = [{"input": rng.standard_normal((n, 64)).astype(np.float32)} for n in sizes]

    async def go() -> None:
        mgr, sched = await serving(
            path, ModelLimits(max_batch_size=8, max_queue_delay_ms=LONG_MS, max_concurrency=1))
        results: list[Any] = await queued(sched, [sched.infer("m", r) for r in requests])
        for req, (_, out) in zip(requests, results, strict=False):
            np.testing.assert_array_equal(out["logits"], alone(mgr, req)["logits"])
        stats = sched.stats("m")
        assert stats.execution_count == 4 < stats.inference_count == 8
        assert dict(stats.batch_sizes) == {8: 4}
        await finish(mgr)

    asyncio.run(go())


def test_request_larger_than_max_batch_size_runs_alone(tmp_path: Path) -> None:
    path = onnx_models.mlp(tmp_path / "mlp.onnx")
    big = {"input": np.random.default_rng(1).standard_normal((10, 64)).astype(np.float32)}
    small = {"input": np.ones((2, 64), np.float32)}

    async def go() -> None:
        mgr, sched = await serving(path, ModelLimits(max_batch_size=4, max_queue_delay_ms=0))
        results: list[Any] = await queued(sched, [sched.infer("m", big), sched.infer("m", small)])
        (_, out_big), (_, out_small) = results
        np.testing.assert_array_equal(out_big["logits"], alone(mgr, big)["logits"])
        np.testing.assert_array_equal(out_small["logits"], alone(mgr, small)["logits"])
        assert sched.stats("m").batch_sizes[10] == 1  # never merged with the 2-row request
        await finish(mgr)

    asyncio.run(go())


def test_only_requests_asking_the_same_outputs_share_a_run(tmp_path: Path) -> None:
    path = onnx_models.multi_io(tmp_path / "multi.onnx")
    rng = np.random.default_rng(5)

    def request(n: int) -> dict[str, np.ndarray]:
        return {"x": rng.standard_normal((n, 3)).astype(np.float32),
                "k": rng.integers(-5, 5, (n, 3)).astype(np.int64)}

    # Three output subsets, interleaved; each subset has 1 + 2 rows = max_batch_size.
    plan: list[tuple[dict[str, np.ndarray], list[str] | None]] = []
    for n in (1, 2):
        plan += [(request(n), ["sum"]), (request(n), ["k2"]), (request(n), None)]

    async def go() -> None:
        mgr, sched = await serving(path, ModelLimits(max_batch_size=3, max_queue_delay_ms=LONG_MS))
        results: list[Any] = await queued(sched, [sched.infer("m", r, outs) for r, outs in plan])
        for (req, outs), (_, got) in zip(plan, results, strict=False):
            want = alone(mgr, req, outs)
            assert sorted(got) == sorted(want)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
                assert got[name].dtype == want[name].dtype
        assert sched.stats("m").execution_count == 3
        await finish(mgr)

    asyncio.run(go())


def test_a_failing_batch_fails_each_of_its_requests_and_only_them(tmp_path: Path) -> None:
    path = onnx_models.lookup(tmp_path / "lookup.onnx")

    def idx(*values: int) -> dict[str, np.ndarray]:
        return {"idx": np.array(values, np.int64)}

    async def go() -> None:
        mgr, sched = await serving(path, ModelLimits(max_batch_size=3, max_queue_delay_ms=LONG_MS))
        # 9 is out of the table: valid to the signature, fails inside onnxruntime.
        results = await queued(sched, [sched.infer("m", idx(0)), sched.infer("m", idx(9)),
                                       sched.infer("m", idx(1))])
        assert all(isinstance(r, InferenceError) for r in results), results
        assert "out of data bounds" in str(results[0])
        # A malformed request is refused before it joins a batch: it cannot fail the others.
        good = [sched.infer("m", idx(i)) for i in (0, 1, 2)]
        bad = sched.infer("m", {"idx": np.array([0], np.float32)})
        *answers, refused = await queued(sched, [*good, bad])
        assert isinstance(refused, InferenceInputError)
        assert "datatype FP32 does not match the model's INT64" in str(refused)
        for i, (_, out) in enumerate(answers):
            np.testing.assert_array_equal(out["rows"], [[2 * i, 2 * i + 1]])
        stats = sched.stats("m")
        assert stats.fail.count == 3
        assert stats.inference_count == 3
        await finish(mgr)

    asyncio.run(go())


def test_an_output_that_is_not_per_row_fails_the_batch_clearly(tmp_path: Path) -> None:
    path = onnx_models.doubled(tmp_path / "doubled.onnx")

    async def go() -> None:
        mgr, sched = await serving(path, ModelLimits(max_batch_size=2, max_queue_delay_ms=LONG_MS))
        one = {"x": np.ones(1, np.float32)}
        results = await queued(sched, [sched.infer("m", one), sched.infer("m", one)])
        assert all(isinstance(r, InferenceError) for r in results), results
        assert "cannot be split between the batched requests" in str(results[0])
        await finish(mgr)

    asyncio.run(go())


def test_static_first_dimension_is_served_unbatched_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = onnx_models.mlp(tmp_path / "mlp1.onnx", batch=1)

    async def go() -> None:
        mgr, sched = await serving(path, ModelLimits(max_batch_size=8, max_queue_delay_ms=LONG_MS))
        x = {"input": np.ones((1, 64), np.float32)}
        with caplog.at_level(logging.WARNING, logger="edgeagent.runtime.scheduler"):
            results = await asyncio.gather(*(sched.infer("m", x) for _ in range(4)))
        for _, out in results:
            np.testing.assert_array_equal(out["logits"], alone(mgr, x)["logits"])
        warnings = [r for r in caplog.records if "serving it unbatched" in r.getMessage()]
        assert len(warnings) == 1
        assert "input 'input' has shape [1, 64]" in warnings[0].getMessage()
        assert sched.describe("m")["batching"].startswith("unavailable: input 'input'")
        assert sched.stats("m").execution_count == 4
        await finish(mgr)

    asyncio.run(go())


@pytest.fixture
def gated_registry() -> BackendRegistry:
    GatedBackend.gate = threading.Event()
    GatedBackend.made = []
    return BackendRegistry({"onnx": ("tests.runtime.test_manager", "GatedBackend")})


async def serving_gated(tmp_path: Path, registry: BackendRegistry, limits: ModelLimits,
                        ) -> tuple[ModelManager, InferenceScheduler]:
    """:func:`serving` of a gated ``x * 2`` model, loaded (and warmed up) with its gate open."""
    GatedBackend.gate.set()
    return await serving(gated_file(tmp_path, "x2", 2.0), limits, registry=registry)


def test_full_queue_refuses_and_cancelled_requests_leave_it(
        tmp_path: Path, gated_registry: BackendRegistry) -> None:
    async def go() -> None:
        mgr, sched = await serving_gated(tmp_path, gated_registry, ModelLimits(
            max_batch_size=8, max_queue_delay_ms=0, max_queue_size=2, max_concurrency=1))
        GatedBackend.gate.clear()
        x = np.array([1.0, 2.0], np.float32)
        running = asyncio.create_task(sched.infer("m", {"x": x}))
        while mgr.oldest_running_s() == 0.0:  # the one concurrency slot is now taken
            await asyncio.sleep(0.01)
        queued = [asyncio.create_task(sched.infer("m", {"x": x * k})) for k in (3, 4)]
        while sched.queue_depth("m") < 2:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded, match=r"2 requests queued \(max_queue_size 2\)"):
            await sched.infer("m", {"x": x})
        assert sched.stats("m").rejected == 1
        queued[0].cancel()
        GatedBackend.gate.set()
        _, first = await running
        _, last = await queued[1]
        np.testing.assert_array_equal(first["y"], x * 2)
        np.testing.assert_array_equal(last["y"], x * 4 * 2)
        with pytest.raises(asyncio.CancelledError):
            await queued[0]
        assert sched.queue_depth("m") == 0
        await finish(mgr)

    asyncio.run(go())


def test_queued_requests_share_a_run_while_the_model_is_busy(
        tmp_path: Path, gated_registry: BackendRegistry) -> None:
    async def go() -> None:
        mgr, sched = await serving_gated(tmp_path, gated_registry, ModelLimits(
            max_batch_size=16, max_queue_delay_ms=0, max_concurrency=1))
        GatedBackend.gate.clear()
        running = asyncio.create_task(sched.infer("m", {"x": np.ones(1, np.float32)}))
        while mgr.oldest_running_s() == 0.0:
            await asyncio.sleep(0.01)
        xs = [np.arange(n, dtype=np.float32) + n for n in (1, 2, 3)]
        queued = [asyncio.create_task(sched.infer("m", {"x": x})) for x in xs]
        while sched.queue_depth("m") < 3:
            await asyncio.sleep(0)
        GatedBackend.gate.set()
        await running
        for x, task in zip(xs, queued, strict=False):
            _, out = await task
            np.testing.assert_array_equal(out["y"], x * 2)
        assert dict(sched.stats("m").batch_sizes) == {1: 1, 6: 1}
        await finish(mgr)

    asyncio.run(go())


def test_swap_mid_stream_answers_each_request_from_one_whole_version(tmp_path: Path) -> None:
    v1 = onnx_models.mlp(tmp_path / "v1.onnx", seed=1)
    v2 = onnx_models.mlp(tmp_path / "v2.onnx", seed=2)
    rng = np.random.default_rng(11)
    requests = [{"input": rng.standard_normal((1 + i % 4, 64)).astype(np.float32)}
                for i in range(120)]

    async def go() -> None:
        mgr, sched = await serving(v1, ModelLimits(max_batch_size=8, max_queue_delay_ms=1))
        # Sessions of their own: the manager closes v1's once v2 replaces it.
        ref1, ref2 = (OnnxBackend().load(p, cpu_planner("onnx", "fp32", "")) for p in (v1, v2))

        loaded = asyncio.Event()

        async def stream() -> list[tuple[int, np.ndarray]]:
            # Waves until the swap is done, then one more (however long the load takes).
            answers: list[tuple[int, np.ndarray]] = []
            wave, after = 0, 0
            while after < 2:
                batch = [requests[(wave + i) % len(requests)] for i in range(8)]
                got = await asyncio.gather(*(sched.infer("m", r) for r in batch))
                answers += [(mv.version, out["logits"]) for mv, out in got]
                wave += 8
                after += loaded.is_set()
            return answers

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(0)
        await mgr.load("m", ModelSource(v2, version=2, precision="fp32"))
        loaded.set()
        answers = await streaming
        versions = {v for v, _ in answers}
        assert versions <= {1, 2}
        assert answers[-1][0] == 2
        sent = [requests[i % len(requests)] for i in range(len(answers))]
        for req, (version, logits) in zip(sent, answers, strict=True):
            ref = ref1 if version == 1 else ref2
            np.testing.assert_array_equal(logits, ref.run(req)["logits"])
        await finish(mgr)

    asyncio.run(go())


def test_a_tiny_model_s_batches_run_on_the_loop_unless_a_run_is_in_a_worker(
        tmp_path: Path, gated_registry: BackendRegistry) -> None:
    """The batcher decides where a batch runs as the direct path does: a tiny model's batch
    on the event loop (the hop to a worker costs more than the run), any batch in a worker
    while another run of the version is in one."""
    async def go() -> None:
        mgr, sched = await serving_gated(tmp_path, gated_registry, ModelLimits(
            max_batch_size=8, max_queue_delay_ms=0, max_concurrency=2))
        model, mv = GatedBackend.made[-1], mgr.get("m")
        loop_thread = threading.current_thread()
        mv.ns_per_byte = 1.0  # predicted a few ns: inline
        xs = [np.full(2, k, np.float32) for k in (1, 2, 3)]
        runs = len(model.threads)
        results = await queued(sched, [sched.infer("m", {"x": x}) for x in xs])
        for x, (_, out) in zip(xs, results, strict=True):  # type: ignore[misc]
            np.testing.assert_array_equal(out["y"], x * 2)
        assert model.threads[runs:] == [loop_thread]  # one batch of three, on the loop

        GatedBackend.gate.clear()
        # Predicted 80 ms: to a worker (even alone), where it waits for the gate.
        mv.ns_per_byte = 1e7
        slow = asyncio.create_task(sched.infer("m", {"x": np.ones(2, np.float32)}))
        while len(model.threads) == runs + 1:
            await asyncio.sleep(0.005)
        mv.ns_per_byte = 1.0
        lane = sched._lane("m")
        await lane.running.acquire()  # the other slot: the three queue for the batcher
        batch = [asyncio.create_task(sched.infer("m", {"x": x})) for x in xs]
        while sched.queue_depth("m") < 3:
            await asyncio.sleep(0)
        lane.running.release()
        while len(model.threads) == runs + 2:
            await asyncio.sleep(0.005)
        assert model.threads[-1] is not loop_thread
        GatedBackend.gate.set()
        await slow
        for x, task in zip(xs, batch, strict=True):
            _, out = await task
            np.testing.assert_array_equal(out["y"], x * 2)
        await finish(mgr)

    asyncio.run(go())


def test_a_request_alone_in_the_agent_runs_on_the_loop_if_predicted_short(
        tmp_path: Path, gated_registry: BackendRegistry) -> None:
    """With no other request running or waiting, no other client connected and no run in a
    worker, a run predicted under ``IDLE_INLINE_RUN_NS`` skips the hand-off to a worker and
    back; with another request in flight or another client, or predicted longer, it goes to a
    worker."""
    async def go() -> None:
        mgr, sched = await serving_gated(tmp_path, gated_registry, ModelLimits(
            max_concurrency=2))
        model, mv = GatedBackend.made[-1], mgr.get("m")
        loop_thread = threading.current_thread()
        x = np.ones(2, np.float32)  # 8 bytes

        async def ran_on() -> threading.Thread:
            _, out = await sched.infer("m", {"x": x})
            np.testing.assert_array_equal(out["y"], x * 2)
            return model.threads[-1]

        assert await ran_on() is not loop_thread  # never timed: to a worker
        mv.ns_per_byte = 1e6  # predicted 8 ms: over INLINE_RUN_NS, under IDLE_INLINE_RUN_NS
        assert manager_module.INLINE_RUN_NS < 8e6 < manager_module.IDLE_INLINE_RUN_NS
        assert await ran_on() is loop_thread
        assert mv.ran_since_release  # may have grown the runtime's memory: released later
        sched.quiet = lambda: False  # another client connected: its request may be unread
        assert await ran_on() is not loop_thread
        sched.quiet = lambda: True
        mv.ns_per_byte = 2e6  # predicted 16 ms: to a worker even alone
        assert await ran_on() is not loop_thread

        # Another request in flight (in a worker, held at the gate): not alone.
        GatedBackend.gate.clear()
        mv.ns_per_byte = 1e7
        runs = len(model.threads)
        slow = asyncio.create_task(sched.infer("m", {"x": x}))
        while len(model.threads) == runs:
            await asyncio.sleep(0.005)
        mv.ns_per_byte = 1e6
        second = asyncio.create_task(ran_on())
        while len(model.threads) == runs + 1:
            await asyncio.sleep(0.005)
        GatedBackend.gate.set()
        assert await second is not loop_thread
        await slow
        await finish(mgr)

    asyncio.run(go())


@pytest.mark.parametrize(("ns_per_byte", "cpus", "batchable", "started"), [
    (1e6, 1, True, 1),  # 8 ms runs, threads fill the one CPU: one batch at a time
    (1e4, 1, True, 2),  # 80 us runs (over INLINE_RUN_NS, under LONG_RUN_NS): both slots
    (1e6, 4, True, 2),  # long runs, but 1 thread x 2 slots fit in 4 CPUs: both slots
    (1e6, 1, False, 2),  # served unbatched (a fixed first dimension): nothing would share a run
])
def test_long_runs_that_fill_the_cores_run_one_batch_at_a_time(
        tmp_path: Path, gated_registry: BackendRegistry, ns_per_byte: float, cpus: int,
        batchable: bool, started: int) -> None:
    """With batching on, a second concurrent run of a model whose runs are long and whose
    threads fill the cores would only split the same cores: the requests that would start it
    wait and run together in the next batch instead; short runs, or runs that leave cores
    free, keep ``max_concurrency``."""
    async def go() -> None:
        mgr, sched = await serving_gated(tmp_path, gated_registry, ModelLimits(
            max_batch_size=8, max_queue_delay_ms=0, max_concurrency=2))
        sched.cpus = cpus
        sched.quiet = lambda: False  # runs go to a worker, where the closed gate holds them
        model, mv = GatedBackend.made[-1], mgr.get("m")
        if not batchable:
            model.inputs = (TensorSpec("x", "FP32", (2,)),)
        runs = len(model.threads)
        GatedBackend.gate.clear()
        mv.ns_per_byte = ns_per_byte  # 8-byte requests
        assert (ns_per_byte * 8 >= scheduler_module.LONG_RUN_NS) == (ns_per_byte == 1e6)
        xs = [np.full(2, k, np.float32) for k in range(1, 6)]
        tasks = []
        for x in xs:
            tasks.append(asyncio.create_task(sched.infer("m", {"x": x})))
            await asyncio.sleep(0.02)  # each has arrived, and started if a slot let it
        assert len(model.threads) - runs == started
        assert sched.queue_depth("m") == len(xs) - started
        GatedBackend.gate.set()
        for x, task in zip(xs, tasks, strict=True):
            _, out = await task
            np.testing.assert_array_equal(out["y"], x * 2)
        stats = sched.stats("m")
        assert stats.inference_count == len(xs)
        if started == 1:  # the four that waited ran together: 8 rows (2 each)
            assert dict(stats.batch_sizes)[8] == 1
        if not batchable:
            assert set(stats.batch_sizes) == {2}  # every request ran alone
        await finish(mgr)

    asyncio.run(go())


def test_gate_limit_below_its_slots() -> None:
    async def go() -> None:
        gate = Gate(2)
        gate.limit = 1
        assert gate.try_acquire() and not gate.try_acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert not waiter.done()
        gate.limit = 5  # raised (clamped to the 2 slots): the waiter gets the second slot
        assert gate.limit == 2
        await asyncio.wait_for(waiter, 1)
        assert not gate.free
        gate.limit = 0  # clamped to one: the two running are not stopped
        assert gate.limit == 1
        gate.release()
        assert not gate.free  # one still runs, and the limit is one
        gate.release()
        assert gate.free

    asyncio.run(go())
