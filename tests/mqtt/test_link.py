"""The agent's MQTT side end to end against a real Mosquitto: presence, telemetry, reported
state, desired state and commands, broker outages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import publish

from tests.mqtt.conftest import Broker
from tests.mqtt.device import Device, make_catalog

PREFIX = "edgeagent"


async def until(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll without blocking the loop; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def send(broker: Broker, topic: str, payload: Any, retain: bool = False) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    publish.single(topic, body, qos=1, retain=retain, hostname="127.0.0.1", port=broker.port)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def check_seqs(seqs: list[int]) -> tuple[list[int], int]:
    """Drop repeats (the receiver's dedup by seq); the rest must be in order and gap-free."""
    seen: list[int] = []
    for s in seqs:
        if seen and s <= seen[-1]:
            continue
        seen.append(s)
    assert seen == list(range(seen[0], seen[-1] + 1)), f"gaps or disorder: {seqs}"
    return seen, len(seqs) - len(seen)


def test_presence_telemetry_and_reported_state(tmp_path: Path, broker: Broker, watch: Any) -> None:
    w = watch(broker.port, [f"{PREFIX}/#"])
    dev = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url)

    async def go() -> None:
        await dev.start()
        await until(lambda: (w.last("/status") or {}).get("state") == "online", "online")
        await until(lambda: len(w.payloads("/telemetry")) >= 3, "telemetry")
        rep = await until(lambda: w.last("/reported"), "reported state")
        assert rep["models"]["mlp"]["version"] == 1
        assert rep["device_id"] == "dev1" and rep["desired"]["state"] == "none"
        await dev.stop()
        await until(lambda: (w.last("/status") or {}).get("state") == "stopped", "stopped")

    run(go())
    tele = w.payloads("/telemetry")
    assert [t["seq"] for t in tele] == list(range(1, len(tele) + 1))
    first = tele[0]
    assert first["device_id"] == "dev1" and "memory" in first["system"]
    assert first["models"]["mlp"]["version"] == 1
    assert first["models"]["mlp"]["provider"] == "CPUExecutionProvider"
    assert first["spool"]["dropped"] == 0
    status = w.last("/status")
    assert status is not None and status["version"] == "9.9.9"
    # Retained: a late subscriber still sees the presence and the reported state.
    late = watch(broker.port, [f"{PREFIX}/dev1/status", f"{PREFIX}/dev1/reported"], False)
    from tests.mqtt.conftest import wait_for
    wait_for(lambda: late.last("/status") and late.last("/reported"), what="retained topics")


def test_seq_survives_restart(tmp_path: Path, broker: Broker, watch: Any) -> None:
    w = watch(broker.port, [f"{PREFIX}/dev1/telemetry"])
    catalog = make_catalog(tmp_path / "models")

    async def go() -> None:
        for _ in range(2):
            dev = Device(tmp_path / "state", catalog, url=broker.url)
            await dev.start()
            have = len(w.payloads("/telemetry"))
            await until(lambda h=have: len(w.payloads("/telemetry")) >= h + 2, "telemetry")
            await dev.stop()

    run(go())
    seqs = [t["seq"] for t in w.payloads("/telemetry")]
    assert check_seqs(seqs) == (seqs, 0)


def test_broker_outage_loses_no_telemetry(tmp_path: Path, broker: Broker, watch: Any) -> None:
    w = watch(broker.port, [f"{PREFIX}/dev1/telemetry"])
    dev = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url)

    async def go() -> None:
        await dev.start()
        await until(lambda: len(w.payloads("/telemetry")) >= 3, "telemetry before the outage")
        broker.stop()  # SIGTERM: mosquitto saves the watcher's persistent session
        await until(lambda: not dev.link.client.connected, "the agent to notice")  # type: ignore[union-attr]
        await until(lambda: dev.link.spool.stats().depth >= 5, "telemetry to pile up")
        assert "not connected" not in dev.link.client.last_error  # type: ignore[union-attr]
        broker.start()
        await until(lambda: dev.link.spool.stats().depth == 0, "the spool to drain")
        last = dev.link.spool.stats().next_seq - 1
        await until(lambda: any(t["seq"] >= last for t in w.payloads("/telemetry")),
                    "the backlog at the receiver")
        await dev.stop()

    run(go())
    seqs = [t["seq"] for t in w.payloads("/telemetry")]
    unique, repeats = check_seqs(seqs)
    assert unique[0] == 1
    # A PUBACK lost when the broker went down makes one message go out twice at most.
    assert repeats <= 1, seqs


def test_desired_state_device_and_groups(tmp_path: Path, broker: Broker, watch: Any) -> None:
    w = watch(broker.port, [f"{PREFIX}/dev1/reported"])
    dev = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url,
                 tags=["lab", "eu"])

    def desired() -> dict[str, Any]:
        return (w.last("/reported") or {}).get("desired", {})

    async def go() -> None:
        await dev.start()
        await until(lambda: w.last("/reported"), "reported")
        send(broker, f"{PREFIX}/groups/eu/desired",
             {"revision": 1, "models": {"mlp": {"version": 2}}}, retain=True)
        await until(lambda: desired().get("revisions") == {"group:eu": 1}
                    and desired()["state"] == "applied", "group applied")
        assert dev.active_version("mlp") == 2
        send(broker, f"{PREFIX}/dev1/desired", {"revision": 5, "models": {"mlp": {"version": 1}}},
             retain=True)
        await until(lambda: desired().get("revisions", {}).get("device") == 5, "device applied")
        assert desired()["state"] == "applied" and desired()["models"] == {"mlp": 1}
        assert dev.active_version("mlp") == 1  # the device wins over the group
        # A version that fails its checks on this box: refused at activation, old one serves.
        send(broker, f"{PREFIX}/dev1/desired", {"revision": 6, "models": {"mlp": {"version": 3}}},
             retain=True)
        await until(lambda: desired().get("revisions", {}).get("device") == 6, "failed outcome")
        assert desired()["state"] == "failed" and "mlp version 3" in desired()["error"]
        assert dev.active_version("mlp") == 1
        assert (w.last("/reported") or {})["models"]["mlp"]["version"] == 1
        await dev.stop()

    run(go())

    # The documents (and so the outcome) survive a restart without the broker.
    async def restart() -> None:
        again = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url="",
                       tags=["lab", "eu"])
        await again.start()
        assert again.active_version("mlp") == 1
        assert again.owner.desired()["state"] == "failed"
        assert again.owner.describe("mlp")["source"] == "device pin, revision 6"
        await again.stop()

    run(restart())


def test_a_document_withdrawn_while_offline_is_dropped_on_reconnect(
        tmp_path: Path, broker: Broker, watch: Any) -> None:
    """The box keeps the fleet's documents across restarts; one the broker no longer holds
    after a connect (cleared while the box was away) is dropped, so no pin outlives its
    document."""
    w = watch(broker.port, [f"{PREFIX}/dev1/reported"])

    def source() -> str:
        return str((w.last("/reported") or {}).get("models", {}).get("mlp", {}).get("source"))

    async def go() -> None:
        dev = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url,
                     settle_s=0.5)
        await dev.start()
        send(broker, f"{PREFIX}/dev1/desired", {"revision": 1, "models": {"mlp": {"version": 2}}},
             retain=True)
        await until(lambda: dev.active_version("mlp") == 2, "pinned to 2")
        await dev.stop()
        send(broker, f"{PREFIX}/dev1/desired", b"", retain=True)  # cleared while away
        again = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url,
                       settle_s=0.5)
        await again.start()
        assert again.active_version("mlp") == 2, "the kept document holds until the broker says"
        await until(lambda: again.active_version("mlp") == 1 and source() == "config: file",
                    "dropped after the settle time")
        await again.stop()

    run(go())


def test_bad_desired_state_is_refused_and_changes_nothing(tmp_path: Path, broker: Broker,
                                                          watch: Any) -> None:
    w = watch(broker.port, [f"{PREFIX}/dev1/reported"])
    dev = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url)
    cases: list[tuple[bytes, str]] = [
        (b"{not json", "not valid JSON"),
        (json.dumps({"revision": 2, "models": {"ghost": {"version": 1}}}).encode(),
         "unknown model"),
        (json.dumps({"revision": 3, "models": {"mlp": {"version": 9}}}).encode(),
         "no local version 9"),
        (json.dumps({"revision": 4, "models": {"mlp": {"version": "2"}}}).encode(), "integer >= 1"),
        (json.dumps({"revision": 5, "models": {}, "extra": 1}).encode(), "unknown key"),
        (json.dumps({"revision": 6, "models": {"mlp": {"version": 2}},
                     "pad": "x" * 70_000}).encode(), "exceeds"),
        (b"[1, 2]", "expected a JSON object"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
        (b'{"revision": ' + b"9" * 5000 + b', "models": {}}', "not valid JSON"),
        (b'{"revision": 1, "models": {"mlp": {"version": ' + b"7" * 30 + b"}}}",
         "not valid JSON"),
    ]

    async def go() -> None:
        await dev.start()
        await until(lambda: w.last("/reported"), "reported")
        for i, (payload, why) in enumerate(cases):
            send(broker, f"{PREFIX}/dev1/desired", payload)
            await until(lambda why=why: why in (w.last("/reported") or {}).get(
                "desired", {}).get("error", ""), f"case {i}: {why}")
            d = (w.last("/reported") or {})["desired"]
            assert d["state"] == "refused"
            assert dev.active_version("mlp") == 1
        await dev.stop()

    run(go())


def test_commands(tmp_path: Path, broker: Broker, watch: Any) -> None:
    w = watch(broker.port, [f"{PREFIX}/dev1/cmd/+/result"])
    dev = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url)

    def result(rid: str) -> list[dict[str, Any]]:
        return [p for p in w.payloads(f"/cmd/{rid}/result")]

    async def ask(rid: str, payload: Any) -> dict[str, Any]:
        send(broker, f"{PREFIX}/dev1/cmd/{rid}", payload)
        return (await until(lambda: result(rid), f"result of {rid}"))[0]  # type: ignore[no-any-return]

    async def go() -> None:
        await dev.start()
        await until(lambda: dev.link.client.connected, "connected")  # type: ignore[union-attr]
        await asyncio.sleep(0.2)  # the SUBACK; the results below are waited for anyway
        r = await ask("p1", {"action": "ping"})
        assert r["ok"] and r["result"]["pong"] and r["request_id"] == "p1"
        r = await ask("rb1", {"action": "rollback", "model": "mlp"})
        assert not r["ok"] and "rollout back to the previous version" in r["error"]
        assert dev.active_version("mlp") == 1
        r = await ask("rl", {"action": "reload-config"})
        assert r["ok"] and dev.reloads == 1
        r = await ask("sy", {"action": "sync"})
        assert r["ok"]
        for rid, payload, why in [
            ("b1", b"{oops", "not valid JSON"),
            ("b2", {"action": "format-disk"}, "unknown action"),
            ("b4", b"x" * 20_000, "exceeds"),
        ]:
            r = await ask(rid, payload)
            assert not r["ok"] and why in r["error"], (rid, r)
        # A repeated request id is not executed again (and not answered again).
        send(broker, f"{PREFIX}/dev1/cmd/rl", {"action": "reload-config"})
        await ask("p2", {"action": "ping"})
        assert dev.reloads == 1 and len(result("rl")) == 1
        await dev.stop()
        # ... also after a restart.
        dev2 = Device(tmp_path / "state", make_catalog(tmp_path / "models2"), url=broker.url)
        await dev2.start()
        await until(lambda: dev2.link.client.connected, "connected")  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        send(broker, f"{PREFIX}/dev1/cmd/rl", {"action": "reload-config"})
        await ask("p3", {"action": "ping"})
        assert dev2.reloads == 0
        await dev2.stop()

    run(go())


@pytest.mark.parametrize("broker_kind", ["amqtt"], indirect=True)
def test_on_the_amqtt_fallback_broker(tmp_path: Path, broker: Broker, watch: Any) -> None:
    """The broker the tests fall back to without mosquitto (MQTT 3.1.1 only) carries presence,
    telemetry and reported state."""
    w = watch(broker.port, [f"{PREFIX}/dev1/#"], v311=True)
    dev = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url,
                 protocol="3.1.1")

    async def go() -> None:
        await dev.start()
        await until(lambda: (w.last("/status") or {}).get("state") == "online", "online")
        await until(lambda: len(w.payloads("/telemetry")) >= 2, "telemetry")
        await until(lambda: w.last("/reported"), "reported state")
        await dev.stop()
        await until(lambda: (w.last("/status") or {}).get("state") == "stopped", "stopped")

    run(go())
    assert check_seqs([t["seq"] for t in w.payloads("/telemetry")])[1] == 0
