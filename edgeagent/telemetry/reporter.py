"""Telemetry, presence and reported state: what the agent tells the fleet over MQTT.

Every telemetry message goes through the spool: built with the next ``seq``, inserted, published
at QoS 1 and deleted on its PUBACK. One drainer sends the spool oldest first, so after an outage
the backlog goes out in ``seq`` order before anything newer. A PUBACK lost after the broker
delivered a message makes it go out twice: receivers drop a ``seq`` they have already seen
(see docs/mqtt.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edgeagent.errors import BrokerError
from edgeagent.runtime.stats import ModelStats
from edgeagent.telemetry.mqtt import MqttClient, Will
from edgeagent.telemetry.topics import Topics

if TYPE_CHECKING:
    from edgeagent.telemetry.spool import Spool, SpoolStats

log = logging.getLogger(__name__)

#: Messages sent per round of the drainer (in flight together, in order, on one connection).
DRAIN_BATCH = 64


def dumps(doc: Mapping[str, Any]) -> bytes:
    """The JSON encoding every payload uses (compact, UTF-8)."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def presence(state: str, version: str, device_id: str) -> bytes:
    """A ``status`` payload: ``online``, ``offline`` (the will) or ``stopped``."""
    return dumps({"ts": time.time(), "state": state, "version": version, "device_id": device_id})


def presence_will(topics: Topics, version: str) -> Will:
    return Will(topics.status, presence("offline", version, topics.device_id))


class ModelFigures:
    """Per-model telemetry over each interval, from the scheduler's statistics.

    Args:
        stats: The scheduler's statistics per model (``InferenceScheduler.all_stats``).
        status: The model manager's status entries (version, provider in use).
    """

    def __init__(self, stats: Callable[[], Mapping[str, ModelStats]],
                 status: Callable[[], list[dict[str, Any]]]) -> None:
        self._stats = stats
        self._status = status
        self._last: dict[str, tuple[int, int, Counter[int]]] = {}

    def sample(self) -> dict[str, Any]:
        """Requests, errors and batch sizes since the last sample, with latency percentiles."""
        status = {m["name"]: m for m in self._status()}
        out: dict[str, Any] = {}
        for name, st in sorted(self._stats().items()):
            with st.lock:
                ok, failed, batches = st.inference_count, st.fail.count, Counter(st.batch_sizes)
                rejected = st.rejected
            last_ok, last_failed, last_batches = self._last.get(name, (0, 0, Counter()))
            self._last[name] = (ok, failed, batches)
            entry: dict[str, Any] = {
                "requests": ok - last_ok + failed - last_failed,
                "errors": failed - last_failed,
                "requests_total": ok + failed,
                "errors_total": failed,
                "rejected_total": rejected,
                "latency_ms": st.take_window(),
                "batch_sizes": {str(k): v for k, v in sorted((batches - last_batches).items())},
            }
            s = status.get(name, {})
            entry.update({"state": s.get("state"), "version": s.get("version"),
                          "provider": s.get("provider")})
            out[name] = entry
        for name, s in status.items():
            out.setdefault(name, {"state": s.get("state"), "version": s.get("version"),
                                  "provider": s.get("provider"), "requests": 0, "errors": 0})
        return out


#: Shortest interval between two builds of the reported state, unless forced: a flood of
#: commands (each of which asks for it) then costs one build per interval, not one per command,
#: and the last state asked for is still the one published, at most this much later.
REPORTED_MIN_INTERVAL_S = 0.2


class Reporter:
    """Sends telemetry every interval (through the spool), presence and reported state.

    Args:
        client: The MQTT connection, or None when no broker is configured (telemetry is then
            still spooled locally, up to the bound).
        spool: Where every telemetry message waits for its PUBACK.
        topics: This device's topics.
        interval_s: Seconds between telemetry messages.
        telemetry: Builds a message body (system and model figures).
        reported: Builds the reported state document.
        version: The agent's version, in presence payloads.
        reannounce_s: The reported state is published again at least this often (jittered by
            up to 10 %), changed or not, so a fleet controller that missed it catches up
            without reading the broker's retained state.
    """

    def __init__(self, client: MqttClient | None, spool: Spool, topics: Topics, *,
                 interval_s: float, telemetry: Callable[[], dict[str, Any]],
                 reported: Callable[[], dict[str, Any]], version: str,
                 reannounce_s: float = 300.0) -> None:
        self.client = client
        self.spool = spool
        self.topics = topics
        self.interval_s = interval_s
        self._telemetry = telemetry
        self._reported = reported
        self.version = version
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_reported: bytes = b""
        self._reported_lock = asyncio.Lock()
        self._reported_at = -REPORTED_MIN_INTERVAL_S  # loop time of the last build
        self._deferred: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()  # one sender at a time keeps seq order, no repeats
        self.reannounce_s = reannounce_s
        self._announced = time.monotonic()
        self._jitter = random.uniform(0.9, 1.0)  # noqa: S311 - spreads a fleet, not security

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._tick(), name="telemetry-tick"))
        if self.client is not None:
            self._tasks.append(asyncio.create_task(self._drain(), name="telemetry-drain"))

    async def stop(self, drain_s: float = 2.0) -> None:
        """Spool a last telemetry message, send what can be sent within ``drain_s``, say
        ``stopped``. What is not sent stays in the spool for the next start."""
        self._tasks[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks[0]
        await self.snapshot()
        if self.client is not None and self.client.connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._send_spooled(), drain_s)
            with contextlib.suppress(BrokerError, TimeoutError):
                await asyncio.wait_for(self.client.publish(
                    self.topics.status, presence("stopped", self.version, self.topics.device_id),
                    retain=True), drain_s)
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        for task in [*self._tasks[1:], *self._background]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def on_connect(self) -> None:
        """After each CONNACK: announce presence, republish reported state, send the spool."""
        assert self.client is not None
        try:
            await self.client.publish(self.topics.status, presence(
                "online", self.version, self.topics.device_id), retain=True)
            await self.publish_reported(force=True)
        except BrokerError as exc:
            log.debug("presence not sent: %s", exc)
        self._wake.set()

    async def publish_reported(self, force: bool = False) -> None:
        """Publish the reported state (retained) if it changed since last published.

        Unless ``force``, a call within :data:`REPORTED_MIN_INTERVAL_S` of the last build
        returns at once and leaves one deferred publish (of the state as it is then).
        """
        if self.client is None or not self.client.connected:
            return
        if not force:
            loop = asyncio.get_running_loop()
            wait = self._reported_at + REPORTED_MIN_INTERVAL_S - loop.time()
            if wait > 0:
                if self._deferred is None:
                    self._deferred = loop.call_later(wait, self._publish_deferred)
                return
        async with self._reported_lock:
            self._reported_at = asyncio.get_running_loop().time()
            doc = self._reported()
            body = dumps(doc)
            if body == self._last_reported and not force:
                return
            await self.client.publish(self.topics.reported, dumps({"ts": time.time(), **doc}),
                                      retain=True)
            self._last_reported = body
            self._announced = time.monotonic()

    def _publish_deferred(self) -> None:
        self._deferred = None
        task = asyncio.ensure_future(self._publish_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_quietly(self) -> None:
        try:
            await self.publish_reported()
        except BrokerError as exc:
            log.debug("reported state not sent: %s", exc)
        except Exception:  # a bug in building the state: logged, the next call tries again
            log.exception("reported state not published")

    async def snapshot(self) -> int:
        """Build one telemetry message and put it in the spool; return its seq."""
        body = self._telemetry()

        def build(seq: int, spool: SpoolStats) -> bytes:
            return dumps({"ts": time.time(), "seq": seq, "device_id": self.topics.device_id,
                          "interval_s": self.interval_s, **body,
                          "spool": {"depth": spool.depth, "dropped": spool.dropped}})

        seq = await asyncio.to_thread(self.spool.add, self.topics.telemetry, build)
        self._wake.set()
        return seq

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.snapshot()
                due = time.monotonic() - self._announced >= self.reannounce_s * self._jitter
                await self.publish_reported(force=due)
            except BrokerError as exc:
                log.debug("reported state not sent: %s", exc)
            except Exception:  # one bad sample must not end telemetry for good
                log.exception("telemetry sample failed")

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_spooled()

    async def _send_spooled(self) -> None:
        """Send the spool oldest first while connected; delete what the broker acknowledged."""
        assert self.client is not None
        async with self._send_lock:
            await self._send_batches(self.client)

    async def _send_batches(self, client: MqttClient) -> None:
        while client.connected:
            batch = await asyncio.to_thread(self.spool.peek, DRAIN_BATCH)
            if not batch:
                return
            sends = [asyncio.ensure_future(client.publish(m.topic, m.payload))
                     for m in batch]
            results = await asyncio.gather(*sends, return_exceptions=True)
            acked = []
            for m, result in zip(batch, results, strict=True):
                if result is not None:
                    break  # keep order: nothing after the first failure counts as sent
                acked.append(m.seq)
            if acked:
                await asyncio.to_thread(self.spool.remove, acked)
            failure = next((r for r in results if r is not None), None)
            if failure is not None:
                log.debug("telemetry send interrupted: %s", failure)
                return  # the next connect wakes the drainer
