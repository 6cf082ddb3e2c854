"""The real agent SIGKILLed: the broker publishes its last will, and a full spool survives the
kill and is sent after the restart, in order, each seq once (after dedup), the loss counted."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.mqtt.agentproc import mqtt_status, start_agent
from tests.mqtt.conftest import wait_for
from tests.mqtt.test_link import check_seqs

PREFIX = "edgeagent"


def test_last_will_when_killed(tmp_path: Path, broker: Any, watch: Any) -> None:
    w = watch(broker.port, [f"{PREFIX}/kd1/status"])
    proc, _port = start_agent(tmp_path / "a", "kd1", broker.url)
    try:
        wait_for(lambda: (w.last("/status") or {}).get("state") == "online", what="online")
        proc.signal(signal.SIGKILL)
        proc.wait(30)
        # The socket closes without a DISCONNECT: the broker publishes the will at once.
        wait_for(lambda: (w.last("/status") or {}).get("state") == "offline", what="the will")
    finally:
        proc.kill()
    late = watch(broker.port, [f"{PREFIX}/kd1/status"], False)
    wait_for(lambda: late.messages, what="the retained status")
    _topic, payload, retained = late.messages[-1]
    assert retained and b'"offline"' in payload, late.messages


def test_killed_with_a_full_spool_sends_the_backlog_once_in_order(
        tmp_path: Path, broker_factory: Any, watch: Any) -> None:
    broker = broker_factory()
    broker.stop()  # down from the start: everything piles up in the spool
    bound = 20
    settings = f"telemetry_interval_s = 0.05\nspool_max_messages = {bound}\n"
    proc, port = start_agent(tmp_path / "a", "kd2", broker.url, mqtt=settings)
    try:
        full = wait_for(lambda: (s := mqtt_status(port)["spool"])["dropped"] > 5 and s,
                        what="the spool to overflow")
        assert full["depth"] <= bound
        proc.signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    broker.start()
    w = watch(broker.port, [f"{PREFIX}/kd2/telemetry"])
    wait_for(w.client.is_connected, what="the watcher")
    # A slow tick now, so the bound forces out nothing while the backlog is in flight.
    proc, port = start_agent(tmp_path / "a", "kd2", broker.url,
                             mqtt=settings.replace("0.05", "30"))
    try:
        wait_for(lambda: len(w.payloads("/telemetry")) >= bound, what="the backlog")
    finally:
        proc.signal(signal.SIGTERM)
        proc.wait(60)
    tele = w.payloads("/telemetry")
    seqs = [t["seq"] for t in tele]
    unique, _repeats = check_seqs(seqs)  # in order, no gap, each seq once after dedup
    # Never connected before the kill: everything older than the spool bound was forced out,
    # and the count the receiver reads last says exactly that (seq 1 .. the first one - 1).
    dropped = tele[-1]["spool"]["dropped"]
    assert dropped == unique[0] - 1 >= full["dropped"], (unique[:3], dropped)
    # The whole spool, as full as the bound allows, came through.
    assert len(unique) >= bound
