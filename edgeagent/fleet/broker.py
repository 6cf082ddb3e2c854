"""The controller's MQTT side: shared subscriptions in, retained documents out, paced catch-up.

Two broker facts shape it (DESIGN 3.8). A broker sends no retained messages to a shared
subscription (MQTT 5, 4.8.2), so the live stream (``$share/{group}/{prefix}/+/status`` and the
rest) carries only what devices publish from now on. And a stock Mosquitto bounds each
client's queue (20 in flight, 1,000 queued), so one plain subscription to every device's
retained state would be cut short at about 500 devices. The catch-up therefore asks for the
retained state of the devices the database already knows, ``catchup_batch`` devices (two
topics each) at a time: a plain subscription for the batch, a marker published to a topic of
our own (the broker handles one client's packets in order, so the marker comes back after the
batch's retained messages), then an unsubscribe. Devices the database does not know yet are
learnt from their own announcements: ``status`` on connect, ``reported`` on every change and
every ``mqtt.reported_interval_s``.

paho runs its own network thread; ``on_message`` only appends to a deque that the ingest
worker drains in batches, so the network thread keeps up with a burst of thousands of devices.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeagent.errors import BrokerError
from edgeagent.fleet.config import BrokerSection
from edgeagent.telemetry.mqtt import BrokerSettings

log = logging.getLogger(__name__)

#: Seconds one catch-up batch may take before the controller moves on (the next periodic
#: ``reported`` of those devices fills what was missed).
CATCHUP_BATCH_TIMEOUT_S = 15.0


class FleetBroker:
    """One MQTT 5 connection of the controller (paho reconnects by itself)."""

    def __init__(self, section: BrokerSection) -> None:
        self.section = section
        self.prefix = section.topic_prefix
        client_id = section.client_id or f"edgeagent-fleet-{uuid.uuid4().hex[:10]}"
        self.settings = BrokerSettings.from_section(section.mqtt_section(), client_id)
        self.inbox: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        self.received = 0
        self.connected = threading.Event()
        self.connects = 0
        self.last_error = ""
        self._marker_topic = f"{self.prefix}/_fleet/{client_id}/mark"
        self._marks: dict[str, threading.Event] = {}
        # The primary connection publishes, catches up and counts as "connected"; the others
        # only take their turn of the shared subscriptions, so a burst has N per-client
        # queues and N socket buffers to land in instead of one.
        self._clients = [self._make(client_id if i == 0 else f"{client_id}-{i}", i == 0)
                         for i in range(section.connections)]
        self._client = self._clients[0]
        self._started = False

    def _make(self, client_id: str, primary: bool) -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(100)
        c.reconnect_delay_set(1, 15)
        if self.settings.username:
            c.username_pw_set(self.settings.username, self.settings.password)
        if self.settings.tls is not None:
            c.tls_set_context(self.settings.tls)
        c.on_connect = self._on_connect if primary else self._on_connect_extra
        c.on_disconnect = self._on_disconnect if primary else None
        c.on_message = self._on_message
        return c

    def _on_connect_extra(self, client: paho.Client, _u: Any, _f: Any, reason: ReasonCode,
                          _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.shared_filters())

    # -- live stream ---------------------------------------------------------------------------
    def shared_filters(self) -> list[tuple[str, SubscribeOptions]]:
        g, p = self.section.share_group, self.prefix
        # QoS 0 on the last hop: a broker sends QoS 0 at once, outside the per-client window
        # of 20 in flight and 1,000 queued that QoS 1 is held to, so 10,000 devices connecting
        # together are delivered, not dropped. What a QoS 0 hop can lose is what a dropped
        # connection loses, and the catch-up after every reconnect asks for it again.
        return [(f"$share/{g}/{p}/+/{kind}", SubscribeOptions(qos=0))
                for kind in ("status", "reported", "cmd/+/result", "telemetry")]

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: ReasonCode,
                    _p: Any) -> None:
        if reason.is_failure:
            self.last_error = f"the broker refused the connection: {reason}"
            log.warning("MQTT %s: %s", self.settings.address, self.last_error)
            return
        # The marker at QoS 1: a broker may drop QoS 0 under load, and QoS 1 queues behind the
        # QoS 0 retained messages already written, so it still comes back after them.
        client.subscribe([*self.shared_filters(), (self._marker_topic, SubscribeOptions(qos=1))])
        self.connects += 1
        self.last_error = ""
        self.connected.set()
        log.info("MQTT %s: connected (shared group %s)", self.settings.address,
                 self.section.share_group)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode,
                       _p: Any) -> None:
        self.connected.clear()
        if self._started:
            self.last_error = f"disconnected: {reason}"
            log.warning("MQTT %s: %s", self.settings.address, self.last_error)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self._marker_topic:
            mark = self._marks.get(bytes(msg.payload).decode(errors="replace"))
            if mark is not None:
                mark.set()
            return
        self.received += 1
        self.inbox.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def start(self) -> None:
        """Connect in the background (paho retries until the broker answers)."""
        self._started = True
        s = self.settings
        for c in self._clients:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
            c.connect_async(s.host, s.port, s.keepalive_s, clean_start=True, properties=props)
            c.loop_start()

    def stop(self) -> None:
        self._started = False
        for c in self._clients:
            c.disconnect()
        for c in self._clients:
            c.loop_stop()

    # -- publishing -----------------------------------------------------------------------------
    def publish_blocking(self, topic: str, payload: bytes, retain: bool = True,
                         timeout: float = 10.0) -> None:
        """Publish QoS 1 and wait for the PUBACK.

        Raises:
            BrokerError: not connected, or no acknowledgement within ``timeout``.
        """
        if not self.connected.is_set():
            raise BrokerError(f"not connected to {self.settings.address}")
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise BrokerError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise BrokerError(f"the broker did not acknowledge {topic} within {timeout:g} s")

    async def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, self.publish_blocking, topic, payload, retain)

    # -- paced catch-up of retained state ------------------------------------------------------
    def catch_up(self, device_ids: list[str], stop: threading.Event) -> int:
        """Ask for the retained status and reported of these devices, a batch at a time.

        Returns how many batches came back complete (their marker arrived).
        """
        done = 0
        batch = self.section.catchup_batch
        for start in range(0, len(device_ids), batch):
            if stop.is_set() or not self.connected.wait(CATCHUP_BATCH_TIMEOUT_S):
                break
            ids = device_ids[start:start + batch]
            topics = [f"{self.prefix}/{d}/{kind}" for d in ids for kind in ("status", "reported")]
            token = uuid.uuid4().hex
            mark = self._marks[token] = threading.Event()
            try:
                # QoS 0 like the live stream; the marker at QoS 1 (see _on_connect).
                self._client.subscribe([(t, SubscribeOptions(qos=0)) for t in topics])
                self._client.publish(self._marker_topic, token.encode(), qos=1)
                if mark.wait(CATCHUP_BATCH_TIMEOUT_S):
                    done += 1
                else:
                    log.warning("catch-up: batch %d of %d devices did not complete within %g s",
                                start // batch + 1, len(ids), CATCHUP_BATCH_TIMEOUT_S)
            finally:
                self._marks.pop(token, None)
                self._client.unsubscribe(topics)
            # Leave the live stream room in the per-client queue between batches.
            time.sleep(0.05)
        return done
