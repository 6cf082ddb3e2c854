"""The controller's API and inventory from outside: token, bad requests, pins, filters,
pagination, telemetry windows, stale expiry, malformed device messages."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.fleet.conftest import ROOT, Controller, until


def test_the_token_is_required(mosquitto: Any, controllers: Any) -> None:
    c: Controller = controllers(mosquitto).start()
    assert httpx.get(f"{c.url}/v1/fleet/health").status_code == 200  # health needs none
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"},
                    {"Authorization": c.token}):
        r = httpx.get(f"{c.url}/v1/fleet/status", headers=headers)
        assert r.status_code == 401
        assert "missing or wrong token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{c.url}/v1/fleet/rollouts", json={"model": "mlp", "version": 2,
                                                       "fleet": True})
    assert r.status_code == 401
    assert c.get("/v1/fleet/rollouts")["rollouts"] == []  # nothing was started
    wrong = c.dir / "wrong-token"
    wrong.write_text("wrong-token-wrong-token\n")
    code, out = c.cli("status", "--token-file", str(wrong))
    assert code == 1 and "missing or wrong token" in out and "(HTTP 401)" in out


def test_a_public_listen_needs_a_token_file(tmp_path: Path, mosquitto: Any) -> None:
    conf = tmp_path / "fleet.toml"
    conf.write_text(f'[broker]\nurl = "{mosquitto.url}"\n[api]\nlisten = "0.0.0.0:18090"\n'
                    f'[database]\nstate_dir = "{tmp_path}"\n')
    proc = subprocess.run([sys.executable, "-m", "edgeagent", "fleet", "serve", "--config",
                           str(conf)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          check=False)
    assert proc.returncode == 2
    assert "api.listen: 0.0.0.0:18090 is reachable from other hosts; set api.token_file" \
        in proc.stderr
    assert not (tmp_path / "fleet.db").exists()


def test_bad_configuration_is_refused_with_the_key(tmp_path: Path) -> None:
    cases = {'[api]\nlisten = "nowhere"\n': "api.listen: expected HOST:PORT",
             '[rollouts]\nwaves = "50%,10%"\n': "rollouts.waves: expected increasing",
             '[broker]\nurl = "http://x"\n': "broker.url: expected mqtt://",
             '[bogus]\n': "unknown section 'bogus'",
             '[inventory]\nstale_s = 3\n': "inventory: unknown key 'stale_s'",
             '[broker]\ncatchup_batch = 5000\n': "broker.catchup_batch: expected 1 to 450"}
    for text, error in cases.items():
        conf = tmp_path / "fleet.toml"
        conf.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "edgeagent", "fleet", "serve", "--config",
                               str(conf)], capture_output=True, text=True, timeout=60,
                              cwd=ROOT, check=False)
        assert proc.returncode == 2, (text, proc.stderr)
        assert error in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_no_controller_is_a_clear_error(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x" * 32)
    proc = subprocess.run([sys.executable, "-m", "edgeagent", "fleet", "status", "--url",
                           "http://127.0.0.1:9", "--token-file", str(token)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 1
    assert "cannot reach the fleet controller at http://127.0.0.1:9" in proc.stderr


def test_bad_requests_change_nothing(mosquitto: Any, controllers: Any, sims: Any) -> None:
    c = controllers(mosquitto).start()
    sims(mosquitto, 5)
    until(lambda: c.inventory() == 5, "5 devices")
    bad = [({"model": "mlp", "version": 0, "fleet": True}, 400, "version: expected an integer"),
           ({"model": "mlp", "version": 2}, 400, "give exactly one of 'group'"),
           ({"model": "mlp", "version": 2, "group": "nope"}, 400, "no devices in group:nope"),
           ({"model": "m/x", "version": 2, "fleet": True}, 400, "model: expected a model name"),
           ({"model": "mlp", "version": 2, "fleet": True, "waves": "10%,5%"}, 400,
            "waves: expected increasing"),
           ({"model": "mlp", "version": 2, "fleet": True, "max_failures": "120%"}, 400,
            "max_failures: expected a percentage from 0% to 100%"),
           ({"model": "mlp", "version": 2, "fleet": True, "colour": "red"}, 400,
            "unknown field 'colour'")]
    for body, status, error in bad:
        got, reply = c.api("POST", "/v1/fleet/rollouts", body)
        assert got == status and error in reply["error"], (body, reply)
    r = httpx.post(f"{c.url}/v1/fleet/rollouts", content=b"{not json",
                   headers={"Authorization": f"Bearer {c.token}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{c.url}/v1/fleet/rollouts", content=b"x" * 70_000,
                   headers={"Authorization": f"Bearer {c.token}"})
    assert r.status_code == 413
    assert c.api("GET", "/v1/fleet/rollouts/r-nope")[0] == 404
    assert c.api("POST", "/v1/fleet/rollouts/r-nope/pause")[0] == 404
    assert c.api("GET", "/v1/fleet/devices?limit=0")[0] == 400
    assert c.api("GET", "/v1/fleet/devices?state=sleepy")[0] == 400
    assert c.api("GET", "/v1/fleet/devices/ghost")[0] == 404
    status, reply = c.api("POST", "/v1/fleet/rollbacks", {"model": "mlp", "fleet": True})
    assert status == 404 and "no rollout of mlp on fleet" in reply["error"]
    assert c.get("/v1/fleet/rollouts")["rollouts"] == []
    # A second rollout of the same model and target while one runs: refused.
    status, first = c.api("POST", "/v1/fleet/rollouts", {"model": "mlp", "version": 2,
                                                         "fleet": True, "waves": "100%"})
    assert status == 201
    c.api("POST", f"/v1/fleet/rollouts/{first['rollout_id']}/pause")
    status, reply = c.api("POST", "/v1/fleet/rollouts", {"model": "mlp", "version": 3,
                                                         "fleet": True})
    assert status == 409 and "abort it or let it finish first" in reply["error"]


def test_malformed_device_messages_are_counted_and_dropped(mosquitto: Any,
                                                           controllers: Any) -> None:
    c = controllers(mosquitto).start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    for topic, payload in [("edgeagent/d1/status", b"{not json"),
                           ("edgeagent/d1/status", b'{"state": "asleep", "ts": 1}'),
                           ("edgeagent/d1/reported", b"[1, 2]"),
                           ("edgeagent/d1/telemetry", b'{"ts": 1, "seq": "x"}'),
                           ("edgeagent/d1/reported", b"x" * 300_000),
                           ("edgeagent/d2/status", b'{"state": "online", "ts": 1}')]:
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    until(lambda: c.get("/v1/fleet/status")["ingest"]["processed"] >= 6, "6 messages")
    ingest = c.get("/v1/fleet/status")["ingest"]
    assert ingest["dropped"] == {"not JSON": 1, "bad status": 1, "not a JSON object": 1,
                                 "bad telemetry": 1, "too large": 1}
    devices = c.get("/v1/fleet/devices")["devices"]
    assert [d["device_id"] for d in devices] == ["d1", "d2"] or \
        [d["device_id"] for d in devices] == ["d2"]
    assert c.get("/v1/fleet/devices/d2")["state"] == "online"
    pub.loop_stop()
    pub.disconnect()


def test_inventory_filters_pages_telemetry_and_pins(mosquitto: Any, controllers: Any,
                                                    sims: Any) -> None:
    c = controllers(mosquitto).start()
    sim = sims(mosquitto, 12, groups=3, activation_s=0.1, telemetry_interval_s=0.5)
    until(lambda: c.inventory() == 12, "12 devices")
    groups = c.get("/v1/fleet/groups")["groups"]
    assert groups == {"g0": 4, "g1": 4, "g2": 4}
    page = c.get("/v1/fleet/devices?group=g1&limit=3")
    assert len(page["devices"]) == 3 and page["next"] == page["devices"][-1]["device_id"]
    rest = c.get(f"/v1/fleet/devices?group=g1&limit=3&after={page['next']}")
    assert len(rest["devices"]) == 1 and rest["next"] is None
    ids = [d["device_id"] for d in page["devices"] + rest["devices"]]
    assert ids == sorted(ids) and all(int(i[4:]) % 3 == 1 for i in ids)
    until(lambda: len(c.get("/v1/fleet/devices/sim-000001/telemetry")["points"]) >= 2,
          "telemetry points")
    points = c.get("/v1/fleet/devices/sim-000001/telemetry")["points"]
    assert points[0]["seq"] < points[-1]["seq"]
    assert points[-1]["system"]["cpu_percent"] == 12.5
    assert points[-1]["models"]["mlp"]["latency_ms"]["p99"] == 3.0
    # A pin: the device document, then the device reports the pin as its source.
    code, out = c.cli("pin", "sim-000004", "mlp@3", "--json")
    assert code == 0, out
    assert json.loads(out)["revision"] == 1
    until(lambda: c.get("/v1/fleet/devices?version=3")["devices"], "the pinned version")
    row = c.get("/v1/fleet/devices?version=3")["devices"]
    assert [d["device_id"] for d in row] == ["sim-000004"]
    assert row[0]["models"]["mlp"]["source"] == "device pin, revision 1"
    assert c.get("/v1/fleet/devices/sim-000004")["pins"] == {"mlp": {"version": 3}}
    # A group rollout counts the pinned device apart (held), and does not wait on it.
    status, r = c.api("POST", "/v1/fleet/rollouts", {"model": "mlp", "version": 2,
                                                     "group": "g1", "waves": "100%"})
    assert status == 201
    code, out = c.cli("rollout", "show", r["rollout_id"], "--wait", "--json")
    final = json.loads(out)
    assert final["counts"]["held"] == 1 and final["counts"]["applied"] == 3, final
    assert "1 held by a more specific document" in final["summary"]
    assert code == 0, out  # held devices are not failures
    code, out = c.cli("unpin", "sim-000004", "mlp")
    assert code == 0 and "revision 2" in out
    until(lambda: sim.versions()["sim-000004"] == 2, "the group rollout taking over")
    code, out = c.cli("unpin", "sim-000004", "mlp")
    assert code == 1 and "has no pin of mlp (HTTP 404)" in out
    code, out = c.cli("devices", "--group", "g1", "--version", "2")
    assert code == 0 and out.count("sim-") == 4 and "group-rollout" not in out
    code, out = c.cli("status")
    assert code == 0 and "devices: 12 (12 online" in out and "g1 (4)" in out


def test_stale_devices_leave_the_view(mosquitto: Any, controllers: Any, sims: Any) -> None:
    c = controllers(mosquitto, inventory={"offline_after_s": 1.0, "stale_after_s": 2.0}).start()
    sim = sims(mosquitto, 3)
    until(lambda: c.inventory() == 3, "3 devices")
    sim.call(lambda: sim.sim.drop(["sim-000000"]))
    time.sleep(1.5)
    # The others re-announce (their periodic reported) and stay; the dropped one expires.
    for d in ("sim-000001", "sim-000002"):
        sim.call(lambda d=d: sim.sim.conns[d].report(force=True))
    until(lambda: c.inventory() == 2, "the dropped device to expire", timeout=30)
    assert c.api("GET", "/v1/fleet/devices/sim-000000")[0] == 404
