"""Hostile MQTT commands: every payload gets a result or a refusal (never a task exception
nobody retrieves), a request id is on disk before its command runs, the id log is written in
batches off the event loop, and a message paho cannot decode never reaches paho's thread."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from edgeagent.control.commands import CommandHandler, CommandLog
from edgeagent.errors import EdgeAgentError
from edgeagent.telemetry.mqtt import BrokerSettings, MqttClient
from tests.mqtt.conftest import Broker
from tests.mqtt.device import Device, make_catalog
from tests.mqtt.test_link import PREFIX, run, send, until

HOSTILE: list[tuple[str, bytes]] = [
    ("list-action", b'{"action": ["ping"]}'),
    ("dict-action", b'{"action": {"a": 1}}'),
    ("int-action", b'{"action": 7}'),
    ("null-action", b'{"action": null}'),
    ("deep", b'{"action": "ping", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("deep-object", b'{"a":' * 1500 + b"1" + b"}" * 1500),
    ("huge-int", b'{"action": "ping", "n": ' + b"9" * 5000 + b"}"),
    ("huge-int-action", b'{"action": ' + b"9" * 5000 + b"}"),
    ("nan", b'{"action": NaN}'),
    ("surrogate", b'{"action": "\\ud800"}'),
    ("not-utf8", b'{"action": "\xff\xfe"}'),
    ("model-list", b'{"action": "rollback", "model": ["mlp"]}'),
    ("model-huge-int", b'{"action": "rollback", "model": ' + b"9" * 300 + b"}"),
    ("empty", b""),
    ("array", b"[1, 2]"),
    ("string", b'"ping"'),
]


def _actions(ran: list[str], state_file: Path) -> dict[str, Any]:
    async def ping(doc: Any) -> dict[str, Any]:
        # What was stored before the command ran: its id must be there already.
        ran.append(json.loads(state_file.read_text())[-1])
        return {"pong": True}

    async def broken(doc: Any) -> dict[str, Any]:
        raise KeyError("a bug in an action")

    async def unanswerable(doc: Any) -> dict[str, Any]:
        return {"value": object()}

    async def rollback(doc: Any) -> dict[str, Any]:
        from edgeagent.control.commands import model_argument

        return {"model": model_argument(doc)}

    return {"ping": ping, "broken": broken, "unanswerable": unanswerable, "rollback": rollback}


@pytest.mark.parametrize(("rid", "payload"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_any_payload_gets_a_refusal(tmp_path: Path, rid: str, payload: bytes) -> None:
    async def go() -> dict[str, Any] | None:
        handler = CommandHandler(_actions([], tmp_path / "c.json"), tmp_path / "c.json")
        return await handler.handle(rid, payload)

    result = asyncio.run(go())
    assert result is not None and result["ok"] is False, result
    assert result["request_id"] == rid and result["error"]
    json.dumps(result)  # sendable as is


def test_a_bug_in_an_action_is_answered_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> list[dict[str, Any] | None]:
        handler = CommandHandler(_actions([], tmp_path / "c.json"), tmp_path / "c.json")
        return [await handler.handle("b1", b'{"action": "broken"}'),
                await handler.handle("b2", b'{"action": "unanswerable"}')]

    with caplog.at_level(logging.ERROR):
        results = asyncio.run(go())
    for result in results:
        assert result is not None and not result["ok"] and "internal error" in result["error"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all(r.exc_info for r in errors)


def test_the_id_is_stored_before_the_command_runs_and_writes_are_batched(
        tmp_path: Path) -> None:
    ran: list[str] = []
    state = tmp_path / "c.json"

    async def go() -> CommandHandler:
        handler = CommandHandler(_actions(ran, state), state)
        results = await asyncio.gather(*(handler.handle(f"r{i}", b'{"action": "ping"}')
                                         for i in range(300)))
        assert all(r is not None and r["ok"] for r in results)
        # A repeat, concurrent or later, is not run again.
        again = await asyncio.gather(handler.handle("r5", b'{"action": "ping"}'),
                                     handler.handle("r5", b'{"action": "ping"}'))
        assert again == [None, None]
        return handler

    handler = asyncio.run(go())
    assert len(ran) == 300
    stored = json.loads(state.read_text())
    assert set(stored) == {f"r{i}" for i in range(300)}
    assert handler.log.writes < 30, handler.log.writes  # batched: not one fsync per command
    # ... and remembered across a restart.
    assert "r299" in CommandLog(state)


def test_the_id_log_is_bounded_and_survives_junk(tmp_path: Path) -> None:
    state = tmp_path / "c.json"
    state.write_text('[1, "a", {"b": 2}, "c"]')
    log = CommandLog(state, keep=3)
    assert "a" in log and "c" in log

    async def go() -> None:
        for i in range(5):
            await log.record(f"n{i}")

    asyncio.run(go())
    assert json.loads(state.read_text()) == ["n2", "n3", "n4"]
    assert "a" not in log and "n1" not in log


def test_a_command_that_cannot_be_recorded_does_not_run(tmp_path: Path) -> None:
    ran: list[str] = []
    state = tmp_path / "c.json"
    state.mkdir()  # a directory: the write fails

    async def go() -> dict[str, Any] | None:
        return await CommandHandler(_actions(ran, state), state).handle(
            "x1", b'{"action": "ping"}')

    result = asyncio.run(go())
    assert result is not None and not result["ok"] and "not run" in result["error"]
    assert ran == []


def test_an_undecodable_topic_never_reaches_paho(caplog: pytest.LogCaptureFixture) -> None:
    client = MqttClient(BrokerSettings("127.0.0.1", 1))
    msg = paho.MQTTMessage(topic=b"edgeagent/dev1/cmd/\xff\xfe")
    msg.payload = b"{}"
    client._paho_message(None, None, msg)  # on paho's thread, this must not raise
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


# ---- end to end, against a real Mosquitto ------------------------------------------------


def test_hostile_commands_over_mqtt_all_get_an_answer(
        tmp_path: Path, broker: Broker, watch: Any, caplog: pytest.LogCaptureFixture) -> None:
    w = watch(broker.port, [f"{PREFIX}/dev1/cmd/+/result"])
    dev = Device(tmp_path / "state", make_catalog(tmp_path / "models"), url=broker.url)
    loop_errors: list[dict[str, Any]] = []

    async def go() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: loop_errors.append(ctx))
        await dev.start()
        await until(lambda: dev.link.client.connected, "connected")  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        for rid, payload in HOSTILE:
            send(broker, f"{PREFIX}/dev1/cmd/{rid}", payload)
        for rid, _ in HOSTILE:
            got = await until(lambda rid=rid: w.payloads(f"/cmd/{rid}/result"),
                              f"result of {rid}")
            assert got[0]["ok"] is False, got
        # Still answering a valid command, correctly.
        send(broker, f"{PREFIX}/dev1/cmd/after", {"action": "ping"})
        got = await until(lambda: w.payloads("/cmd/after/result"), "result of after")
        assert got[0]["ok"] and got[0]["result"]["pong"]
        await dev.stop()

    run(go())
    assert loop_errors == []
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_edgeagent_error_is_the_refusal_class() -> None:
    from edgeagent.control.commands import CommandError

    assert issubclass(CommandError, EdgeAgentError)


def test_a_flood_of_reported_requests_builds_few_and_publishes_the_last(
        tmp_path: Path, broker: Broker, watch: Any) -> None:
    from edgeagent.telemetry.reporter import Reporter
    from edgeagent.telemetry.spool import Spool
    from edgeagent.telemetry.topics import Topics

    topics = Topics(PREFIX, "dev9")
    w = watch(broker.port, [topics.reported])
    builds, counter = [0], [0]

    def reported() -> dict[str, Any]:
        builds[0] += 1
        return {"n": counter[0]}

    async def go() -> None:
        client = MqttClient(BrokerSettings("127.0.0.1", broker.port))
        spool = Spool(tmp_path / "spool.sqlite3", 100, 1 << 20)
        reporter = Reporter(client, spool, topics, interval_s=60, telemetry=dict,
                            reported=reported, version="t")
        await reporter.start()
        await client.start()
        await until(lambda: client.connected, "connected")
        for i in range(1, 1001):  # a command flood: each one asks for the reported state
            counter[0] = i
            await reporter.publish_reported()
        await until(lambda: (w.last("/reported") or {}).get("n") == 1000, "the last state")
        await reporter.stop()
        await client.stop()
        spool.close()

    run(go())
    assert builds[0] < 20, builds[0]  # not one build per request
