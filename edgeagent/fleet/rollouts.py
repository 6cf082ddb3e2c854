"""Staged rollouts as persistent jobs on the rollout documents of DESIGN 3.5.

A rollout is a row in the database plus one retained document per target. Its members are the
target's devices when it started, each with its bucket (``rollout.bucket``). Wave ``i`` is the
share covering ``waves[i]`` percent of the buckets, raised until at least ``min_devices``
reachable members are in it; advancing is one re-publish with the higher share, pausing,
resuming and aborting are one publish each. Nothing is counted by events: every count is
recomputed from what the devices last reported (``device_rollouts``) and their online state,
so a controller that restarts counts the same, and re-publishing the same document after a
crash changes nothing on a device.

Per member, at a given moment (in this order):

- ``applied``, ``failed``, ``held``, ``reverted``: as the device reports it;
- ``untouched``: outside the current share (or, once aborted, never switched);
- ``not_reached``: in the share, no answer, and not seen online within
  ``inventory.offline_after_s``: neither counts against the wave nor holds it up;
- ``no_answer``: online but silent past the wave's deadline: counts against the threshold;
- ``pending``: in the share, online, no answer yet: the wave waits for these (once aborted:
  still on its way back to its base).

The wave ends when nothing is pending. Failures (``failed`` + ``no_answer``) above
``max_failures`` percent of the reachable members in the share abort the rollout the moment
they pass it (the threshold is a count fixed by the wave's size, known up front).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from edgeagent.control.rollout import BUCKETS, RolloutDoc, bucket, share_threshold
from edgeagent.errors import BrokerError, EdgeAgentError
from edgeagent.fleet.broker import FleetBroker
from edgeagent.fleet.config import FleetConfig, parse_percent, parse_waves
from edgeagent.fleet.store import Store, StoreError
from edgeagent.telemetry.topics import NAME_RE, fleet_rollout, group_rollout

log = logging.getLogger(__name__)

#: Seconds a wave may wait without progress (its pending count unchanged) before the leader
#: asks the broker for the retained ``reported`` of the devices it waits on (paced, as the
#: start-up catch-up): a burst the broker dropped on its way to the controller then costs
#: seconds, not the devices' next periodic announcement.
REFRESH_AFTER_S = 5.0
#: Most devices one refresh asks for.
REFRESH_MAX = 2000

CATEGORIES = ("applied", "failed", "reverted", "held", "pending", "no_answer", "not_reached",
              "untouched")
ACTIVE_PHASES = ("running", "paused", "reverting")


class RolloutRefused(EdgeAgentError):
    """A rollout request cannot be done (bad arguments, no devices, a conflicting rollout)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def topic_for(prefix: str, target: str, model: str) -> str:
    if target == "fleet":
        return fleet_rollout(prefix, model)
    return group_rollout(prefix, target.removeprefix("group:"), model)


def wave_threshold(pct: float, min_devices: int, reachable: list[int], previous: int) -> int:
    """The bucket threshold of a wave: ``pct`` of the buckets, raised to cover at least
    ``min_devices`` of the reachable members (sorted buckets), never below the previous wave."""
    thr = share_threshold(pct)
    need = min(min_devices, len(reachable))
    if need > 0:
        thr = max(thr, reachable[need - 1] + 1)
    return min(BUCKETS, max(thr, previous))


def classify(outcome: str, in_share: bool, reachable: bool, late: bool, aborted: bool) -> str:
    """One member's category (see the module doc)."""
    if outcome in ("applied", "failed", "held", "reverted"):
        return outcome
    if not in_share:
        return "untouched"
    if not reachable:
        return "not_reached"
    if aborted:
        # Still on its way back ("pending"), or it never switched.
        return "pending" if outcome == "pending" else "untouched"
    return "no_answer" if late else "pending"


@dataclass
class Tally:
    """Counts per category, overall and per wave, from one outcome histogram."""

    total: dict[str, int]
    per_wave: list[dict[str, int]]
    running_version: int
    members: int

    @property
    def failures(self) -> int:
        return self.total["failed"] + self.total["no_answer"]

    @property
    def eligible(self) -> int:
        """Reachable members in the share that are not held: what the threshold is of."""
        t = self.total
        return t["applied"] + t["failed"] + t["pending"] + t["no_answer"] + t["reverted"]


def tally(rows: Iterable[tuple[int, str, bool, bool, bool, int]], threshold: int,
          wave_thresholds: list[int], aborted: bool) -> Tally:
    """Counts from :meth:`Store.outcome_histogram` rows (grouped by wave index): a wave is in
    the share when its upper bound is within the current threshold."""
    total = dict.fromkeys(CATEGORIES, 0)
    per_wave = [dict.fromkeys(CATEGORIES, 0) for _ in wave_thresholds]
    running = members = 0
    for w, outcome, reachable, late, runs_version, n in rows:
        members += n
        if runs_version:
            running += n
        in_share = w < len(wave_thresholds) and wave_thresholds[w] <= threshold
        cat = classify(outcome, in_share, reachable, late, aborted)
        total[cat] += n
        if w < len(wave_thresholds):
            per_wave[w][cat] += n
    return Tally(total, per_wave, running, members)


def verdict(r: dict[str, Any], t: Tally) -> tuple[str, bool]:
    """One honest sentence about where a rollout stands, and whether it succeeded fully."""
    c = t.total
    phase = r["phase"]
    tail = []
    if c["not_reached"]:
        tail.append(f"{c['not_reached']} not reached")
    if c["no_answer"]:
        tail.append(f"{c['no_answer']} did not answer")
    if c["failed"]:
        tail.append(f"{c['failed']} failed")
    if c["held"]:
        tail.append(f"{c['held']} held by a more specific document")
    rest = f" ({', '.join(tail)})" if tail else ""
    v = f"v{r['version']}"
    if phase == "done":
        ok = not (c["not_reached"] or c["no_answer"] or c["failed"])
        head = (f"done: {t.running_version} of {t.members} devices run {v}" if ok else
                f"done, incomplete: {t.running_version} of {t.members} devices run {v}")
        return head + rest, ok
    if phase in ("reverting", "aborted"):
        still = t.running_version
        state = "reverting" if phase == "reverting" else "aborted"
        why = f" ({r['reason']})" if r["reason"] else ""
        return (f"{state}{why}: {c['reverted']} reverted, {still} still run {v}{rest}", False)
    return (f"{phase}: wave {r['wave'] + 1} of {len(orjson.loads(r['waves']))}, "
            f"{t.running_version} of {t.members} devices run {v}{rest}", False)


class RolloutEngine:
    """Creates rollouts (any replica) and drives those this replica leads."""

    def __init__(self, config: FleetConfig, store: Store, broker: FleetBroker | None) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self.prefix = config.broker.topic_prefix
        self.owner = f"fleet-{uuid.uuid4().hex[:10]}"
        self.lease_s = max(10.0, config.rollouts.tick_s * 20)
        self.leading: set[str] = set()
        self.publishes = 0
        self.refreshes = 0
        self._stalled: dict[str, tuple[int, float]] = {}
        self._pending: dict[str, int] = {}
        self._refresh_thread: threading.Thread | None = None
        self._stop_refresh = threading.Event()
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()

    # -- requests (from the API) -----------------------------------------------------------
    def create(self, model: str, version: int, target: str, *, waves: str | None = None,
               min_devices: int | None = None, max_failures: str | None = None,
               wave_timeout_s: float | None = None, kind: str = "rollout",
               now: float | None = None) -> dict[str, Any]:
        """Start a rollout (wave 1 is published by the leader on its next tick).

        Raises:
            RolloutRefused: bad arguments (400), no devices (400), an active rollout of the
                same model and target (409).
        """
        now = time.time() if now is None else now
        d = self.config.rollouts
        if not isinstance(model, str) or not NAME_RE.match(model):
            raise RolloutRefused(f"model: expected a model name, got {model!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RolloutRefused(f"version: expected an integer >= 1, got {version!r}")
        if target != "fleet" and not (target.startswith("group:")
                                      and NAME_RE.match(target[6:])):
            raise RolloutRefused(f"target: expected 'fleet' or 'group:NAME', got {target!r}")
        try:
            wave_list = parse_waves(waves or d.waves, "waves")
            failures = parse_percent(max_failures or d.max_failures, "max_failures")
        except EdgeAgentError as exc:
            raise RolloutRefused(str(exc)) from None
        min_n = d.min_devices if min_devices is None else min_devices
        timeout = d.wave_timeout_s if wave_timeout_s is None else wave_timeout_s
        if isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 0:
            raise RolloutRefused(f"min_devices: expected an integer >= 0, got {min_n!r}")
        if not isinstance(timeout, int | float) or not 0 < timeout <= 7 * 86400:
            raise RolloutRefused(f"wave_timeout_s: expected 0 < seconds <= 604800, got "
                                 f"{timeout!r}")
        for other in self.store.rollouts(active_only=True):
            if other["model"] == model and other["target"] == target:
                raise RolloutRefused(f"rollout {other['rollout_id']} of {model} on {target} is "
                                     f"{other['phase']}; abort it or let it finish first", 409)
        devices = self.store.target_devices(target)
        if not devices:
            raise RolloutRefused(f"no devices in {target}" if target != "fleet"
                                 else "the inventory has no devices yet")
        rollout_id = f"r-{int(now)}-{uuid.uuid4().hex[:6]}"
        histogram = self.store.version_histogram(target, model)
        from_version = max(histogram, key=lambda v: (histogram[v], v)) if histogram else None
        members = [(dev, bucket(rollout_id, dev)) for dev, _s, _l in devices]
        cutoff = now - self.config.inventory.offline_after_s
        reachable = sorted(b for (dev, b), (_d, state, seen) in zip(members, devices,
                                                                   strict=True)
                           if state == "online" and seen >= cutoff)
        thr = wave_threshold(wave_list[0], min_n, reachable, 0)
        row = {"rollout_id": rollout_id, "kind": kind, "model": model, "target": target,
               "version": version, "from_version": from_version,
               "waves": orjson.dumps(wave_list).decode(), "min_devices": min_n,
               "max_failures": failures, "wave_timeout_s": float(timeout), "phase": "running",
               "wave": 0, "threshold": thr, "doc_state": "running", "published": "",
               "members": len(members), "created": now, "updated": now, "finished": None,
               "reason": "", "publishes": 0}
        self.store.create_rollout(row, members)
        self.store.put_wave(rollout_id, 0, pct=wave_list[0], threshold=thr, started=now,
                            deadline=now + timeout, finished=None, result="running", counts="")
        log.info("rollout %s: %s v%d on %s, %d devices, waves %s", rollout_id, model, version,
                 target, len(members), waves or d.waves)
        self._kick.set()
        return self.describe(rollout_id, now)

    def rollback(self, model: str, target: str, **kwargs: Any) -> dict[str, Any]:
        """A rollout back to the version the latest rollout of this model and target replaced.

        Raises:
            RolloutRefused: no earlier rollout, or no previous version known.
        """
        last = self.store.latest_rollout(model, target)
        if last is None:
            raise RolloutRefused(f"no rollout of {model} on {target} to roll back", 404)
        if last["from_version"] is None:
            raise RolloutRefused(f"rollout {last['rollout_id']} recorded no previous version "
                                 f"of {model} (no device reported one)", 409)
        if last["phase"] in ACTIVE_PHASES:
            raise RolloutRefused(f"rollout {last['rollout_id']} is {last['phase']}: abort it "
                                 "instead (its devices go back to their base)", 409)
        kwargs.setdefault("waves", "100%")
        kwargs.setdefault("max_failures", "100%")
        return self.create(model, int(last["from_version"]), target, kind="rollback", **kwargs)

    def act(self, rollout_id: str, action: str, now: float | None = None) -> dict[str, Any]:
        """pause, resume or abort (the leader publishes the document on its next tick).

        Raises:
            RolloutRefused: no such rollout (404) or not in a state that allows it (409).
        """
        now = time.time() if now is None else now
        r = self.store.rollout(rollout_id)
        if r is None:
            raise RolloutRefused(f"no rollout {rollout_id!r}", 404)
        allowed = {"pause": ("running",), "resume": ("paused",),
                   "abort": ("running", "paused")}
        if action not in allowed:
            raise RolloutRefused(f"unknown action {action!r} (pause, resume, abort)")
        if r["phase"] not in allowed[action]:
            raise RolloutRefused(f"rollout {rollout_id} is {r['phase']}; cannot {action} it", 409)
        if action == "pause":
            changed = self.store.update_rollout(rollout_id, "running", phase="paused",
                                                doc_state="paused", published="", updated=now)
        elif action == "resume":
            changed = self.store.update_rollout(rollout_id, "paused", phase="running",
                                                doc_state="running", published="", updated=now)
            if changed:
                self.store.put_wave(rollout_id, r["wave"],
                                    deadline=now + float(r["wave_timeout_s"]))
        else:
            changed = self._abort(r, "aborted by the operator", now)
        if not changed:
            raise RolloutRefused(f"rollout {rollout_id} changed meanwhile; look again", 409)
        self._kick.set()
        return self.describe(rollout_id, now)

    def _abort(self, r: dict[str, Any], reason: str, now: float) -> bool:
        if not self.store.update_rollout(r["rollout_id"], r["phase"], phase="reverting",
                                         doc_state="aborted", published="", reason=reason,
                                         updated=now):
            return False
        self.store.put_wave(r["rollout_id"], r["wave"], result="aborted", finished=now,
                            deadline=now + float(r["wave_timeout_s"]))
        log.warning("rollout %s: aborting (%s)", r["rollout_id"], reason)
        return True

    # -- counting ------------------------------------------------------------------------------
    def _tally(self, r: dict[str, Any], now: float) -> tuple[Tally, list[dict[str, Any]]]:
        waves = self.store.waves(r["rollout_id"])
        cutoff = now - self.config.inventory.offline_after_s
        thresholds = [int(w["threshold"]) for w in waves]
        rows = self.store.outcome_histogram(r["rollout_id"], cutoff, thresholds)
        aborted = r["doc_state"] == "aborted"
        return tally(rows, int(r["threshold"]), thresholds, aborted), waves

    def describe(self, rollout_id: str, now: float | None = None) -> dict[str, Any]:
        """A rollout with its live counts, overall and per wave.

        Raises:
            RolloutRefused: no such rollout (404).
        """
        now = time.time() if now is None else now
        r = self.store.rollout(rollout_id)
        if r is None:
            raise RolloutRefused(f"no rollout {rollout_id!r}", 404)
        t, waves = self._tally(r, now)
        text, ok = verdict(r, t)
        plan = orjson.loads(r["waves"])
        out_waves = []
        for i, w in enumerate(waves):
            out_waves.append({"wave": i + 1, "percent": w["pct"], "share": w["threshold"] / 100,
                              "started": w["started"], "deadline": w["deadline"],
                              "finished": w["finished"], "result": w["result"],
                              "counts": t.per_wave[i], "at_end": w["counts"] or None})
        return {"rollout_id": r["rollout_id"], "kind": r["kind"], "model": r["model"],
                "target": r["target"], "version": r["version"],
                "from_version": r["from_version"], "phase": r["phase"],
                "document": {"state": r["doc_state"], "share": r["threshold"] / 100,
                             "published": r["published"] == self._published_key(r)},
                "plan": {"waves": plan, "min_devices": r["min_devices"],
                         "max_failures": r["max_failures"],
                         "wave_timeout_s": r["wave_timeout_s"]},
                "wave": r["wave"] + 1, "members": t.members,
                "running_version": t.running_version, "counts": t.total,
                "failure_budget": math.floor(r["max_failures"] / 100 * t.eligible),
                "waves": out_waves, "created": r["created"], "updated": r["updated"],
                "finished": r["finished"], "reason": r["reason"],
                "publishes": r["publishes"], "summary": text, "succeeded": ok,
                "finished_ok": r["phase"] in ("done", "aborted")}

    # -- the leader's loop -------------------------------------------------------------------
    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        tick = self.config.rollouts.tick_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), tick)
            self._kick.clear()
            try:
                await self.tick()
            except (StoreError, BrokerError) as exc:
                log.warning("rollouts: %s; retrying", exc)

    async def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        self._stop_refresh.set()
        if self._refresh_thread is not None:
            await asyncio.to_thread(self._refresh_thread.join, 20)
        for name in list(self.leading):
            await asyncio.to_thread(self.store.release, name, self.owner)
        self.leading.clear()

    async def tick(self, now: float | None = None) -> None:
        active = await asyncio.to_thread(self.store.rollouts, True)
        ids = {r["rollout_id"] for r in active}
        for name in [n for n in self.leading if n.removeprefix("rollout:") not in ids]:
            await asyncio.to_thread(self.store.release, name, self.owner)
            self.leading.discard(name)
        for r in active:
            name = f"rollout:{r['rollout_id']}"
            if not await asyncio.to_thread(self.store.try_lead, name, self.owner, self.lease_s):
                self.leading.discard(name)
                continue
            if name not in self.leading:
                log.info("rollout %s: leading it (%s)", r["rollout_id"], self.owner)
                self.leading.add(name)
            await self.step(r["rollout_id"], now)

    @staticmethod
    def _published_key(r: dict[str, Any]) -> str:
        return f"{r['threshold']}:{r['doc_state']}"

    async def step(self, rollout_id: str, now: float | None = None) -> None:
        """One decision on a rollout this replica leads, then the document if it changed."""
        now = time.time() if now is None else now
        decided = await asyncio.to_thread(self._decide, rollout_id, now)
        if decided is None:
            return
        r = decided
        await asyncio.to_thread(self._maybe_refresh, r, now)
        if r["published"] != self._published_key(r) and self.broker is not None:
            doc = RolloutDoc(r["rollout_id"], r["model"], int(r["version"]),
                             r["threshold"] / 100, r["doc_state"], now)
            await self.broker.publish(topic_for(self.prefix, r["target"], r["model"]),
                                      doc.payload())
            self.publishes += 1
            await asyncio.to_thread(self.store.update_rollout, rollout_id,
                                    published=self._published_key(r),
                                    publishes=int(r["publishes"]) + 1)
            log.info("rollout %s: published share %g %% state %s", rollout_id,
                     r["threshold"] / 100, r["doc_state"])

    def _maybe_refresh(self, r: dict[str, Any], now: float) -> None:
        """Ask again for the retained ``reported`` of the devices a wave has waited on for a
        while (in a thread of its own, paced like the start-up catch-up)."""
        if self.broker is None or r["phase"] not in ("running", "reverting"):
            return
        rid = r["rollout_id"]
        pending = self._pending.get(rid, 0)
        last, since = self._stalled.get(rid, (-1, now))
        if pending != last:
            self._stalled[rid] = (pending, now)
            return
        if not pending or now - since < REFRESH_AFTER_S:
            return
        if self._refresh_thread is not None and self._refresh_thread.is_alive():
            return
        done = ("applied", "failed", "held", "reverted") if r["phase"] == "running" else \
            ("reverted", "base", "failed", "held")
        ids = self.store.pending_members(rid, int(r["threshold"]),
                                         now - self.config.inventory.offline_after_s, done,
                                         REFRESH_MAX)
        self._stalled[rid] = (pending, now)
        if not ids:
            return
        self.refreshes += 1
        log.info("rollout %s: asking for the retained state of %d devices it waits on", rid,
                 len(ids))
        broker = self.broker
        self._refresh_thread = threading.Thread(
            target=broker.catch_up, args=(ids, self._stop_refresh), name="fleet-refresh",
            daemon=True)
        self._refresh_thread.start()

    def _decide(  # noqa: PLR0911 - one return per phase decision
            self, rollout_id: str, now: float) -> dict[str, Any] | None:
        """Advance, abort or finish a rollout from its live counts; returns the row as it now
        stands (None when it is gone)."""
        r = self.store.rollout(rollout_id)
        if r is None or r["phase"] not in ACTIVE_PHASES:
            return r
        t, waves = self._tally(r, now)
        self._pending[rollout_id] = t.total["pending"] + (
            t.total["applied"] if r["phase"] == "reverting" else 0)
        wave = waves[r["wave"]] if r["wave"] < len(waves) else None
        if r["phase"] == "reverting":
            # Done reverting when no reachable member still runs the version (or the deadline).
            still = t.total["applied"] + t.total["pending"]
            if still == 0 or (wave is not None and now > wave["deadline"]):
                self.store.update_rollout(rollout_id, "reverting", phase="aborted",
                                          finished=now, updated=now)
                log.warning("rollout %s: aborted; %s", rollout_id, verdict(r, t)[0])
            return self.store.rollout(rollout_id)
        if r["phase"] == "paused" or wave is None:
            return r
        budget = math.floor(r["max_failures"] / 100 * t.eligible)
        if t.failures > budget:
            self.store.put_wave(rollout_id, r["wave"], counts=orjson.dumps(t.total).decode())
            self._abort(r, f"{t.failures} failures passed the budget of {budget} "
                           f"({r['max_failures']:g} % of {t.eligible})", now)
            return self.store.rollout(rollout_id)
        if t.total["pending"] and now > wave["deadline"]:
            late = self.store.mark_late(rollout_id, int(r["threshold"]),
                                        now - self.config.inventory.offline_after_s)
            log.warning("rollout %s: wave %d passed its deadline; %d devices did not answer",
                        rollout_id, r["wave"] + 1, late)
            return self.store.rollout(rollout_id)
        if t.total["pending"]:
            return r
        # The wave is complete.
        self.store.put_wave(rollout_id, r["wave"], finished=now, result="complete",
                            counts=orjson.dumps(t.total).decode())
        plan = orjson.loads(r["waves"])
        nxt = r["wave"] + 1
        threshold = int(r["threshold"])
        while nxt < len(plan):
            reachable = self.store.member_buckets(
                rollout_id, now - self.config.inventory.offline_after_s)
            new = wave_threshold(plan[nxt], int(r["min_devices"]), reachable, threshold)
            if new > threshold or plan[nxt] >= 100:
                threshold = new
                break
            nxt += 1  # this wave adds nobody: straight to the next
        if nxt >= len(plan):
            self.store.update_rollout(rollout_id, "running", phase="done", doc_state="done",
                                      threshold=BUCKETS, published="", finished=now, updated=now)
            log.info("rollout %s: done; %s", rollout_id, verdict({**r, "phase": "done"}, t)[0])
        else:
            self.store.put_wave(rollout_id, nxt, pct=plan[nxt], threshold=threshold, started=now,
                                deadline=now + float(r["wave_timeout_s"]), finished=None,
                                result="running", counts="")
            self.store.update_rollout(rollout_id, "running", wave=nxt, threshold=threshold,
                                      published="", updated=now)
            log.info("rollout %s: wave %d of %d, share %g %%", rollout_id, nxt + 1, len(plan),
                     threshold / 100)
        return self.store.rollout(rollout_id)
