"""Memory that comes back: onnxruntime's arena and the C heap handed back after a load and
after a burst, and runtimes no model needs never loaded."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgeagent.device.plan import ProviderPlan
from edgeagent.runtime.base import LoadedModel
from edgeagent.runtime.manager import ModelManager, ModelSource
from edgeagent.runtime.memory import HeapTrimmer, limit_malloc_arenas, release_free_heap
from edgeagent.runtime.registry import BackendRegistry
from tests import onnx_models
from tests.runtime.test_manager import GatedBackend, GatedModel, cpu_planner, gated_file

#: Elements of the wide model's intermediate tensor at the burst's shape (64 MiB of float32).
WIDE = 16 * 2**20


def wide_model(path: Path) -> Path:
    """float32 [1, n] -> x * 2 (an n-element intermediate, from the arena) -> sum -> [1, 1]."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"]),
         helper.make_node("ReduceSum", ["doubled"], ["total"], keepdims=1)],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 1])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    return onnx_models._save(graph, path)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_release_memory_hands_back_the_arena_and_the_model_still_answers(tmp_path: Path) -> None:
    path = wide_model(tmp_path / "wide.onnx")

    async def go() -> None:
        mgr = ModelManager(BackendRegistry(), cpu_planner)
        mgr.declare("wide")
        await mgr.load("wide", ModelSource(path, version=1))
        ones = np.ones((1, WIDE), np.float32)
        _, out = await mgr.infer("wide", {"x": ones})
        assert out["total"][0, 0] == pytest.approx(2.0 * WIDE)
        del ones
        release_free_heap()  # the request's own buffers: what is left is the arena's
        grown = rss_mib()
        await asyncio.get_running_loop().run_in_executor(None, mgr.release_memory)
        released = rss_mib()
        # The 64 MiB intermediate was the arena's; half of it is a margin for the rest.
        assert grown - released > 32, (grown, released)
        _, out = await mgr.infer("wide", {"x": np.full((1, 3), 0.5, np.float32)})
        assert out["total"][0, 0] == pytest.approx(3.0)
        await mgr.close()

    asyncio.run(go())


def test_release_memory_skips_retired_versions_and_keeps_serving(tmp_path: Path) -> None:
    path = onnx_models.mlp(tmp_path / "mlp.onnx")

    async def go() -> None:
        mgr = ModelManager(BackendRegistry(), cpu_planner)
        mgr.declare("mlp")
        first = await mgr.load("mlp", ModelSource(path, version=1))
        second = await mgr.load("mlp", ModelSource(path, version=2))
        assert first.retired and not second.retired
        await asyncio.get_running_loop().run_in_executor(None, mgr.release_memory)
        x = np.ones((2, 64), np.float32)
        mv, out = await mgr.infer("mlp", {"input": x})
        assert mv.version == 2 and out["logits"].shape == (2, 10)
        assert second.in_flight == 0  # the release's lease was given back
        await mgr.close()

    asyncio.run(go())


def test_the_trimmer_runs_the_release_it_was_given_once_per_burst() -> None:
    released: list[int] = []

    async def go() -> None:
        trimmer = HeapTrimmer(quiet_s=0.02, release=lambda: released.append(1))
        for _ in range(3):
            trimmer.start()
            trimmer.note()
        while not released:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        trimmer.close()

    asyncio.run(go())
    assert released == [1]


def test_a_failing_release_is_logged_and_the_next_burst_still_releases(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def release() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("arena gone")

    async def burst(trimmer: HeapTrimmer, wanted: int) -> None:
        trimmer.start()
        trimmer.note()
        while len(calls) < wanted:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the done callback runs on the loop

    async def go() -> None:
        trimmer = HeapTrimmer(quiet_s=0.02, release=release)
        await burst(trimmer, 1)
        await burst(trimmer, 2)
        trimmer.close()

    with caplog.at_level("ERROR", logger="edgeagent.runtime.memory"):
        asyncio.run(go())
    assert calls == [1, 1]
    assert [r.exc_info[1].args for r in caplog.records if r.exc_info] == [("arena gone",)]


def test_the_operators_malloc_arena_max_wins() -> None:
    assert limit_malloc_arenas({"MALLOC_ARENA_MAX": "4"}) is False


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_status_describes_litert_without_loading_it() -> None:
    pytest.importorskip("ai_edge_litert")
    out = json.loads(_python(
        "import json, sys\n"
        "from edgeagent.runtime.registry import BackendRegistry\n"
        "r = BackendRegistry()\n"
        "before = r.status()['tflite']\n"
        "loaded_early = 'ai_edge_litert' in sys.modules\n"
        "r.for_format('tflite')\n"
        "print(json.dumps({'before': before, 'loaded_early': loaded_early,\n"
        "                  'after': r.status()['tflite']}))\n"))
    assert out["loaded_early"] is False
    assert out["before"]["available"] is True and out["before"]["loaded"] is False
    assert out["before"]["distribution"].startswith("ai-edge-litert ")
    assert out["after"]["available"] is True and "loaded" not in out["after"]
    assert out["after"]["litert"] == out["before"]["litert"]


def test_probe_names_what_to_install_when_no_interpreter_is_there() -> None:
    from edgeagent.runtime.litert_backend import LiteRTBackend

    status = LiteRTBackend.probe((("no_such_litert.interpreter", "no-such-litert"),))
    assert status["available"] is False and "no_such_litert.interpreter" in str(status["reason"])
    assert "edgeagent[litert]" in str(status["hint"])


def test_grpc_messages_are_triton_s_without_its_client() -> None:
    out = json.loads(_python(
        "import json, sys\n"
        "from edgeagent.api import grpc_server\n"
        "early = sorted(m for m in ('tritonclient.grpc', 'rapidjson', 'ml_dtypes')\n"
        "               if m in sys.modules)\n"
        "import tritonclient.grpc as client\n"
        "print(json.dumps({'early': early,\n"
        "    'same': client.service_pb2 is grpc_server.service_pb2,\n"
        "    'client': client.InferenceServerClient.__name__,\n"
        "    'message': grpc_server.service_pb2.ModelInferRequest.DESCRIPTOR.full_name}))\n"))
    assert out == {"early": [], "same": True, "client": "InferenceServerClient",
                   "message": "inference.ModelInferRequest"}


class Releasing(GatedModel):
    """A gated model that counts the memory releases asked of it."""

    def __init__(self, factor: float, gate: threading.Event) -> None:
        super().__init__(factor, gate)
        self.releases = 0

    def release_memory(self, inputs: Mapping[str, np.ndarray]) -> None:
        assert set(inputs) == {"x"}
        self.releases += 1


class ReleasingBackend(GatedBackend):
    def load(self, path: Path, plan: ProviderPlan) -> LoadedModel:
        model = Releasing(float(path.read_bytes()[1:].decode()), self.gate)
        self.made.append(model)
        return model


def test_only_versions_that_ran_in_a_worker_since_the_last_release_are_released(
        tmp_path: Path) -> None:
    GatedBackend.gate = threading.Event()
    GatedBackend.gate.set()
    GatedBackend.made = []
    registry = BackendRegistry({"onnx": ("tests.runtime.test_memory_release",
                                         "ReleasingBackend")})

    async def go() -> None:
        mgr = ModelManager(registry, cpu_planner)
        for name in ("busy", "idle"):
            mgr.declare(name)
            await mgr.load(name, ModelSource(gated_file(tmp_path, name, 2.0), precision="fp32"))
        busy, idle = (mgr.get(n).model for n in ("busy", "idle"))
        assert isinstance(busy, Releasing) and isinstance(idle, Releasing)
        after_load = busy.releases, idle.releases  # each released once, after its load
        release = functools.partial(asyncio.get_running_loop().run_in_executor, None,
                                    mgr.release_memory)
        await mgr.infer("busy", {"x": np.ones(4, np.float32)})  # no timing yet: a worker
        await release()
        assert (busy.releases, idle.releases) == (after_load[0] + 1, after_load[1])
        await release()  # nothing ran since: nothing to release
        assert (busy.releases, idle.releases) == (after_load[0] + 1, after_load[1])
        await mgr.close()

    asyncio.run(go())
