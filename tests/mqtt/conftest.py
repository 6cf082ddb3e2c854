"""A real Mosquitto on a free 127.0.0.1 port, with a generated config in tmp_path.

Never the system broker on 1883. Each broker is killed at teardown. Brokers can be stopped and
started again on the same port (outage tests) and keep their persistence file in tmp_path.
"""

from __future__ import annotations

import getpass
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if Path("/usr/sbin/mosquitto").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy (bounded; raises with ``what`` if it never is)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Broker:
    """One Mosquitto process; ``extra`` lines go into its listener config."""

    def __init__(self, workdir: Path, extra: str = "", anonymous: bool = True) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            # As root, mosquitto drops to the "mosquitto" user, which cannot write in tmp_path.
            f"user {getpass.getuser()}\nper_listener_settings false\n"
            f"persistence true\npersistence_location {self.dir}/\n"
            f"log_dest file {self.dir}/mosquitto.log\nlog_type all\n"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            f"listener {self.port} 127.0.0.1\n{extra}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_listening()

    def wait_listening(self) -> None:
        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.dir / "mosquitto.log").read_text() if (
                    self.dir / "mosquitto.log").exists() else ""
                raise AssertionError(f"the broker exited: {log[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, what="mosquitto to listen")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class AmqttBroker(Broker):
    """The fallback where no mosquitto binary exists: amqtt's broker in a subprocess on a free
    loopback port. MQTT 3.1.1 only, anonymous, no TLS and no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "amqtt.yaml"
        self.conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n")
        self.proc = None

    def start(self) -> None:
        amqtt = Path(sys.executable).with_name("amqtt")
        with (self.dir / "mosquitto.log").open("wb") as log:  # read by Broker's start check
            self.proc = subprocess.Popen([str(amqtt), "-c", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        self.wait_listening()


@pytest.fixture(params=["auto"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """``auto``: mosquitto when installed, else amqtt; a test forces ``amqtt`` by
    parametrizing this fixture indirectly."""
    return str(request.param)


@pytest.fixture
def broker_factory(tmp_path: Path, broker_kind: str) -> Iterator[Any]:
    use_amqtt = broker_kind == "amqtt" or MOSQUITTO is None
    made: list[Broker] = []

    def make(name: str = "broker", extra: str = "", anonymous: bool = True) -> Broker:
        if use_amqtt and (extra or not anonymous):
            pytest.skip("needs mosquitto (TLS, passwords): apt install mosquitto")
        b = AmqttBroker(tmp_path / name) if use_amqtt else Broker(tmp_path / name, extra,
                                                                   anonymous)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop(signal.SIGKILL)


@pytest.fixture
def broker(broker_factory: Any) -> Broker:
    return broker_factory()


class Watcher:
    """A plain paho subscriber (the receiver's side), with a persistent session so nothing
    published while it reconnects after a broker restart is lost to it."""

    def __init__(self, port: int, topics: list[str], persistent: bool = True,
                 v311: bool = False) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"watcher-{free_port()}",
                                  protocol=paho.MQTTv311 if v311 else paho.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.topics = topics

        def on_connect(c: paho.Client, *_a: Any) -> None:
            c.subscribe([(t, 1) for t in topics])

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        props = None
        if persistent and not v311:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        if v311:
            self.client.connect("127.0.0.1", port, 30)
        else:
            self.client.connect("127.0.0.1", port, 30, clean_start=not persistent,
                                properties=props)
        self.client.loop_start()

    def payloads(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix) and p]

    def last(self, suffix: str) -> dict[str, Any] | None:
        found = self.payloads(suffix)
        return found[-1] if found else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watch() -> Iterator[Any]:
    made: list[Watcher] = []

    def make(port: int, topics: list[str], persistent: bool = True,
             v311: bool = False) -> Watcher:
        w = Watcher(port, topics, persistent, v311)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()
