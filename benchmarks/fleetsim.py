"""A device simulator for the fleet controller: thousands of devices in one process.

Each simulated device follows the device side of DESIGN 3.5 as the agent does (``docs/mqtt.md``):
its own MQTT connection and client id, a retained ``status`` with an ``offline`` last will, a
retained ``reported`` re-published on every change and every ``reported_interval_s`` (+-10 %),
QoS 1 ``telemetry`` with a growing ``seq``, and desired/rollout documents applied with the
agent's precedence (operator pin, device document, each tagged group's rollout else its desired
document, fleet rollout, config) and rollout semantics (base recorded at first sight, bucket
< share * 100, back to base on ``aborted``).

The device logic is :class:`SimDevice`, transport-free, so a test can feed it the same
documents as a real agent and compare what both report. The transport is a minimal MQTT 3.1.1
client on asyncio protocols (CONNECT with will, SUBSCRIBE, PUBLISH/PUBACK, DISCONNECT): one TCP
connection per device at a few kB each, where 10,000 paho clients would need 10,000 threads.

Knobs: activation delay, the share of devices failing every version they were not configured
with, silent devices (connect and say ``online``, then never report nor act), and devices that
drop off the network (abrupt close, so the broker publishes their last will).

    python -m benchmarks.fleetsim --broker mqtt://127.0.0.1:1883 --devices 1000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from edgeagent.control.rollout import (
    ACTIVE_STATES,
    RolloutDoc,
    RolloutError,
    bucket,
    in_share,
    parse_rollout,
)

SIM_VERSION = "sim-1"


def fraction_of(device_id: str, salt: str) -> float:
    """A stable number in [0, 1) per device and purpose (who fails, who is silent)."""
    digest = hashlib.sha256(f"{salt}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class Decision:
    version: int
    source: str
    kind: str
    rollout: RolloutDoc | None = None


@dataclass
class SimDevice:
    """One device's logic: documents in, decisions and reported state out (no I/O)."""

    device_id: str
    tags: list[str]
    config: dict[str, int]
    prefix: str = "edgeagent"
    fails: Callable[[str, int], bool] = field(default=lambda _m, _v: False)
    operator_pins: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    device_doc: tuple[int, dict[str, int]] | None = None
    group_docs: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    rollouts: dict[tuple[str, str], RolloutDoc] = field(default_factory=dict)
    bases: dict[str, int] = field(default_factory=dict)
    switched: set[str] = field(default_factory=set)
    failed: dict[tuple[str, int], str] = field(default_factory=dict)
    desired_error: str = ""
    #: Every activation that succeeded, in order (model, version): what "applied twice" reads.
    history: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.running = dict(self.config) | self.running

    # -- topics -------------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    def subscriptions(self) -> list[str]:
        p = self.prefix
        subs = [f"{self.base}/desired", f"{self.base}/cmd/+", f"{p}/fleet/rollouts/+"]
        for g in self.tags:
            subs += [f"{p}/groups/{g}/desired", f"{p}/groups/{g}/rollouts/+"]
        return subs

    # -- documents in ---------------------------------------------------------------------------
    @staticmethod
    def _desired(payload: bytes) -> tuple[int, dict[str, int]] | None:
        if not payload:
            return None
        doc = orjson.loads(payload)
        rev = doc["revision"]
        models = {name: int(m["version"]) for name, m in doc.get("models", {}).items()}
        if not isinstance(rev, int):
            raise ValueError("revision: expected an integer")
        return rev, models

    def receive(self, topic: str, payload: bytes) -> None:
        """Take one document (what the agent's FleetLink hands its reconciler)."""
        p = self.prefix
        try:
            if topic == f"{self.base}/desired":
                self.device_doc = self._desired(payload)
                self.desired_error = ""
            elif topic.startswith(f"{p}/groups/"):
                group, _, rest = topic[len(p) + 8:].partition("/")
                if rest == "desired":
                    doc = self._desired(payload)
                    if doc is None:
                        self.group_docs.pop(group, None)
                    else:
                        self.group_docs[group] = doc
                elif rest.startswith("rollouts/"):
                    self._rollout(f"group:{group}", rest[9:], payload)
            elif topic.startswith(f"{p}/fleet/rollouts/"):
                self._rollout("fleet", topic[len(p) + 16:], payload)
        except (ValueError, KeyError, TypeError, RolloutError) as exc:
            self.desired_error = f"{topic}: {exc}"

    def _rollout(self, target: str, model: str, payload: bytes) -> None:
        doc = parse_rollout(payload, model)
        if doc is None:
            self.rollouts.pop((target, model), None)
            return
        self.rollouts[(target, model)] = doc
        # The base is what this device runs when it first sees the rollout id.
        self.bases.setdefault(doc.rollout_id, self.running.get(model, 0))

    # -- decisions ------------------------------------------------------------------------------
    def models(self) -> list[str]:
        names = dict.fromkeys(self.config)
        for _t, m in self.rollouts:
            names.setdefault(m)
        return list(names)

    def _from_rollout(self, r: RolloutDoc, kind: str) -> Decision:
        base = self.bases.get(r.rollout_id, self.running.get(r.model, 0))
        if r.state in ACTIVE_STATES and in_share(r.rollout_id, self.device_id, r.share):
            return Decision(r.version, r.describe(), kind, r)
        return Decision(base, r.describe(), kind, r)

    def decide(self, model: str) -> Decision:
        """Which version should serve, and why (most specific source first)."""
        if model in self.operator_pins:
            return Decision(self.operator_pins[model], "operator pin", "operator")
        if self.device_doc and model in self.device_doc[1]:
            return Decision(self.device_doc[1][model],
                            f"device pin, revision {self.device_doc[0]}", "device")
        for g in self.tags:
            r = self.rollouts.get((f"group:{g}", model))
            if r is not None:
                return self._from_rollout(r, "group-rollout")
            doc = self.group_docs.get(g)
            if doc and model in doc[1]:
                return Decision(doc[1][model], f"group {g}, revision {doc[0]}", "group")
        r = self.rollouts.get(("fleet", model))
        if r is not None:
            return self._from_rollout(r, "fleet-rollout")
        return Decision(self.config.get(model, 0), f"config: {self.config.get(model)}", "config")

    def wanted(self) -> dict[str, int]:
        """Models whose decided version differs from what runs (and has not failed here)."""
        out = {}
        for m in self.models():
            d = self.decide(m)
            if d.version and d.version != self.running.get(m) and (m, d.version) not in \
                    self.failed:
                out[m] = d.version
        return out

    def activate(self, model: str, version: int) -> bool:
        """Load and check a version (the simulated part); False when it fails here."""
        if version != self.config.get(model) and self.fails(model, version):
            self.failed[(model, version)] = f"v{version} failed its checks on this device"
            return False
        self.running[model] = version
        self.history.append((model, version))
        d = self.decide(model)
        if d.rollout is not None and version == d.rollout.version:
            self.switched.add(d.rollout.rollout_id)
        return True

    # -- reports out ----------------------------------------------------------------------------
    def _outcome(self, target: str, r: RolloutDoc) -> str:
        d = self.decide(r.model)
        if d.rollout is None or d.rollout.rollout_id != r.rollout_id:
            return "held"
        running = self.running.get(r.model)
        base = self.bases.get(r.rollout_id)
        if (r.model, r.version) in self.failed:
            return "failed"
        if r.state == "aborted":
            if running == base:
                return "reverted" if r.rollout_id in self.switched else "base"
            return "pending"
        if d.version == r.version:
            return "applied" if running == r.version else "pending"
        return "base" if running == base else "pending"

    def reported(self, now: float) -> dict[str, Any]:
        models = {}
        for m in self.models():
            d = self.decide(m)
            err = next((e for (mm, _v), e in self.failed.items() if mm == m), None)
            models[m] = {"state": "ready", "version": self.running.get(m), "variant": "model.onnx",
                         "format": "onnx", "precision": "fp32",
                         "provider": "CPUExecutionProvider", "fallback": None,
                         "last_error": err, "source": d.source, "source_kind": d.kind}
        rollouts = {}
        for (target, _m), r in self.rollouts.items():
            rollouts[r.rollout_id] = {
                "model": r.model, "target": target, "version": r.version,
                "base": self.bases.get(r.rollout_id), "bucket": bucket(r.rollout_id,
                                                                       self.device_id),
                "in_share": in_share(r.rollout_id, self.device_id, r.share), "state": r.state,
                "outcome": self._outcome(target, r),
                "error": self.failed.get((r.model, r.version))}
        revisions: dict[str, int] = {}
        if self.device_doc:
            revisions["device"] = self.device_doc[0]
        for g, (rev, _m) in self.group_docs.items():
            revisions[f"group:{g}"] = rev
        desired = {"state": ("refused" if self.desired_error else
                             "applied" if revisions else "none"),
                   "revisions": revisions, "models": {m: {"version": v} for m, v in
                                                      (self.device_doc or (0, {}))[1].items()},
                   "error": self.desired_error or None, "ts": now}
        return {"ts": now, "device_id": self.device_id, "version": SIM_VERSION,
                "tags": self.tags, "profile": {"name": "sim", "reason": "simulated device"},
                "facts": {"arch": "x86_64", "simulated": True}, "hub": {"state": "none"},
                "desired": desired, "models": models, "rollouts": rollouts}

    def status(self, state: str, now: float) -> dict[str, Any]:
        return {"ts": now, "state": state, "version": SIM_VERSION, "device_id": self.device_id}

    def telemetry(self, now: float, seq: int) -> dict[str, Any]:
        return {"ts": now, "seq": seq, "device_id": self.device_id,
                "system": {"cpu_percent": 12.5, "memory": {"percent": 40.0},
                           "disk": {"percent": 20.0}, "temperatures_c": {"cpu": 48.0}},
                "models": {m: {"requests": seq * 10, "errors": 0, "version": v,
                               "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                               "provider": "CPUExecutionProvider"}
                           for m, v in self.running.items()}}


# -- a minimal MQTT 3.1.1 client ------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


class DeviceConnection(asyncio.Protocol):
    """One simulated device on its own MQTT connection."""

    def __init__(self, sim: FleetSim, dev: SimDevice, silent: bool) -> None:
        self.sim = sim
        self.dev = dev
        self.silent = silent
        self.transport: Any = None
        self.buf = bytearray()
        self.pid = 0
        self.connected = asyncio.get_running_loop().create_future()
        self.seq = 0
        self.last_reported = b""
        self.activating: set[str] = set()
        self.closed = False

    # -- wire ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        will = orjson.dumps(self.dev.status("offline", time.time()))
        flags = 0x02 | 0x04 | 0x08 | 0x20  # clean session, will (QoS 1, retained)
        body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", 0)
        body += _str(self.dev.device_id) + _str(f"{self.dev.base}/status") + _str(will)
        self.transport.write(_packet(0x10, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"{self.dev.device_id}: closed"))

    def _next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.transport is None or self.closed:
            return
        body = _str(topic) + struct.pack("!H", self._next_pid()) + payload
        self.transport.write(_packet(0x32 | (1 if retain else 0), body))
        self.sim.published += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if len(self.buf) < 2:
                return
            mult, length, i = 1, 0, 1
            while True:
                if i >= len(self.buf):
                    return
                byte = self.buf[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            if len(self.buf) < i + length:
                return
            first, body = self.buf[0], bytes(self.buf[i:i + length])
            del self.buf[:i + length]
            self._packet(first, body)

    def _packet(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 2:  # CONNACK
            if body[1] != 0:
                self.connected.set_exception(ConnectionError(f"refused: code {body[1]}"))
                return
            self._online()
        elif kind == 3:  # PUBLISH
            qos = (first >> 1) & 3
            tlen = struct.unpack("!H", body[:2])[0]
            topic = body[2:2 + tlen].decode()
            at = 2 + tlen
            if qos:
                pid = body[at:at + 2]
                at += 2
                self.transport.write(b"\x40\x02" + pid)
            self.sim.received += 1
            if not self.silent:
                self.dev.receive(topic, body[at:])
                self.sim.changed(self)

    def _online(self) -> None:
        subs = b"".join(_str(t) + b"\x01" for t in self.dev.subscriptions())
        if not self.silent:
            self.transport.write(_packet(0x82, struct.pack("!H", self._next_pid()) + subs))
        now = time.time()
        self.publish(f"{self.dev.base}/status", orjson.dumps(self.dev.status("online", now)),
                     True)
        if not self.silent:
            self.report(force=True)
        if not self.connected.done():
            self.connected.set_result(None)

    # -- device behaviour ------------------------------------------------------------------------
    def report(self, force: bool = False) -> None:
        if self.silent:
            return
        doc = self.dev.reported(0.0)
        key = orjson.dumps(doc)
        if key == self.last_reported and not force:
            return
        self.last_reported = key
        doc["ts"] = doc["desired"]["ts"] = time.time()
        self.publish(f"{self.dev.base}/reported", orjson.dumps(doc), True)

    def send_telemetry(self) -> None:
        if self.silent:
            return
        self.seq += 1
        self.publish(f"{self.dev.base}/telemetry",
                     orjson.dumps(self.dev.telemetry(time.time(), self.seq)), False)

    def stop(self) -> None:
        """A clean stop: ``stopped``, then DISCONNECT (no last will)."""
        if self.transport is not None and not self.closed:
            self.publish(f"{self.dev.base}/status",
                         orjson.dumps(self.dev.status("stopped", time.time())), True)
            self.transport.write(b"\xe0\x00")
            self.transport.close()

    def drop(self) -> None:
        """Fall off the network: the broker publishes the last will (``offline``)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()


class FleetSim:
    """Many simulated devices, each on its own connection to one broker."""

    def __init__(self, broker_url: str, n: int, *, prefix: str = "edgeagent",
                 groups: int = 1, models: dict[str, int] | None = None,
                 activation_s: float = 0.5, failing: float = 0.0, silent: float = 0.0,
                 fail_versions: set[int] | None = None,
                 reported_interval_s: float = 300.0, telemetry_interval_s: float = 0.0,
                 id_format: str = "sim-{:06d}", seed: int = 1) -> None:
        parts = urlsplit(broker_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 1883
        self.prefix = prefix
        self.activation_s = activation_s
        self.reported_interval_s = reported_interval_s
        self.telemetry_interval_s = telemetry_interval_s
        self.random = random.Random(seed)  # noqa: S311 - simulated delays, not security
        self.published = 0
        self.received = 0
        self.activations = 0
        self.conns: dict[str, DeviceConnection] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._specs = []
        for i in range(n):
            device_id = id_format.format(i)
            fails = fraction_of(device_id, "fail") < failing
            self._specs.append((SimDevice(
                device_id, [f"g{i % groups}"] if groups > 1 else ["sim"],
                dict(models or {"mlp": 1}), prefix,
                fails=(lambda _m, v, f=fails: f and (fail_versions is None
                                                     or v in fail_versions))),
                fraction_of(device_id, "silent") < silent))

    @property
    def devices(self) -> list[SimDevice]:
        return [d for d, _s in self._specs]

    async def start(self, concurrency: int = 200) -> float:
        """Connect every device (``concurrency`` handshakes at a time); returns when the last
        one was acknowledged."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)

        async def one(dev: SimDevice, silent: bool) -> None:
            async with gate:
                conn = DeviceConnection(self, dev, silent)
                await loop.create_connection(lambda: conn, self.host, self.port)
                await asyncio.wait_for(conn.connected, 60)
                self.conns[dev.device_id] = conn

        await asyncio.gather(*(one(d, s) for d, s in self._specs))
        self._tasks.add(asyncio.create_task(self._periodic()))
        return time.time()

    def changed(self, conn: DeviceConnection) -> None:
        """A document arrived: report, and activate what the device now wants."""
        conn.report()
        for model, version in conn.dev.wanted().items():
            if model in conn.activating:
                continue
            conn.activating.add(model)
            delay = self.activation_s * self.random.uniform(0.5, 1.5)
            task = asyncio.get_running_loop().call_later(delay, self._activate, conn, model,
                                                         version)
            del task

    def _activate(self, conn: DeviceConnection, model: str, version: int) -> None:
        conn.activating.discard(model)
        if conn.closed:
            return
        # Decide again: the documents may have moved on while this one "loaded".
        want = conn.dev.wanted().get(model)
        if want is not None:
            conn.dev.activate(model, want)
            self.activations += 1
        conn.report()
        if conn.dev.wanted():
            self.changed(conn)

    async def _periodic(self) -> None:
        """Re-announce ``reported`` every interval (+-10 %), telemetry every interval."""
        next_rep = {d: time.time() + self.reported_interval_s * self.random.uniform(0.9, 1.1)
                    for d in self.conns}
        next_tel = time.time() + (self.telemetry_interval_s or 1e18)
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            for device_id, due in next_rep.items():
                if due <= now:
                    conn = self.conns[device_id]
                    conn.report(force=True)
                    next_rep[device_id] = now + self.reported_interval_s * \
                        self.random.uniform(0.9, 1.1)
            if now >= next_tel:
                for conn in self.conns.values():
                    conn.send_telemetry()
                next_tel = now + self.telemetry_interval_s

    def drop(self, device_ids: list[str]) -> None:
        for d in device_ids:
            self.conns[d].drop()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for conn in self.conns.values():
            conn.stop()
        await asyncio.sleep(0.2)
        for conn in self.conns.values():
            if conn.transport is not None:
                conn.transport.abort()


def main() -> None:  # pragma: no cover - manual use
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--activation-s", type=float, default=0.5)
    ap.add_argument("--failing", type=float, default=0.0)
    ap.add_argument("--silent", type=float, default=0.0)
    ap.add_argument("--reported-interval-s", type=float, default=300.0)
    ap.add_argument("--telemetry-interval-s", type=float, default=0.0)
    args = ap.parse_args()

    async def go() -> None:
        sim = FleetSim(args.broker, args.devices, groups=args.groups,
                       activation_s=args.activation_s, failing=args.failing,
                       silent=args.silent, reported_interval_s=args.reported_interval_s,
                       telemetry_interval_s=args.telemetry_interval_s)
        t0 = time.time()
        await sim.start()
        print(f"{args.devices} devices connected in {time.time() - t0:.1f} s; Ctrl-C stops")
        try:
            await asyncio.Event().wait()
        finally:
            await sim.stop()

    asyncio.run(go())


if __name__ == "__main__":  # pragma: no cover
    main()
