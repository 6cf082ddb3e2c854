"""The hub-backed flow end to end: a release published to a real loopback hub, ``edgeagent
fleet deploy`` over a real Mosquitto, the real agent (``[hub]`` + ``[mqtt]``) activating it."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from edgeconvert.hub import Hub

from tests.hub.helpers import release
from tests.hub.hubserver import HubServer
from tests.mqtt.agentproc import start_agent
from tests.mqtt.conftest import wait_for
from tests.mqtt.test_fleet import fleet

PREFIX = "edgeagent"


def test_hub_release_deployed_by_the_fleet(tmp_path: Path, broker: Any, watch: Any) -> None:
    hub = Hub(tmp_path / "hub", tmp_path / "keys")
    hub.init()
    server = HubServer(hub.dir)
    w = watch(broker.port, [f"{PREFIX}/hd1/reported"])

    def reported(what: str = "reported") -> dict[str, Any]:
        return wait_for(lambda: w.last("/reported"), what=what)  # type: ignore[no-any-return]

    def model() -> dict[str, Any]:
        return (w.last("/reported") or {}).get("models", {}).get("m", {})  # type: ignore[no-any-return]

    def desired() -> dict[str, Any]:
        return (w.last("/reported") or {}).get("desired", {})  # type: ignore[no-any-return]

    release(hub, tmp_path / "work", 1)
    proc = None
    try:
        proc, _port = start_agent(
            tmp_path / "agent", "hd1", broker.url, mqtt="telemetry_interval_s = 0.5",
            hub=f'url = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
                "poll_interval_s = 3600\n",
            models='[[models]]\nname = "m"\nversion = 1\n')
        reported()
        wait_for(lambda: model().get("version") == 1, what="version 1 served")
        release(hub, tmp_path / "work", 2)

        async def go() -> None:
            code, out = await fleet(broker, "deploy", "m@2", "--all")
            assert code == 0, out
            wait_for(lambda: model().get("version") == 2, what="version 2 reported")
            code, out = await fleet(broker, "status", "--json")
            assert code == 0, out
            rows = {r["device"]: r for r in json.loads(out)}
            assert rows["hd1"]["models"]["m"]["version"] == 2 and rows["hd1"]["online"]
            # A version the hub does not have: refused up front, nothing changes.
            code, out = await fleet(broker, "deploy", "m@9", "--all")
            assert code == 1, out
            assert "the hub has no version 9 of 'm' (it has: 1, 2)" in out, out
            assert model()["version"] == 2
            # A release whose checks fail on this box: activation fails, the deploy reverts.
            release(hub, tmp_path / "work", 3, wrong_checks=True)
            code, out = await fleet(broker, "deploy", "m@3", "--all", "--max-failures", "0%")
            assert code == 1 and "stopping and reverting" in out, out
            assert "check" in out
            wait_for(lambda: desired().get("models") == {"m": 2}
                     and desired()["state"] == "applied", what="the revert applied")
            assert model()["version"] == 2

        asyncio.run(go())
        # The fleet's version is pinned (HubSync.set_desired): a restart keeps serving v2
        # although the configuration says version 1.
        proc.signal(signal.SIGTERM)
        proc.wait(60)
        w.messages.clear()
        proc, _port = start_agent(
            tmp_path / "agent", "hd1", broker.url, mqtt="telemetry_interval_s = 0.5",
            hub=f'url = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
                "poll_interval_s = 3600\n",
            models='[[models]]\nname = "m"\nversion = 1\n')
        wait_for(lambda: model().get("version") == 2, what="version 2 after a restart")
    finally:
        if proc is not None:
            proc.kill()
        server.close()


def test_staged_hub_deploy_stops_at_the_first_wave(tmp_path: Path, broker: Any,
                                                   watch: Any) -> None:
    # Three real agents on one hub; a release that fails its checks on these boxes stops at
    # the first wave (one agent), which is reverted; the later waves never hear of it.
    hub = Hub(tmp_path / "hub", tmp_path / "keys")
    hub.init()
    server = HubServer(hub.dir)
    ids = ["hs0", "hs1", "hs2"]
    w = watch(broker.port, [f"{PREFIX}/{d}/reported" for d in ids]
              + [f"{PREFIX}/{d}/desired" for d in ids])

    def version(device: str) -> Any:
        doc = w.last(f"/{device}/reported") or {}
        return doc.get("models", {}).get("m", {}).get("version")

    def asked(device: str) -> list[Any]:
        """The versions of m the fleet set in the device's desired documents, in order."""
        return [d.get("models", {}).get("m", {}).get("version")
                for d in w.payloads(f"/{device}/desired")]

    release(hub, tmp_path / "work", 1)
    release(hub, tmp_path / "work", 2)
    procs = []
    try:
        for device in ids:
            proc, _port = start_agent(
                tmp_path / device, device, broker.url, mqtt="telemetry_interval_s = 0.5",
                hub=f'url = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
                    "poll_interval_s = 3600\n",
                models='[[models]]\nname = "m"\nversion = 2\n', tags=("lab",))
            procs.append(proc)
        for device in ids:
            wait_for(lambda d=device: version(d) == 2, what=f"{device} serves version 2")
        release(hub, tmp_path / "work", 3, wrong_checks=True)

        async def go() -> None:
            code, out = await fleet(broker, "deploy", "m@3", "--group", "lab",
                                    "--waves", "10%,100%", "--max-failures", "0%")
            assert code == 1, out
            assert "wave 1/2" in out and "stopping and reverting" in out, out
            assert "wave 2/2" not in out, out

        asyncio.run(go())
        wait_for(lambda: asked("hs0")[-2:] == [3, 2], what="hs0 told 3, then back to 2")
        wait_for(lambda: ((w.last("/hs0/reported") or {}).get("desired", {}).get("state")
                          == "applied"
                          and (w.last("/hs0/reported") or {})["desired"].get("models")
                          == {"m": 2}), what="hs0's revert applied")
        assert [version(d) for d in ids] == [2, 2, 2]
        for device in ("hs1", "hs2"):  # the second wave was never asked
            assert 3 not in asked(device), asked(device)
    finally:
        for proc in procs:
            proc.kill()
        server.close()
