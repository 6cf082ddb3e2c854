"""The fleet manager's side (``edgeagent fleet``): status from the retained topics, staged
deploys through per-device desired state, rollbacks through commands.

The view of the fleet is what the broker retains (``status``, ``reported``, ``desired`` of every
device). To know when the broker has sent all of it, the client publishes a marker to a topic
of its own after subscribing: the broker handles one client's packets in order, so the marker
comes back after every retained message.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeagent.errors import BrokerError, EdgeAgentError
from edgeagent.telemetry.mqtt import BrokerSettings, Message, MqttClient
from edgeagent.telemetry.reporter import dumps
from edgeagent.telemetry.topics import Topics, device_of

FINISHED = ("applied", "refused", "failed")


class FleetError(EdgeAgentError):
    """A fleet operation could not be done (no such devices, bad waves, a failed deploy)."""


@dataclass
class DeviceView:
    """What the broker retains about one device."""

    status: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] = field(default_factory=dict)

    @property
    def online(self) -> bool:
        return self.status.get("state") == "online"

    def model_version(self, name: str) -> int | None:
        version = self.reported.get("models", {}).get(name, {}).get("version")
        return version if isinstance(version, int) else None

    def outcome(self) -> dict[str, Any]:
        return self.reported.get("desired", {}) or {}


def parse_waves(text: str) -> list[float]:
    """``5%,25%,100%`` -> [0.05, 0.25, 1.0] (increasing, ending at 100%).

    Raises:
        FleetError: not percentages, not increasing, or not ending at 100%.
    """
    try:
        waves = [float(p.strip().rstrip("%")) / 100 for p in text.split(",")]
    except ValueError as exc:
        raise FleetError(f"--waves: expected percentages like 5%,25%,100%, got {text!r}") from exc
    if not waves or any(b <= a for a, b in itertools.pairwise(waves)) or waves[-1] != 1.0 \
            or waves[0] <= 0:
        raise FleetError(f"--waves: expected increasing percentages ending at 100%, got {text!r}")
    return waves


def parse_percent(text: str) -> float:
    try:
        value = float(text.strip().rstrip("%")) / 100
    except ValueError as exc:
        raise FleetError(f"expected a percentage like 10%, got {text!r}") from exc
    if not 0 <= value <= 1:
        raise FleetError(f"expected a percentage between 0% and 100%, got {text!r}")
    return value


def wave_sizes(n: int, waves: Sequence[float]) -> list[int]:
    """How many devices each wave adds (every wave at least one, while any are left)."""
    sizes, done = [], 0
    for fraction in waves:
        end = min(n, max(done + 1, math.ceil(fraction * n)))
        if end > done:
            sizes.append(end - done)
            done = end
    return sizes


class Fleet:
    """A fleet manager's connection: the retained view, and operations on it.

    Args:
        settings: The broker.
        prefix: The topic prefix.
        say: Where progress lines go.
        timeout_s: How long to wait for a device to answer.
    """

    def __init__(self, settings: BrokerSettings, prefix: str = "edgeagent",
                 say: Callable[[str], None] = print, timeout_s: float = 300.0) -> None:
        self.prefix = prefix
        self.say = say
        self.timeout_s = timeout_s
        self.devices: dict[str, DeviceView] = {}
        self._marker = f"{prefix}/_fleet/{uuid.uuid4().hex}"
        self._marker_seen = asyncio.Event()
        self._changed = asyncio.Event()
        self._results: dict[str, dict[str, Any]] = {}
        self.client = MqttClient(settings, backoff=(0.2, 2.0))
        for kind in ("status", "reported", "desired"):
            self.client.subscribe(f"{prefix}/+/{kind}", self._on_device)
        self.client.subscribe(f"{prefix}/+/cmd/+/result", self._on_result)
        self.client.subscribe(self._marker, self._on_marker)

    async def __aenter__(self) -> Fleet:
        await self.client.start()
        if not await self.client.wait_connected(15.0):
            error = self.client.last_error
            await self.client.stop()
            raise BrokerError(f"cannot connect to {self.client.settings.address}: {error}")
        await self.client.publish(self._marker, b"1")
        try:
            await asyncio.wait_for(self._marker_seen.wait(), 15.0)
        except TimeoutError as exc:
            await self.client.stop()
            raise BrokerError("the broker did not send the retained state back") from exc
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.client.stop()

    # ---- the view ------------------------------------------------------------------------

    async def _on_marker(self, _msg: Message) -> None:
        self._marker_seen.set()

    async def _on_device(self, msg: Message) -> None:
        device = device_of(self.prefix, msg.topic)
        if device is None:
            return
        kind = msg.topic.rsplit("/", 1)[1]
        try:
            doc = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            doc = {}
        view = self.devices.setdefault(device, DeviceView())
        setattr(view, kind, doc if isinstance(doc, dict) else {})
        self._changed.set()

    async def _on_result(self, msg: Message) -> None:
        request_id = msg.topic.split("/")[-2]
        try:
            self._results[request_id] = json.loads(msg.payload)
        except ValueError:
            self._results[request_id] = {"ok": False, "error": "unreadable result"}
        self._changed.set()

    async def _until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return done()
        return True

    def table(self) -> list[dict[str, Any]]:
        """One row per device: online, profile, models, errors, last seen."""
        rows = []
        for device, view in sorted(self.devices.items()):
            if not view.status and not view.reported:
                continue
            rep = view.reported
            models = {n: {"version": m.get("version"), "provider": m.get("provider"),
                          "state": m.get("state")} for n, m in rep.get("models", {}).items()}
            errors = [f"{n}: {m['last_error']}" for n, m in rep.get("models", {}).items()
                      if m.get("last_error")]
            if view.outcome().get("error"):
                errors.append(f"desired: {view.outcome()['error']}")
            rows.append({
                "device": device, "state": view.status.get("state", "unknown"),
                "online": view.online, "version": view.status.get("version"),
                "profile": (rep.get("profile") or {}).get("name"), "tags": rep.get("tags", []),
                "models": models, "errors": errors,
                "last_seen": max(view.status.get("ts", 0), rep.get("ts", 0)) or None,
            })
        return rows

    def select(self, devices: Sequence[str] = (), group: str | None = None,
               all_devices: bool = False) -> list[str]:
        """The target devices, sorted.

        Raises:
            FleetError: a named device is unknown, or the selection is empty.
        """
        known = {d for d, v in self.devices.items() if v.status or v.reported}
        if devices:
            missing = sorted(set(devices) - known)
            if missing:
                raise FleetError(f"unknown device(s): {', '.join(missing)} (see 'edgeagent "
                                 "fleet status')")
            chosen = set(devices)
        elif group is not None:
            chosen = {d for d in known if group in self.devices[d].reported.get("tags", [])}
        elif all_devices:
            chosen = known
        else:
            raise FleetError("choose --device ID..., --group G or --all")
        if not chosen:
            raise FleetError("no device matches the selection")
        return sorted(chosen)

    # ---- desired state -------------------------------------------------------------------

    async def _set_model(self, device: str, name: str, version: int | None) -> int:
        """Publish the device's desired state with ``name`` at ``version`` (None = not
        named); returns the new revision."""
        current = self.devices[device].desired
        models = dict(current.get("models", {})) if isinstance(current.get("models"), dict) else {}
        if version is None:
            models.pop(name, None)
        else:
            models[name] = {"version": version}
        revision = max(int(current.get("revision", 0) or 0),
                       int(self.devices[device].outcome().get("revisions", {}).get("device", 0)
                           or 0)) + 1
        doc = {"revision": revision, "models": models}
        self.devices[device].desired = doc
        await self.client.publish(Topics(self.prefix, device).desired, dumps(doc), retain=True)
        return revision

    def _answered(self, device: str, revision: int) -> bool:
        outcome = self.devices[device].outcome()
        return (outcome.get("revisions", {}).get("device", -1) >= revision
                and outcome.get("state") in FINISHED)

    async def _apply(self, targets: dict[str, int | None], name: str) -> dict[str, str]:
        """Set ``name`` on each device, wait for the outcomes; device -> outcome (or error)."""
        revisions = {d: await self._set_model(d, name, v) for d, v in targets.items()}
        outcomes: dict[str, str] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(outcomes) < len(targets):
            for d, rev in revisions.items():
                if d not in outcomes and self._answered(d, rev):
                    o = self.devices[d].outcome()
                    outcomes[d] = o["state"] if o["state"] == "applied" else \
                        f"{o['state']}: {o.get('error', '')}"
                    self.say(f"  {d}: {outcomes[d]}")
            if len(outcomes) == len(targets):
                break
            pending = [d for d in revisions if d not in outcomes]
            if not await self._until(lambda p=pending: any(  # type: ignore[misc]
                    self._answered(d, revisions[d]) for d in p), deadline - time.monotonic()):
                for d in pending:
                    outcomes[d] = f"no answer within {self.timeout_s:.0f} s"
                    self.say(f"  {d}: {outcomes[d]}")
        return outcomes

    async def deploy(self, name: str, version: int, targets: Sequence[str],
                     waves: Sequence[float], max_failures: float) -> bool:
        """Deploy wave by wave; stop and revert a wave whose failures pass the threshold."""
        sizes = wave_sizes(len(targets), waves)
        done = 0
        for i, size in enumerate(sizes, 1):
            wave = list(targets[done:done + size])
            done += size
            previous = {d: self.devices[d].model_version(name) for d in wave}
            self.say(f"wave {i}/{len(sizes)}: {name}@{version} on {len(wave)} device(s): "
                     f"{', '.join(wave)}")
            outcomes = await self._apply({d: version for d in wave}, name)
            failed = [d for d, o in outcomes.items() if o != "applied"]
            if len(failed) > max_failures * len(wave):
                self.say(f"wave {i}: {len(failed)} of {len(wave)} failed (more than "
                         f"{max_failures:.0%}); stopping and reverting this wave")
                await self._apply(previous, name)
                return False
            self.say(f"wave {i}: {len(wave) - len(failed)} of {len(wave)} applied")
        return True

    async def rollback(self, name: str, targets: Sequence[str]) -> bool:
        """Roll each device back to its previous version (a ``rollback`` command), then pin
        that version in its desired state so a later sync keeps it."""
        ids = {d: f"fleet-{uuid.uuid4().hex[:12]}" for d in targets}
        for d, rid in ids.items():
            await self.client.publish(Topics(self.prefix, d).command(rid),
                                      dumps({"action": "rollback", "model": name}))
        await self._until(lambda: all(r in self._results for r in ids.values()), self.timeout_s)
        ok = True
        for d, rid in ids.items():
            result = self._results.get(rid)
            if result is None:
                self.say(f"  {d}: no answer within {self.timeout_s:.0f} s")
                ok = False
            elif not result.get("ok"):
                self.say(f"  {d}: refused: {result.get('error')}")
                ok = False
            else:
                version = result["result"]["version"]
                self.say(f"  {d}: rolled back to {name}@{version}")
                if name in self.devices[d].desired.get("models", {}):
                    await self._set_model(d, name, version)
        return ok


def format_table(rows: list[dict[str, Any]]) -> str:
    """The ``fleet status`` table."""
    lines = [f"{'DEVICE':<20} {'STATE':<8} {'PROFILE':<16} {'MODELS':<40} {'LAST SEEN':<9} ERRORS"]
    now = time.time()
    for r in rows:
        models = ", ".join(f"{n} v{m['version']} {m['provider'] or '-'}"
                           for n, m in sorted(r["models"].items())) or "-"
        seen = f"{now - r['last_seen']:.0f}s ago" if r["last_seen"] else "-"
        lines.append(f"{r['device']:<20} {r['state']:<8} {r['profile'] or '-':<16} "
                     f"{models:<40} {seen:<9} {'; '.join(r['errors']) or '-'}")
    return "\n".join(lines)


# ---- the command line (``edgeagent fleet ...``) ----------------------------------------------


def add_fleet_parser(sub: Any, config_help: str) -> None:
    """Add ``fleet status|deploy|rollback`` to the ``edgeagent`` command line."""
    fleet = sub.add_parser("fleet", help="the fleet manager's side over MQTT",
                           description="Fleet status, staged deploys and rollbacks over MQTT.")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")

    def add(name: str, help_: str) -> Any:
        p = fsub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=cmd_fleet)
        p.add_argument("--config", help=config_help)
        p.add_argument("--broker", default="", help="mqtt[s]://HOST[:PORT] (default: [mqtt] url; "
                                                    "credentials and CA from [mqtt])")
        p.add_argument("--timeout", type=float, default=300.0,
                       help="seconds to wait for each device's answer (default 300)")
        return p

    p = add("status", "a table of devices from the retained topics")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    for name, help_ in (("deploy", "deploy NAME@VERSION in waves, reverting a failing wave"),
                        ("rollback", "roll NAME back to each device's previous version")):
        p = add(name, help_)
        p.add_argument("model", metavar="NAME@VERSION" if name == "deploy" else "NAME")
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--device", nargs="+", default=[], metavar="ID")
        target.add_argument("--group", metavar="G")
        target.add_argument("--all", action="store_true", dest="all_devices")
        if name == "deploy":
            p.add_argument("--waves", default="100%", help="cumulative, e.g. 5%%,25%%,100%%")
            p.add_argument("--max-failures", default="0%",
                           help="failures per wave beyond which it is reverted (default 0%%)")


def cmd_fleet(args: Any) -> int:
    """Run one ``edgeagent fleet`` action; exit 0 on success, 1 if a deploy was reverted."""
    import os

    from edgeagent.config import load_config

    config = load_config(args.config, os.environ)
    if not (args.broker or config.mqtt.url):
        raise FleetError("give --broker mqtt://HOST:PORT or set [mqtt] url in the config")
    settings = BrokerSettings.from_section(config.mqtt, f"edgeagent-fleet-{uuid.uuid4().hex[:8]}",
                                           url=args.broker)
    return asyncio.run(_fleet(args, settings, config.mqtt.topic_prefix))


async def _fleet(args: Any, settings: BrokerSettings, prefix: str) -> int:
    def say(line: str) -> None:
        print(line, flush=True)

    async with Fleet(settings, prefix, say, args.timeout) as fleet:
        if args.fleet_command == "status":
            rows = fleet.table()
            say(json.dumps(rows, indent=2, sort_keys=True) if args.json else format_table(rows))
            return 0
        targets = fleet.select(args.device, args.group, args.all_devices)
        if args.fleet_command == "rollback":
            return 0 if await fleet.rollback(args.model, targets) else 1
        name, sep, version = args.model.partition("@")
        if not sep or not version.isdigit() or int(version) < 1:
            raise FleetError(f"expected NAME@VERSION (mlp@3), got {args.model!r}")
        ok = await fleet.deploy(name, int(version), targets, parse_waves(args.waves),
                                parse_percent(args.max_failures))
        say(f"deploy of {args.model}: {'done' if ok else 'stopped and reverted'}")
        return 0 if ok else 1
