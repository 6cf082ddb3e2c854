"""Fleet documents against the real agent (``[hub]`` + ``[mqtt]``) as a subprocess, a real
loopback hub and a real Mosquitto, with the documents written by the tests the way a fleet
controller writes them: device pins, group rollouts in waves, abort, precedence, and what the
device reports about each."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
from edgeconvert.hub import Hub

from edgeagent.cli import main as edgeagent_main
from edgeagent.control.rollout import RolloutDoc, bucket
from tests.hub.helpers import release
from tests.hub.hubserver import HubServer
from tests.mqtt.agentproc import start_agent
from tests.mqtt.conftest import Broker, wait_for
from tests.mqtt.test_link import send

PREFIX = "edgeagent"


def _hub_lines(server: HubServer, hub: Hub, poll: float = 3600) -> str:
    return (f'url = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
            f"poll_interval_s = {poll}\n")


class Reported:
    """What one device last reported, read from a watcher."""

    def __init__(self, w: Any, device: str) -> None:
        self.w, self.device = w, device

    def doc(self) -> dict[str, Any]:
        return self.w.last(f"/{self.device}/reported") or {}  # type: ignore[no-any-return]

    def model(self, name: str = "m") -> dict[str, Any]:
        return self.doc().get("models", {}).get(name, {})  # type: ignore[no-any-return]

    def version(self, name: str = "m") -> Any:
        return self.model(name).get("version")

    def desired(self) -> dict[str, Any]:
        return self.doc().get("desired", {})  # type: ignore[no-any-return]

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.doc().get("rollouts", {}).get(rollout_id, {})  # type: ignore[no-any-return]


def _doc(revision: int, version: int) -> dict[str, Any]:
    return {"revision": revision, "models": {"m": {"version": version}}}


def test_latest_box_under_fleet_control_ignores_new_releases(
        tmp_path: Path, broker: Broker, watch: Any) -> None:
    """Seam 3: a box on ``latest`` takes a new release by itself only while no fleet document
    names the model; a device pin holds it (and says so); an empty retained document clears the
    pin, and the box follows ``latest`` again. The pin survives a restart."""
    hub = Hub(tmp_path / "hub", tmp_path / "keys")
    hub.init()
    server = HubServer(hub.dir)
    w = watch(broker.port, [f"{PREFIX}/d1/reported"])
    r = Reported(w, "d1")
    release(hub, tmp_path / "work", 1)
    proc = None
    hub_lines = _hub_lines(server, hub, poll=0.3)
    models = '[[models]]\nname = "m"\nversion = "latest"\n'
    try:
        proc, port = start_agent(tmp_path / "agent", "d1", broker.url,
                                 mqtt="telemetry_interval_s = 0.5", hub=hub_lines, models=models)
        wait_for(lambda: r.version() == 1, what="v1")
        assert r.model()["source"] == "config: latest"
        release(hub, tmp_path / "work", 2)
        wait_for(lambda: r.version() == 2, what="latest followed without a fleet document")
        send(broker, f"{PREFIX}/d1/desired", _doc(7, 2), retain=True)
        wait_for(lambda: r.model().get("source") == "device pin, revision 7", what="pinned")
        release(hub, tmp_path / "work", 3)
        status = httpx.get(f"http://127.0.0.1:{port}/v1/agent/status", timeout=10).json()
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/agent/status", timeout=10)
                 .json()["hub"]["releases"].get("m") == [1, 2, 3], what="hub lists 3")
        assert r.version() == 2, "a model under fleet control does not take a release itself"
        assert status["models"][0]["fleet_control"] is True
        # Restart: the document is kept on the box; the pin holds before the broker answers.
        proc.signal(signal.SIGTERM)
        proc.wait(60)
        w.messages.clear()
        proc, port = start_agent(tmp_path / "agent", "d1", broker.url,
                                 mqtt="telemetry_interval_s = 0.5", hub=hub_lines, models=models)
        wait_for(lambda: r.version() == 2 and r.model().get("source") ==
                 "device pin, revision 7", what="v2 pinned after a restart")
        # The way back: an empty retained device document clears the pin.
        send(broker, f"{PREFIX}/d1/desired", b"", retain=True)
        wait_for(lambda: r.version() == 3 and r.model().get("source") == "config: latest",
                 what="following latest again")
    finally:
        if proc is not None:
            proc.kill()
        server.close()


def test_local_pull_overrides_the_fleet_and_says_so(tmp_path: Path, broker: Broker,
                                                    watch: Any) -> None:
    """Seam 4: after a local ``edgeagent pull m@3`` the reported state says version 3 serves,
    decided by the operator's pin, and the desired outcome says the operator overrides the
    device document; ``pull m`` hands the model back to the fleet."""
    hub = Hub(tmp_path / "hub", tmp_path / "keys")
    hub.init()
    server = HubServer(hub.dir)
    w = watch(broker.port, [f"{PREFIX}/d2/reported"])
    r = Reported(w, "d2")
    for version in (1, 2, 3):
        release(hub, tmp_path / "work", version)
    proc = None
    try:
        proc, _port = start_agent(tmp_path / "agent", "d2", broker.url,
                                  mqtt="telemetry_interval_s = 0.5",
                                  hub=_hub_lines(server, hub),
                                  models='[[models]]\nname = "m"\nversion = 1\n')
        wait_for(lambda: r.version() == 1, what="v1")
        send(broker, f"{PREFIX}/d2/desired", _doc(3, 2), retain=True)
        wait_for(lambda: r.version() == 2 and r.desired().get("state") == "applied",
                 what="device document applied")
        config = str(tmp_path / "agent" / "agent.toml")
        assert edgeagent_main(["pull", "m@3", "--config", config]) == 0
        wait_for(lambda: r.version() == 3, what="v3 reported")
        assert r.model()["source"] == "operator pin"
        assert r.desired()["overridden"] == {"m": "operator pin"}
        assert edgeagent_main(["pull", "m", "--config", config]) == 0
        wait_for(lambda: r.version() == 2 and r.model()["source"] == "device pin, revision 3",
                 what="back under the fleet's document")
        assert r.desired()["overridden"] == {}
    finally:
        if proc is not None:
            proc.kill()
        server.close()


def test_group_rollout_waves_abort_and_precedence(tmp_path: Path, broker: Broker,
                                                  watch: Any) -> None:
    """Three real agents follow one group rollout: outside the share they stay on their base
    (not on the hub's latest), inside it they switch, on abort they go back to their base; a
    device document holds its device (reported as held); a bad rollout document is refused in
    ``reported`` and changes nothing."""
    hub = Hub(tmp_path / "hub", tmp_path / "keys")
    hub.init()
    server = HubServer(hub.dir)
    ids = ["r0", "r1", "r2"]
    w = watch(broker.port, [f"{PREFIX}/{d}/reported" for d in ids])
    reps = {d: Reported(w, d) for d in ids}
    release(hub, tmp_path / "work", 1)
    release(hub, tmp_path / "work", 2)
    rid = "roll-a"
    # A share that takes exactly the device with the smallest bucket.
    buckets = {d: bucket(rid, d) for d in ids}
    first = min(ids, key=lambda d: buckets[d])
    rest = [d for d in ids if d != first]
    share_one = (buckets[first] + 1) / 100
    assert all(buckets[d] >= buckets[first] + 1 for d in rest)
    procs = []
    topic = f"{PREFIX}/groups/lab/rollouts/m"

    def publish(doc: RolloutDoc) -> None:
        send(broker, topic, doc.payload(), retain=True)

    try:
        for device in ids:
            proc, _port = start_agent(tmp_path / device, device, broker.url,
                                      mqtt="telemetry_interval_s = 0.5",
                                      hub=_hub_lines(server, hub, poll=0.3),
                                      models='[[models]]\nname = "m"\nversion = 1\n',
                                      tags=("lab",))
            procs.append(proc)
        for device in ids:
            wait_for(lambda d=device: reps[d].version() == 1, what=f"{device} on v1")
        # A device document is more specific than the group's rollout: r2 stays where it is.
        send(broker, f"{PREFIX}/r2/desired", _doc(1, 1), retain=True)
        wait_for(lambda: reps["r2"].desired().get("state") == "applied", what="r2 pinned")
        release(hub, tmp_path / "work", 3)
        publish(RolloutDoc(rid, "m", 3, 0.0, "running"))
        for device in ids:
            wait_for(lambda d=device: reps[d].rollout(rid).get("outcome") in ("base", "held"),
                     what=f"{device} sees the rollout")
        assert all(reps[d].version() == 1 for d in ids), "outside the share: the base"
        assert reps["r2"].rollout(rid)["outcome"] == "held"
        # Wave 1: only the first bucket.
        publish(RolloutDoc(rid, "m", 3, share_one, "running"))
        if first != "r2":
            wait_for(lambda: reps[first].version() == 3, what=f"{first} in wave 1")
            assert reps[first].rollout(rid)["outcome"] == "applied"
            assert reps[first].model()["source"] == f"rollout {rid} at {share_one:g} %"
        for device in rest:
            assert reps[device].version() == 1
        # Everyone.
        publish(RolloutDoc(rid, "m", 3, 100.0, "running"))
        for device in ("r0", "r1"):
            wait_for(lambda d=device: reps[d].version() == 3, what=f"{device} at 100 %")
        assert reps["r2"].version() == 1 and reps["r2"].rollout(rid)["outcome"] == "held"
        # A malformed document for the same topic is refused and changes nothing.
        send(broker, topic, b'{"rollout_id": "roll-a", "share": "lots"}', retain=False)
        wait_for(lambda: "rollout group:lab/m" in reps["r0"].doc().get("refused", {}),
                 what="refusal reported")
        assert reps["r0"].version() == 3
        # Abort: back to each device's base.
        publish(RolloutDoc(rid, "m", 3, 100.0, "aborted"))
        for device in ("r0", "r1"):
            wait_for(lambda d=device: reps[d].version() == 1
                     and reps[d].rollout(rid).get("outcome") == "reverted",
                     what=f"{device} reverted")
        for device in ids:
            base = reps[device].rollout(rid)
            assert (base["base"], base["bucket"]) == (1, buckets[device])
    finally:
        for proc in procs:
            proc.kill()
        server.close()


def test_failing_release_from_a_document_keeps_the_old_version(tmp_path: Path, broker: Broker,
                                                               watch: Any) -> None:
    """A version the hub lacks is refused whole; one whose checks fail here is reported failed
    while the old version serves, and is not tried again by itself."""
    hub = Hub(tmp_path / "hub", tmp_path / "keys")
    hub.init()
    server = HubServer(hub.dir)
    w = watch(broker.port, [f"{PREFIX}/d3/reported"])
    r = Reported(w, "d3")
    release(hub, tmp_path / "work", 1)
    release(hub, tmp_path / "work", 2, wrong_checks=True)
    proc = None
    try:
        proc, _port = start_agent(tmp_path / "agent", "d3", broker.url,
                                  mqtt="telemetry_interval_s = 0.5",
                                  hub=_hub_lines(server, hub),
                                  models='[[models]]\nname = "m"\nversion = 1\n')
        wait_for(lambda: r.version() == 1, what="v1")
        send(broker, f"{PREFIX}/d3/desired", _doc(1, 9), retain=True)
        wait_for(lambda: r.desired().get("state") == "refused", what="refused")
        assert "the hub has no version 9 of 'm' (it has: 1, 2)" in r.desired()["error"]
        send(broker, f"{PREFIX}/d3/desired", _doc(2, 2), retain=True)
        wait_for(lambda: r.desired().get("state") == "failed", what="failed")
        assert "check" in r.desired()["error"]
        assert r.version() == 1
        assert "failed here before" in r.model()["blocked"]
        assert json.dumps(r.desired()["revisions"]) == '{"device": 2}'
    finally:
        if proc is not None:
            proc.kill()
        server.close()
