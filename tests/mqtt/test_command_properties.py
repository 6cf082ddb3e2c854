"""Property-based: any MQTT command payload gets exactly one answer (a result or a refusal),
directly and end to end over a real Mosquitto, and the agent answers a valid command correctly
afterwards. ``EDGEAGENT_PROPERTY_EXAMPLES`` sets the examples (60 by default)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeagent.control.commands import CommandHandler
from tests.mqtt.conftest import Broker
from tests.mqtt.device import Device, make_catalog
from tests.mqtt.test_link import PREFIX, run, send, until

EXAMPLES = int(os.environ.get("EDGEAGENT_PROPERTY_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

leaf = (st.none() | st.booleans() | st.integers(-(2 ** 80), 2 ** 80) | st.floats()
        | st.text(max_size=12))
value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
actions = st.sampled_from(["ping", "sync", "rollback", "reload-config"]) | value
documents = st.fixed_dictionaries({"action": actions},
                                  optional={"model": st.sampled_from(["mlp"]) | value,
                                            "extra": value})


def _encode(doc: Any, how: int, depth: int) -> bytes:
    raw = json.dumps(doc).encode()  # NaN and Infinity literals included
    if how == 1:
        return b'{"action": "ping", "x": ' + b"[" * depth + b"]" * depth + b"}"
    if how == 2:
        return b'{"action": "ping", "n": ' + b"7" * depth + b"}"
    if how == 3:
        return raw[: len(raw) // 2]
    return raw


payloads = st.one_of(
    st.builds(_encode, documents | value, st.integers(0, 3), st.integers(1, 6000)),
    st.binary(max_size=200))


def _actions() -> dict[str, Any]:
    async def ok(doc: Any) -> dict[str, Any]:
        return {"done": True}
    return {"ping": ok, "sync": ok, "rollback": ok, "reload-config": ok}


@SETTINGS
@given(rid=st.text(max_size=12) | st.sampled_from(["a", "b-1", "c.2"]), payload=payloads)
def test_every_payload_gets_one_answer(rid: str, payload: bytes) -> None:
    async def go(folder: Path) -> Any:
        handler = CommandHandler(_actions(), folder / "commands.json")
        first = await handler.handle(rid, payload)
        again = await handler.handle(rid, payload)
        return first, again

    with tempfile.TemporaryDirectory() as folder:
        first, again = asyncio.run(go(Path(folder)))
    assert first is not None and isinstance(first["ok"], bool) and first["request_id"] == rid
    assert first["ok"] or first["error"]
    json.dumps(first)  # sendable
    # A request id that was accepted is never answered twice.
    assert again is None or not first["ok"]


_RUNS: list[int] = []


@settings(SETTINGS, max_examples=max(2, EXAMPLES // 20))
@given(batch=st.lists(payloads, min_size=10, max_size=30))
def test_over_mqtt_every_command_is_answered(tmp_path_factory: Any, broker: Broker, watch: Any,
                                             batch: list[bytes]) -> None:
    tmp = tmp_path_factory.mktemp("cmdprop")
    w = watch(broker.port, [f"{PREFIX}/dev1/cmd/+/result"])
    dev = Device(tmp / "state", make_catalog(tmp / "models"), url=broker.url)
    _RUNS.append(1)  # request ids unique across examples (one watcher sees them all)
    rids = [f"h{len(_RUNS)}-{i}" for i in range(len(batch))]

    async def go() -> None:
        await dev.start()
        await until(lambda: dev.link.client.connected, "connected")  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        for rid, payload in zip(rids, batch, strict=True):
            send(broker, f"{PREFIX}/dev1/cmd/{rid}", payload)
        for rid in rids:
            await until(lambda rid=rid: w.payloads(f"/cmd/{rid}/result"), f"result of {rid}")
        send(broker, f"{PREFIX}/dev1/cmd/valid-{rids[0]}", {"action": "ping"})
        got = await until(lambda: w.payloads(f"/cmd/valid-{rids[0]}/result"), "valid result")
        assert got[0]["ok"] and got[0]["result"]["pong"]
        await dev.stop()

    try:
        run(go())
    finally:
        w.close()
    for rid in rids:
        assert len(w.payloads(f"/cmd/{rid}/result")) == 1, rid
