"""Tuning through the version owner with real sessions: background tuning after an activation,
the better configuration switched in, reused after a restart, tuned again when the key changes,
the agent answering (correctly) while it tunes, and a hub bundle whose fast variant fails its
checks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from edgeconvert.hub import Hub
from edgeconvert.publish import publish

from edgeagent.config import ModelSection, TuneSection
from edgeagent.errors import ModelNotFound
from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.tuning import Candidate, Figures, TuningService
from edgeagent.versions.owner import VersionOwner
from tests import onnx_models
from tests.hub.helpers import SAMPLE as HUB_SAMPLE
from tests.hub.helpers import Rig
from tests.hub.hubserver import HubServer
from tests.tuning.helpers import BOX, SAMPLE, FakeClock, TableMeasurer, planner, service

FASTER = {("m.onnx", 1): Figures(5.0, 6.0, 200.0, 0.01)}
TUNED = "m.onnx|CPUExecutionProvider|t1|b1"


async def _settled(owner: VersionOwner) -> None:
    while owner._tune_tasks:
        await asyncio.sleep(0.01)


class Agent:
    """A version owner over a real manager for one path model ``m`` with tuning on."""

    def __init__(self, state: Path, model: Path, measurer: TableMeasurer,
                 box: Mapping[str, object] = BOX) -> None:
        self.manager = ModelManager(BackendRegistry(), planner)
        self.service: TuningService = service(state, measurer, measurer.clock, box=box)
        self.owner = VersionOwner(self.manager, state, state, device_id="t",
                                  tuning=self.service)
        self.section = ModelSection(name="m", path=str(model), tune=TuneSection())

    async def __aenter__(self) -> Agent:
        await self.owner.start([self.section])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.owner.stop()
        await self.manager.close(1)


def test_tuned_after_activation_reused_after_restart_and_again_when_the_box_changes(
        tmp_path: Path) -> None:
    model = onnx_models.mlp(tmp_path / "m.onnx", n_in=4, n_hidden=8, n_out=3)
    state = tmp_path / "state"

    async def go() -> None:
        first = TableMeasurer(FakeClock(), FASTER)
        async with Agent(state, model, first) as agent:
            await _settled(agent.owner)
            # threads 0 (the default), 1 and 2; then 3 pairs confirming the winner
            assert len(first.measured) == 3 + 6
            mv = agent.manager.get("m")
            assert mv.source.tuned == TUNED and mv.plan.threads == 1
            tuning = agent.owner.describe("m")["tuning"]
            assert tuning["state"] == "done" and tuning["margin"] == 2.0
            assert tuning["config"]["threads"] == 1
        assert (state / "tuning" / "m.json").is_file()

        again = TableMeasurer(FakeClock(), {})
        async with Agent(state, model, again) as agent:  # a restart
            await _settled(agent.owner)
            assert again.measured == []  # nothing measured: the stored result serves at once
            assert agent.manager.get("m").source.tuned == TUNED

        other_box = TableMeasurer(FakeClock(), {})
        async with Agent(state, model, other_box,
                         box={**BOX, "cpu_flags": ["avx512f"]}) as agent:
            await _settled(agent.owner)
            assert len(other_box.measured) == 3  # tuned again; all equal: the default stays
            assert agent.manager.get("m").source.tuned == ""
            assert agent.owner.describe("m")["tuning"]["margin"] == 1.0

    asyncio.run(go())


def test_the_agent_answers_correctly_while_tuning(tmp_path: Path) -> None:
    model = onnx_models.mlp(tmp_path / "m.onnx", n_in=4, n_hidden=8, n_out=3)
    expected = ort.InferenceSession(str(model)).run(["logits"], {"input": SAMPLE})[0]
    started, release = threading.Event(), threading.Event()

    def hold(candidate: Candidate) -> None:
        started.set()
        assert release.wait(30)

    async def go() -> None:
        measurer = TableMeasurer(FakeClock(), FASTER, hook=hold)
        async with Agent(tmp_path / "state", model, measurer) as agent:
            assert await asyncio.to_thread(started.wait, 30)  # tuning is measuring now
            assert agent.owner.describe("m")["tuning"]["state"] == "running"
            for _ in range(20):
                _, out = await agent.manager.infer("m", {"input": SAMPLE})
                np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)
            release.set()
            await _settled(agent.owner)
            _, out = await agent.manager.infer("m", {"input": SAMPLE})  # the tuned one
            assert agent.manager.get("m").source.tuned == TUNED
            np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)

    asyncio.run(go())


def test_on_demand_and_refusals(tmp_path: Path) -> None:
    model = onnx_models.mlp(tmp_path / "m.onnx", n_in=4, n_hidden=8, n_out=3)

    async def go() -> None:
        measurer = TableMeasurer(FakeClock(), FASTER)
        agent = Agent(tmp_path / "state", model, measurer)
        agent.section = ModelSection(name="m", path=str(model))  # tune off: only on demand
        async with agent:
            await _settled(agent.owner)
            assert measurer.measured == []
            seen: list[int] = []
            result = await agent.owner.tune("m", lambda done, total, row: seen.append(done))
            assert seen == [1, 2, 3]
            assert result.confirm == [2.0, 2.0, 2.0]
            assert result.chosen is not None and result.chosen.threads == 1
            assert agent.manager.get("m").source.tuned == TUNED
            with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
                await agent.owner.tune("nope")

    asyncio.run(go())


def test_hub_bundle_with_a_fast_variant_that_fails_its_checks(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    good = onnx_models.mlp(tmp_path / "m.onnx", n_in=4, n_hidden=8, n_out=3, seed=1)
    bad = onnx_models.mlp(tmp_path / "m-fast.onnx", n_in=4, n_hidden=8, n_out=3, seed=2)
    samples = tmp_path / "samples.npz"
    np.savez(samples, input=HUB_SAMPLE)
    publish(hub.dir, hub.keys_dir, "m", 1, [str(good), f"{bad}:int8"], checks=samples)
    table = {("m-fast.onnx", t): Figures(0.5, 0.6, 5000.0, 0.01) for t in (0, 1, 2)}

    async def go() -> None:
        rig = Rig(tmp_path / "state", server.url, hub)
        measurer = TableMeasurer(FakeClock(), table)
        rig.owner.tuning = service(tmp_path / "state", measurer, measurer.clock)
        rig.sections = (ModelSection(name="m", version="latest", tune=TuneSection()),)
        try:
            await rig.sync_once()
            await _settled(rig.owner)
            assert {c.variant for c in measurer.measured} == {"m.onnx"}
            result = rig.owner.tuning.results["m"]
            assert result.chosen is not None and result.chosen.variant == "m.onnx"
            failed = [r for r in result.rows if r.candidate.variant == "m-fast.onnx"]
            assert len(failed) == 3 and all(r.outcome == "failed checks" for r in failed)
            assert rig.manager.get("m").source.path.name == "m.onnx"
        finally:
            await rig.close()

    asyncio.run(go())


def test_a_tuned_batch_size_is_what_the_serving_configuration_was_measured_at(
        tmp_path: Path) -> None:
    model = onnx_models.mlp(tmp_path / "m.onnx", n_in=4, n_hidden=8, n_out=3)

    async def go() -> None:
        table = {("m.onnx", 1, 4): Figures(5.0, 6.0, 400.0, 0.01)}
        measurer = TableMeasurer(FakeClock(), table)
        agent = Agent(tmp_path / "state", model, measurer)
        agent.section = ModelSection(name="m", path=str(model), max_batch_size=8,
                                     tune=TuneSection(threads=(1,), batch_sizes=(4, 8)))
        async with agent:
            await _settled(agent.owner)
            # The profile's thread count (0) is always among those tried.
            assert {(c.threads, c.batch) for c in measurer.measured} == {(0, 4), (0, 8),
                                                                          (1, 4), (1, 8)}
            assert agent.manager.get("m").source.tuned == "m.onnx|CPUExecutionProvider|t1|b4"
            assert agent.owner.tuned_batch("m") == 4

    asyncio.run(go())
