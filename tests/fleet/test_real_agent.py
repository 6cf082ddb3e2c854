"""The controller against a real agent (``edgeagent run`` with a hub and a broker): the
inventory from what the agent reports, and a device pin through the agent's device document.
(Rollout documents on the agent side come with the version-ownership work; the simulator is
checked against the agent there.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeconvert.hub import Hub

from tests.fleet.conftest import Controller, until
from tests.hub.helpers import release
from tests.hub.hubserver import HubServer
from tests.mqtt.agentproc import start_agent


def test_inventory_and_pin_with_a_real_agent(tmp_path: Path, mosquitto: Any,
                                             controllers: Any) -> None:
    c: Controller = controllers(mosquitto).start()
    hub = Hub(tmp_path / "hub", tmp_path / "keys")
    hub.init()
    server = HubServer(hub.dir)
    release(hub, tmp_path / "work", 1)
    release(hub, tmp_path / "work", 2)
    proc = None
    try:
        proc, _port = start_agent(
            tmp_path / "agent", "hd1", mosquitto.url, mqtt="telemetry_interval_s = 0.5",
            hub=f'url = "{server.url}"\nroot = "{hub.meta_dir / "1.root.json"}"\n'
                "poll_interval_s = 3600\n",
            models='[[models]]\nname = "m"\nversion = 1\n', tags=("lab",))

        def model() -> dict[str, Any]:
            rows = c.get("/v1/fleet/devices")["devices"]
            return rows[0]["models"].get("m", {}) if rows else {}

        until(lambda: model().get("version") == 1, "the agent's version 1 in the inventory")
        device = c.get("/v1/fleet/devices/hd1")
        assert device["state"] == "online"
        assert c.get("/v1/fleet/groups")["groups"] == {"lab": 1}
        until(lambda: c.get("/v1/fleet/devices/hd1/telemetry")["points"], "telemetry")
        code, out = c.cli("pin", "hd1", "m@2")
        assert code == 0, out
        until(lambda: model().get("version") == 2, "the pinned version 2 served")
        reported = c.get("/v1/fleet/devices/hd1")["reported"]
        assert reported["desired"]["state"] == "applied"
        # A version the hub does not have: the agent refuses the document, the controller
        # shows the error, version 2 keeps serving.
        code, out = c.cli("pin", "hd1", "m@9")
        assert code == 0, out
        until(lambda: "desired" in (c.get("/v1/fleet/devices")["devices"][0]["last_error"]),
              "the refusal in the inventory")
        assert model()["version"] == 2
        code, out = c.cli("devices", "--version", "2")
        assert "hd1" in out and "error: desired:" in out
    finally:
        if proc is not None:
            proc.kill()
        server.close()
