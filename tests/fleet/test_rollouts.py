"""Staged rollouts end to end: a real controller process, a real Mosquitto, simulated devices."""

from __future__ import annotations

import json
import signal
from typing import Any

from edgeagent.control.rollout import bucket
from tests.fleet.conftest import Controller, SimThread, until


def start_rollout(c: Controller, version: int, **body: Any) -> dict[str, Any]:
    status, r = c.api("POST", "/v1/fleet/rollouts",
                      {"model": "mlp", "version": version, "group": "sim", **body})
    assert status == 201, r
    return r  # type: ignore[no-any-return]


def show(c: Controller, rollout_id: str) -> dict[str, Any]:
    return c.get(f"/v1/fleet/rollouts/{rollout_id}")  # type: ignore[no-any-return]


def test_waves_to_done_then_rollback(mosquitto: Any, controllers: Any, sims: Any) -> None:
    c = controllers(mosquitto).start()
    sim: SimThread = sims(mosquitto, 40, activation_s=0.2)
    until(lambda: c.inventory() == 40, "40 devices in the inventory")
    r = start_rollout(c, 2, waves="10%,50%,100%", min_devices=5)
    code, out = c.cli("rollout", "show", r["rollout_id"], "--wait", "--json")
    assert code == 0, out
    done = json.loads(out)
    assert done["phase"] == "done" and done["succeeded"], done["summary"]
    assert done["running_version"] == 40 and done["counts"]["applied"] == 40
    assert [w["result"] for w in done["waves"]] == ["complete"] * 3
    assert done["waves"][0]["counts"]["applied"] >= 5  # the minimum count raised the share
    assert done["publishes"] == 4  # one per wave and the final "done": O(1) per wave
    assert set(sim.versions().values()) == {2}
    assert all(d.history == [("mlp", 2)] for d in sim.sim.devices)
    # The inventory says what decided each model.
    rows = c.get("/v1/fleet/devices?version=2&model=mlp&limit=1000")["devices"]
    assert len(rows) == 40
    assert rows[0]["models"]["mlp"]["source_kind"] == "group-rollout"
    assert rows[0]["models"]["mlp"]["source"].startswith(f"rollout {r['rollout_id']} at 100")
    # Rollback: a rollout back to the version the last one replaced.
    code, out = c.cli("rollback", "mlp", "--group", "sim", "--wait")
    assert code == 0, out
    assert "done: 40 of 40 devices run v1" in out
    assert set(sim.versions().values()) == {1}


def test_operator_abort_reverts_the_devices_that_switched(mosquitto: Any, controllers: Any,
                                                          sims: Any) -> None:
    c = controllers(mosquitto).start()
    sim = sims(mosquitto, 20, activation_s=1.0)
    until(lambda: c.inventory() == 20, "20 devices")
    # Three waves of 0.5-1.5 s activations: the abort lands while it runs.
    r = start_rollout(c, 2, waves="30%,60%,100%", min_devices=1, wave_timeout_s=60)
    rid = r["rollout_id"]
    until(lambda: show(c, rid)["running_version"] >= 1, "a device on v2")
    code, out = c.cli("rollout", "abort", rid, "--wait")
    assert code == 1, out  # an aborted rollout did not succeed
    final = show(c, rid)
    assert final["phase"] == "aborted" and final["document"]["state"] == "aborted"
    assert final["running_version"] == 0
    switched = [d for d in sim.sim.devices if ("mlp", 2) in d.history]
    assert switched and final["counts"]["reverted"] == len(switched)
    assert set(sim.versions().values()) == {1}
    assert "aborted (aborted by the operator)" in final["summary"]
    code, out = c.cli("rollout", "abort", rid)
    assert code == 1 and "is aborted; cannot abort it (HTTP 409)" in out


def test_failures_abort_the_first_wave_early(mosquitto: Any, controllers: Any,
                                             sims: Any) -> None:
    c = controllers(mosquitto).start()
    sim = sims(mosquitto, 30, activation_s=0.2, failing=0.5)
    until(lambda: c.inventory() == 30, "30 devices")
    r = start_rollout(c, 2, waves="50%,100%", min_devices=1, max_failures="0%")
    rid = r["rollout_id"]
    code, out = c.cli("rollout", "show", rid, "--wait")
    assert code == 1, out
    final = show(c, rid)
    assert final["phase"] == "aborted", final["summary"]
    assert "passed the budget of 0" in final["reason"]
    wave1 = final["waves"][0]["share"] * 100
    assert len(final["waves"]) == 1  # wave 2 never started
    ran = [d for d in sim.sim.devices if ("mlp", 2) in d.history]
    assert all(bucket(rid, d.device_id) < wave1 for d in ran)  # only wave 1 ever ran it
    assert set(sim.versions().values()) == {1}  # and all of them went back
    assert final["counts"]["failed"] >= 1
    assert final["publishes"] == 2  # wave 1, then the abort


def test_offline_and_silent_devices(mosquitto: Any, controllers: Any, sims: Any) -> None:
    c = controllers(mosquitto, rollouts={"wave_timeout_s": 3.0}).start()
    sim = sims(mosquitto, 20, activation_s=0.1, silent=0.15)
    silent = {d for d, s in ((d.device_id, s) for d, s in sim.sim._specs) if s}
    assert silent
    talking = [d.device_id for d in sim.sim.devices if d.device_id not in silent]
    until(lambda: c.get("/v1/fleet/status")["inventory"]["devices"] == 20, "20 devices")
    gone = talking[:3]
    sim.call(lambda: sim.sim.drop(gone))
    until(lambda: c.get("/v1/fleet/status")["inventory"]["by_state"].get("offline") == 3,
          "3 devices offline (their last will)")
    # Fleet-wide: silent devices never said which groups they are in.
    status, r = c.api("POST", "/v1/fleet/rollouts", {"model": "mlp", "version": 2,
                                                     "fleet": True, "waves": "100%",
                                                     "max_failures": "30%"})
    assert status == 201, r
    code, out = c.cli("rollout", "show", r["rollout_id"], "--wait", "--json")
    final = json.loads(out)
    assert code == 1, out  # done, but not everywhere: not a success
    assert final["phase"] == "done"
    counts = final["counts"]
    assert counts["not_reached"] == 3
    assert counts["no_answer"] == len(silent)
    assert counts["applied"] == 20 - 3 - len(silent)
    assert final["summary"].startswith("done, incomplete")
    assert "3 not reached" in final["summary"]
    # The dropped devices come back and follow the retained document by themselves.
    v = sim.versions()
    assert all(v[d] == 1 for d in gone) and all(v[d] == 2 for d in talking[3:])


def test_controller_killed_mid_rollout_resumes(mosquitto: Any, controllers: Any,
                                               sims: Any) -> None:
    c = controllers(mosquitto).start()
    sim = sims(mosquitto, 30, activation_s=1.0)
    until(lambda: c.inventory() == 30, "30 devices")
    r = start_rollout(c, 2, waves="10%,50%,100%", min_devices=3)
    rid = r["rollout_id"]
    until(lambda: show(c, rid)["wave"] >= 2, "wave 2")
    c.stop(signal.SIGKILL)
    c.start()
    code, out = c.cli("rollout", "show", rid, "--wait", "--json")
    assert code == 0, out
    final = json.loads(out)
    assert final["counts"]["applied"] == 30 and final["running_version"] == 30
    assert all(d.history == [("mlp", 2)] for d in sim.sim.devices)  # nothing applied twice
    assert final["publishes"] == 4
    assert [w["result"] for w in final["waves"]] == ["complete"] * 3


def test_pause_holds_the_share_and_resume_carries_on(mosquitto: Any, controllers: Any,
                                                     sims: Any) -> None:
    c = controllers(mosquitto).start()
    sim = sims(mosquitto, 20, activation_s=1.0)
    until(lambda: c.inventory() == 20, "20 devices")
    r = start_rollout(c, 2, waves="30%,60%,100%", min_devices=1)
    rid = r["rollout_id"]
    until(lambda: show(c, rid)["publishes"] == 1, "wave 1 published")
    code, out = c.cli("rollout", "pause", rid, "--json")
    assert code == 0, out
    paused = json.loads(out)
    assert paused["phase"] == "paused"
    until(lambda: show(c, rid)["document"] == {"state": "paused", "share": paused["document"][
        "share"], "published": True}, "the paused document published")
    share = show(c, rid)["document"]["share"]
    until(lambda: show(c, rid)["counts"]["pending"] == 0, "wave 1 settled while paused")
    held = show(c, rid)
    assert held["phase"] == "paused" and held["wave"] == 1  # no advance while paused
    assert held["document"]["share"] == share
    in_share = sum(1 for d in sim.sim.devices if bucket(rid, d.device_id) < share * 100)
    assert held["running_version"] == in_share  # devices in the share stay on v2
    code, out = c.cli("rollout", "resume", rid, "--wait")
    assert code == 0, out
    final = show(c, rid)
    assert final["phase"] == "done" and final["running_version"] == 20
    # wave 1, pause, then wave 2 (its publish is the resume too: wave 1 was complete), 3, done
    assert final["publishes"] == 5
    assert set(sim.versions().values()) == {2}
