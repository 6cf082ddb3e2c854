"""Device messages into the database: drained from the broker's inbox in batches.

One transaction per batch (at most every ``FLUSH_S``), and within a batch only the newest
status and reported of each device are written, so a burst of 10,000 devices announcing
themselves costs a few transactions, not 20,000. Every message is checked before it counts:
topic shape, device id, size, JSON, field types; what fails is counted per reason and dropped
(one log line per reason and minute, not per message).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from edgeagent.fleet.broker import FleetBroker
from edgeagent.fleet.store import Batch, Store, StoreError
from edgeagent.telemetry.topics import NAME_RE

log = logging.getLogger(__name__)

FLUSH_S = 0.2
MAX_BATCH = 5000
STATES = ("online", "offline", "stopped")


class Ingest:
    """The worker thread between :class:`FleetBroker`'s inbox and the :class:`Store`."""

    def __init__(self, broker: FleetBroker, store: Store, max_message_bytes: int,
                 on_batch: Callable[[], None] | None = None) -> None:
        self.broker = broker
        self.store = store
        self.prefix = broker.prefix
        self.max_bytes = max_message_bytes
        self.on_batch = on_batch
        self.processed = 0
        self.dropped: Counter[str] = Counter()
        self.cpu_s = 0.0
        self.batches = 0
        self.last_write_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
        self._warned: dict[str, float] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.broker.inbox:
                self._stop.wait(FLUSH_S)
                continue
            self.flush()
            self._stop.wait(0.02)

    def flush(self) -> int:
        """Drain up to ``MAX_BATCH`` messages into one transaction; returns how many."""
        inbox = self.broker.inbox
        if not inbox:
            return 0
        t0 = time.thread_time()
        batch = Batch()
        now = time.time()
        n = 0
        while inbox and n < MAX_BATCH:
            topic, payload, _retain = inbox.popleft()
            n += 1
            why = self.take(batch, topic, payload, now)
            if why:
                self._drop(why, topic)
        try:
            self.store.apply(batch)
            self.last_write_error = ""
        except StoreError as exc:
            # The next announcement of these devices brings the state again.
            self.last_write_error = str(exc)
            self._drop("database write failed", str(exc))
        self.processed += n
        self.batches += 1
        self.cpu_s += time.thread_time() - t0
        if self.on_batch is not None:
            self.on_batch()
        return n

    def _drop(self, why: str, detail: str) -> None:
        self.dropped[why] += 1
        now = time.monotonic()
        if now - self._warned.get(why, -1e9) > 60:
            self._warned[why] = now
            log.warning("dropped a device message (%s): %s", why, detail[:200])

    def take(  # noqa: PLR0911, PLR0912 - one check per refusal reason, flat on purpose
            self, batch: Batch, topic: str, payload: bytes, now: float) -> str:
        """Fold one message into the batch; returns why it was refused ('' when taken)."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return "foreign topic"
        device_id, _, kind = topic[len(head):].partition("/")
        if not NAME_RE.match(device_id) or device_id in ("groups", "fleet", "_fleet"):
            return "bad device id"
        if len(payload) > self.max_bytes:
            return "too large"
        if not payload:
            return ""  # a cleared retained message: nothing to learn
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return "not JSON"
        if not isinstance(doc, dict):
            return "not a JSON object"
        u = batch.device(device_id)
        if kind == "status":
            state = doc.get("state")
            ts = doc.get("ts")
            if state not in STATES or not _is_number(ts):
                return "bad status"
            # Arrival order, not ``ts``: a last will carries the time of its connect, older
            # than the "online" it replaces.
            u.status = {"state": state, "ts": ts,
                        "version": str(doc.get("version", ""))[:64]}
            if state == "online":
                u.seen = now
        elif kind == "reported":
            if not _is_number(doc.get("ts", 0)):
                return "bad reported"
            if u.reported is None or doc.get("ts", 0) >= u.reported.get("ts", 0):
                u.reported = doc
            u.seen = now
        elif kind == "telemetry":
            ts, seq = doc.get("ts"), doc.get("seq")
            if not _is_number(ts) or not isinstance(seq, int) or isinstance(seq, bool):
                return "bad telemetry"
            body = {k: doc[k] for k in ("system", "models") if isinstance(doc.get(k), dict)}
            u.telemetry.append((float(ts), seq, orjson.dumps(body).decode()))  # type: ignore[arg-type]
            u.seen = now
        elif kind.startswith("cmd/") and kind.endswith("/result"):
            request_id = kind[4:-7]
            if not NAME_RE.match(request_id):
                return "bad request id"
            u.results.append((request_id, payload.decode()))
            u.seen = now
        else:
            return "unknown topic"
        return ""

    def status(self) -> dict[str, Any]:
        return {"processed": self.processed, "queued": len(self.broker.inbox),
                "dropped": dict(self.dropped), "batches": self.batches,
                "cpu_s": round(self.cpu_s, 3), "last_write_error": self.last_write_error}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
