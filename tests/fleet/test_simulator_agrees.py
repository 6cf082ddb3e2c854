"""The device simulator (``benchmarks/fleetsim.SimDevice``) follows the device contract exactly:
fed the same fleet documents as a real agent's version owner (over a real loopback hub, real
onnxruntime sessions, a release that fails its checks), both decide the same version for the
same kind of reason, and report the same rollout bucket, share, base and outcome."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from edgeconvert.hub import Hub

from benchmarks.fleetsim import SimDevice
from edgeagent.control.rollout import RolloutDoc
from tests.hub.helpers import Rig, release
from tests.hub.hubserver import HubServer

PREFIX = "edgeagent"
GROUP = "lab"


def _desired(revision: int, version: int | None) -> bytes:
    if version is None:
        return b""
    return b'{"revision": %d, "models": {"m": {"version": %d}}}' % (revision, version)


STEPS: list[tuple[str, bytes]] = [
    (f"{PREFIX}/groups/{GROUP}/rollouts/m", RolloutDoc("r-a", "m", 2, 0.0, "running").payload()),
    (f"{PREFIX}/groups/{GROUP}/rollouts/m", RolloutDoc("r-a", "m", 2, 50.0, "running").payload()),
    (f"{PREFIX}/groups/{GROUP}/rollouts/m", RolloutDoc("r-a", "m", 2, 100.0, "paused").payload()),
    (f"{PREFIX}/groups/{GROUP}/rollouts/m", RolloutDoc("r-a", "m", 2, 100.0, "done").payload()),
    (f"{PREFIX}/fleet/rollouts/m", RolloutDoc("r-b", "m", 3, 100.0, "running").payload()),
    (f"{PREFIX}/groups/{GROUP}/rollouts/m", b""),  # the fleet's rollout decides now: v3 fails
    (f"{PREFIX}/{{id}}/desired", _desired(4, 1)),  # a device pin holds the fleet rollout
    (f"{PREFIX}/{{id}}/desired", _desired(5, None)),
    (f"{PREFIX}/groups/{GROUP}/desired", _desired(2, 2)),  # a group document beats the fleet
    (f"{PREFIX}/fleet/rollouts/m", RolloutDoc("r-b", "m", 3, 100.0, "aborted").payload()),
    (f"{PREFIX}/groups/{GROUP}/desired", b""),
]


def _agent_view(rig: Rig) -> dict[str, Any]:
    owner = rig.owner
    d = owner.describe("m")
    rollouts = {rid: {k: r[k] for k in ("bucket", "in_share", "base", "outcome", "version")}
                for rid, r in owner.rollouts().items()}
    return {"version": rig.served(), "kind": d["source_kind"], "rollouts": rollouts}


def _sim_view(sim: SimDevice) -> dict[str, Any]:
    doc = sim.reported(0.0)
    rollouts = {rid: {k: r[k] for k in ("bucket", "in_share", "base", "outcome", "version")}
                for rid, r in doc["rollouts"].items()}
    return {"version": doc["models"]["m"]["version"], "kind": doc["models"]["m"]["source_kind"],
            "rollouts": rollouts}


def test_the_simulator_decides_and_reports_as_the_agent(tmp_path: Path) -> None:
    hub = Hub(tmp_path / "hub", tmp_path / "keys")
    hub.init()
    server = HubServer(hub.dir)
    try:
        _compare(tmp_path, hub, server)
    finally:
        server.close()


def _compare(tmp_path: Path, hub: Hub, server: HubServer) -> None:
    release(hub, tmp_path, 1)
    release(hub, tmp_path, 2)
    release(hub, tmp_path, 3, wrong_checks=True)  # fails its checks on the box
    for device in ("sim-0", "sim-1", "sim-2", "sim-3"):  # inside and outside the 50 % share
        sim = SimDevice(device, [GROUP], {"m": 1}, fails=lambda _m, v: v == 3)

        async def go(device: str = device, sim: SimDevice = sim) -> None:
            rig = Rig(tmp_path / device, server.url, hub, version=1, keep_versions=3)
            rig.owner.device_id = device
            rig.owner.groups = (GROUP,)
            await rig.sync_once()
            assert _agent_view(rig) == _sim_view(sim)
            for i, (pattern, payload) in enumerate(STEPS):
                topic = pattern.replace("{id}", device)
                sim.receive(topic, payload)
                for model, version in sim.wanted().items():
                    sim.activate(model, version)
                rest = topic[len(PREFIX) + 1:]
                if rest.endswith("/desired"):
                    source = "device" if rest == f"{device}/desired" else f"group:{GROUP}"
                    await rig.owner.receive_desired(source, payload)
                else:
                    head, _, model = rest.rpartition("/rollouts/")
                    target = "fleet" if head == "fleet" else f"group:{GROUP}"
                    await rig.owner.receive_rollout(target, model, payload)
                await rig.owner.sync_once()
                assert _agent_view(rig) == _sim_view(sim), (device, i, topic)
            await rig.close()

        asyncio.run(go())
