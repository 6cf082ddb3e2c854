"""Two controller replicas on one PostgreSQL behind one broker: both keep the inventory
(the shared subscription splits the messages between them), one leads each rollout, and when
it dies the other takes the rollout over where it was."""

from __future__ import annotations

import json
import signal
from typing import Any

from tests.fleet.conftest import Controller, until


def test_two_replicas_share_the_work(mosquitto: Any, controllers: Any, sims: Any,
                                     postgres_url: str) -> None:
    a: Controller = controllers(mosquitto, "a", database=postgres_url).start()
    b: Controller = controllers(mosquitto, "b", database=postgres_url).start()
    sim = sims(mosquitto, 30, activation_s=1.0)
    until(lambda: a.inventory() == 30 and b.inventory() == 30, "30 devices seen by both")
    received = [c.get("/v1/fleet/status")["ingest"]["processed"] for c in (a, b)]
    assert all(n > 0 for n in received), received  # both replicas took their share
    status, r = a.api("POST", "/v1/fleet/rollouts", {"model": "mlp", "version": 2,
                                                     "group": "sim",
                                                     "waves": "10%,50%,100%",
                                                     "min_devices": 3})
    assert status == 201, r
    rid = r["rollout_id"]

    def leaders() -> list[Controller]:
        return [c for c in (a, b) if rid in c.get("/v1/fleet/status")["controller"]["leading"]]

    until(lambda: len(leaders()) == 1, "one leader")
    leader = leaders()[0]
    other = b if leader is a else a
    until(lambda: other.get(f"/v1/fleet/rollouts/{rid}")["wave"] >= 2, "wave 2")
    assert len(leaders()) == 1  # never both
    leader.stop(signal.SIGKILL)
    code, out = other.cli("rollout", "show", rid, "--wait", "--json")
    assert code == 0, out
    final = json.loads(out)
    assert rid in other.get("/v1/fleet/status")["controller"]["leading"] or \
        final["phase"] == "done"
    assert final["counts"]["applied"] == 30 and final["running_version"] == 30
    assert all(d.history == [("mlp", 2)] for d in sim.sim.devices)  # nothing applied twice
    assert final["publishes"] == 4
