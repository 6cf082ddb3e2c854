"""MqttClient's own contract: paho's thread never outlives the event loop, and connect failures
read as what to check."""

from __future__ import annotations

import asyncio
import ssl
import threading

import pytest

from edgeagent.telemetry.mqtt import BrokerSettings, MqttClient, describe_connect_error
from tests.mqtt.conftest import Broker, wait_for

TLS_HINT = "certificate rejected, or TLS settings wrong? check mqtt.ca_file / cert_file / key_file"


def paho_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-")]


@pytest.mark.parametrize("stop", [True, False], ids=["stop", "cancelled"])
def test_paho_thread_is_joined_before_the_loop_closes(broker: Broker, stop: bool) -> None:
    before = set(paho_threads())

    async def go() -> None:
        client = MqttClient(BrokerSettings("127.0.0.1", broker.port), backoff=(0.1, 0.5))
        await client.start()
        assert await client.wait_connected(20)
        assert set(paho_threads()) - before
        if stop:
            await client.stop()
        # else: asyncio.run cancels the connection task, which must still join paho's thread.

    asyncio.run(go())
    assert set(paho_threads()) <= before
    # The broker going away now reaches no paho callback, so nothing is posted to the closed
    # loop (pytest would flag the exception in paho's thread).
    broker.stop()


def test_stop_while_the_broker_is_down(broker: Broker) -> None:
    before = set(paho_threads())

    async def go() -> None:
        client = MqttClient(BrokerSettings("127.0.0.1", broker.port), backoff=(0.1, 0.2))
        await client.start()
        assert await client.wait_connected(20)
        broker.stop()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_for(lambda: not client.connected, what="the loss noticed"))
        assert "connection lost" in client.last_error
        await asyncio.sleep(0.3)  # a few refused reconnects
        assert "connection refused" in client.last_error
        await client.stop()

    asyncio.run(go())
    assert set(paho_threads()) <= before


@pytest.mark.parametrize(("exc", "tls", "expected"), [
    (ConnectionResetError(104, "Connection reset by peer"), True, TLS_HINT),
    (ConnectionError("The connection was lost."), True, TLS_HINT),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), True, TLS_HINT),
    (ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate"), True,
     TLS_HINT),
    (ConnectionResetError(104, "Connection reset by peer"), False, "is it an MQTT broker"),
    (ConnectionRefusedError(111, "Connection refused"), False,
     "is a broker listening on mqtt://h:1"),
    (TimeoutError(), False, "no answer from mqtt://h:1"),
    (OSError(113, "No route to host"), False, "cannot connect to mqtt://h:1: No route to host"),
])
def test_connect_errors_say_what_to_check(exc: OSError, tls: bool, expected: str) -> None:
    assert expected in describe_connect_error(exc, "mqtt://h:1", tls)
