"""A hub model's ``precision``/``variant``/``providers``/``threads`` overrides, end to end:
the variant fetched and served, a changed override (SIGHUP) served again, bad ones refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from edgeconvert.hub import Hub
from edgeconvert.publish import publish

from edgeagent.config import ModelSection
from tests import onnx_models
from tests.hub.helpers import Rig
from tests.hub.hubserver import HubServer


def two_variants(hub: Hub, work: Path) -> None:
    fp32 = onnx_models.mlp(work / "m.onnx", n_in=4, n_hidden=8, n_out=3, seed=1)
    int8 = onnx_models.mlp_int8(work / "m-int8.onnx", fp32)
    publish(hub.dir, hub.keys_dir, "m", 1, [str(fp32), str(int8)])


def test_precision_and_variant_overrides_pick_the_file(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    two_variants(hub, tmp_path)

    async def go() -> None:
        rig = Rig(tmp_path / "state", server.url, hub)
        rig.sections = (ModelSection(name="m", version="latest", precision="int8", threads=1,
                                     providers=("CPUExecutionProvider",)),)
        try:
            await rig.sync_once()
            mv = rig.manager.get("m")
            assert mv.source.path.name == "m-int8.onnx" and mv.precision == "int8"
            assert mv.source.overrides.threads == 1
            assert mv.source.overrides.providers == ("CPUExecutionProvider",)
            assert rig.owner.describe("m")["overrides"]["precision"] == "int8"
            # SIGHUP: the variant named instead; the same version is activated again.
            await rig.owner.configure([ModelSection(name="m", version="latest",
                                                    variant="m.onnx")])
            outcome = await rig.owner.converge("m")
            assert outcome.serving == 1 and not outcome.error
            mv = rig.manager.get("m")
            assert mv.source.path.name == "m.onnx" and mv.precision == "fp32"
            _, out = await rig.manager.infer("m", {"input": np.ones((1, 4), np.float32)})
            assert out["logits"].shape == (1, 3)
            # Both variants now sit in the version's folder; the store still reads back.
            assert {p.name for p in (rig.store.models / "m" / "1").glob("m*.onnx")} == \
                {"m.onnx", "m-int8.onnx"}
        finally:
            await rig.close()

    asyncio.run(go())


def test_a_variant_the_bundle_lacks_is_refused_and_nothing_serves_it(
        tmp_path: Path, hub: Hub, server: HubServer) -> None:
    two_variants(hub, tmp_path)

    async def go() -> None:
        rig = Rig(tmp_path / "state", server.url, hub)
        rig.sections = (ModelSection(name="m", version="latest", precision="fp16"),)
        try:
            await rig.sync_once()
            assert not rig.manager.ready("m")
            failed = rig.history().failed
            assert "no fp16 variant" in failed[1] and "m-int8.onnx (onnx/int8)" in failed[1]
        finally:
            await rig.close()

    asyncio.run(go())
