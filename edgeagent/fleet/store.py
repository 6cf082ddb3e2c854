"""The controller's database behind one small interface: SQLite (stdlib) or PostgreSQL (psycopg 3).

Everything the controller knows lives here, so a restart loses nothing: the inventory (devices,
their tags and models, their rollout outcomes), a bounded telemetry window, the device documents
it wrote (pins) and the rollouts with their waves. Both back-ends run the same SQL (``?``
placeholders are rewritten for psycopg); upserts use ``ON CONFLICT`` (SQLite 3.24+, PostgreSQL
9.5+). Writes from the MQTT side come in batches, one transaction each.

Leading a rollout: on PostgreSQL a session-level advisory lock (``pg_try_advisory_lock``) on a
connection of its own, so a replica that dies releases its rollouts with its connection; on
SQLite a lease row with an expiry (one file serves one host).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from edgeagent.errors import ConfigError, EdgeAgentError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY,
  state TEXT NOT NULL DEFAULT 'unknown',
  status_ts DOUBLE PRECISION NOT NULL DEFAULT 0,
  agent_version TEXT NOT NULL DEFAULT '',
  first_seen DOUBLE PRECISION NOT NULL DEFAULT 0,
  last_seen DOUBLE PRECISION NOT NULL DEFAULT 0,
  reported_ts DOUBLE PRECISION NOT NULL DEFAULT 0,
  tags TEXT NOT NULL DEFAULT '[]',
  profile TEXT NOT NULL DEFAULT '',
  last_error TEXT NOT NULL DEFAULT '',
  reported TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS devices_last_seen ON devices (last_seen);
CREATE TABLE IF NOT EXISTS device_tags (
  tag TEXT NOT NULL, device_id TEXT NOT NULL, position INTEGER NOT NULL,
  PRIMARY KEY (tag, device_id));
CREATE INDEX IF NOT EXISTS device_tags_device ON device_tags (device_id);
CREATE TABLE IF NOT EXISTS device_models (
  device_id TEXT NOT NULL, model TEXT NOT NULL, version BIGINT, state TEXT NOT NULL,
  source TEXT NOT NULL, source_kind TEXT NOT NULL, last_error TEXT NOT NULL,
  PRIMARY KEY (device_id, model));
CREATE INDEX IF NOT EXISTS device_models_version ON device_models (model, version);
CREATE TABLE IF NOT EXISTS device_rollouts (
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, outcome TEXT NOT NULL, version BIGINT,
  base BIGINT, error TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (rollout_id, device_id));
CREATE TABLE IF NOT EXISTS telemetry (
  device_id TEXT NOT NULL, received DOUBLE PRECISION NOT NULL, ts DOUBLE PRECISION NOT NULL,
  seq BIGINT NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS telemetry_device ON telemetry (device_id, received);
CREATE TABLE IF NOT EXISTS command_results (
  device_id TEXT NOT NULL, request_id TEXT NOT NULL, received DOUBLE PRECISION NOT NULL,
  body TEXT NOT NULL, PRIMARY KEY (device_id, request_id));
CREATE TABLE IF NOT EXISTS device_docs (
  device_id TEXT PRIMARY KEY, revision BIGINT NOT NULL, models TEXT NOT NULL,
  published INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rollouts (
  rollout_id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT NOT NULL, target TEXT NOT NULL,
  version BIGINT NOT NULL, from_version BIGINT, waves TEXT NOT NULL,
  min_devices INTEGER NOT NULL, max_failures DOUBLE PRECISION NOT NULL,
  wave_timeout_s DOUBLE PRECISION NOT NULL, phase TEXT NOT NULL, wave INTEGER NOT NULL,
  threshold INTEGER NOT NULL, doc_state TEXT NOT NULL, published TEXT NOT NULL DEFAULT '',
  members INTEGER NOT NULL, created DOUBLE PRECISION NOT NULL,
  updated DOUBLE PRECISION NOT NULL, finished DOUBLE PRECISION, reason TEXT NOT NULL,
  publishes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rollout_waves (
  rollout_id TEXT NOT NULL, wave INTEGER NOT NULL, pct DOUBLE PRECISION NOT NULL,
  threshold INTEGER NOT NULL, started DOUBLE PRECISION NOT NULL,
  deadline DOUBLE PRECISION NOT NULL, finished DOUBLE PRECISION, result TEXT NOT NULL,
  counts TEXT NOT NULL, PRIMARY KEY (rollout_id, wave));
CREATE TABLE IF NOT EXISTS rollout_members (
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, bucket INTEGER NOT NULL,
  late INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (rollout_id, device_id));
CREATE INDEX IF NOT EXISTS rollout_members_bucket ON rollout_members (rollout_id, bucket);
CREATE TABLE IF NOT EXISTS leases (
  name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL);
"""


class StoreError(EdgeAgentError):
    """The database refused an operation or cannot be reached."""


@dataclass
class DeviceUpdate:
    """What one batch of messages says about one device (the newest of each kind wins)."""

    seen: float = 0.0
    status: dict[str, Any] | None = None
    reported: dict[str, Any] | None = None
    telemetry: list[tuple[float, int, str]] = field(default_factory=list)
    results: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Batch:
    devices: dict[str, DeviceUpdate] = field(default_factory=dict)

    def device(self, device_id: str) -> DeviceUpdate:
        u = self.devices.get(device_id)
        if u is None:
            u = self.devices[device_id] = DeviceUpdate()
        return u


def _text(value: Any, limit: int = 2000) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for a name (stable across replicas)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Store(ABC):
    """The controller's database. Thread-safe: one lock per connection."""

    placeholder = "?"

    def __init__(self, single_writer: bool = False) -> None:
        self._lock = threading.RLock()
        #: What this writer last wrote per device (tags and models) and per device and
        #: rollout (the outcome); only where no other process writes the same rows.
        self._written: dict[str, Any] | None = {} if single_writer else None
        self._outcomes: dict[tuple[str, str], Any] | None = {} if single_writer else None

    # -- back-end specifics ----------------------------------------------------------------
    @abstractmethod
    def _cursor(self) -> Any: ...

    @abstractmethod
    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        yield None

    @abstractmethod
    def try_lead(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take (or keep) the lead on ``name``; False while another replica holds it."""

    @abstractmethod
    def release(self, name: str, owner: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._transaction() as cur:
            cur.execute(self._sql(sql), params)
            return list(cur.fetchall())

    def _run(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._lock, self._transaction() as cur:
            cur.execute(self._sql(sql), params)

    def init_schema(self) -> None:
        with self._lock, self._transaction() as cur:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute(self._sql("INSERT INTO meta (key, value) VALUES (?, ?) "
                                  "ON CONFLICT (key) DO NOTHING"),
                        ("schema_version", str(SCHEMA_VERSION)))

    # -- ingest ------------------------------------------------------------------------------
    def apply(self, batch: Batch) -> None:  # noqa: PLR0912, PLR0915 - one pass, one transaction
        """Write one batch of device messages in one transaction."""
        if not batch.devices:
            return
        sql = self._sql
        seen_rows: list[tuple[Any, ...]] = []
        status_rows: list[tuple[Any, ...]] = []
        tag_del: list[tuple[Any, ...]] = []
        tag_rows: list[tuple[Any, ...]] = []
        model_del: list[tuple[Any, ...]] = []
        model_rows: list[tuple[Any, ...]] = []
        reported_rows: list[tuple[Any, ...]] = []
        rollout_rows: list[tuple[Any, ...]] = []
        telemetry_rows: list[tuple[Any, ...]] = []
        result_rows: list[tuple[Any, ...]] = []
        new_written: dict[str, Any] = {}
        new_outcomes: dict[tuple[str, str], Any] = {}
        for device_id, u in batch.devices.items():
            seen_rows.append((device_id, u.seen, u.seen))
            if u.status is not None:
                s = u.status
                status_rows.append((s["state"], s["ts"], s["version"], device_id))
            if u.reported is not None:
                r = u.reported
                tags = list(dict.fromkeys(t for t in r.get("tags", []) if isinstance(t, str)))[:64]
                models = _dict(r.get("models"))
                errors = []
                rows = []
                for name, m in list(models.items())[:256]:
                    if not isinstance(m, dict):
                        continue
                    err = _text(m.get("last_error"))
                    if err:
                        errors.append(f"{name}: {err}")
                    rows.append((device_id, str(name)[:128], _int_or_none(m.get("version")),
                                 _text(m.get("state"), 32), _text(m.get("source"), 200),
                                 _text(m.get("source_kind"), 32), err))
                derived = (tuple(tags), tuple(rows))
                # Most re-announcements change nothing: rewrite the derived rows only when
                # they differ from what this writer last wrote (single-writer back-ends).
                if self._written is None or self._written.get(device_id) != derived:
                    tag_del.append((device_id,))
                    tag_rows.extend((t, device_id, i) for i, t in enumerate(tags))
                    model_del.append((device_id,))
                    model_rows.extend(rows)
                    new_written[device_id] = derived
                desired = _dict(r.get("desired"))
                if desired.get("state") in ("refused", "failed") and desired.get("error"):
                    errors.insert(0, f"desired: {_text(desired['error'])}")
                profile = _dict(r.get("profile"))
                raw_ts = r.get("ts")
                ts = float(raw_ts) if isinstance(raw_ts, int | float) else u.seen
                reported_rows.append((json.dumps(tags), _text(profile.get("name"), 128),
                                      "; ".join(errors)[:2000], orjson.dumps(r).decode(), ts,
                                      device_id, ts))
                rollouts = _dict(r.get("rollouts"))
                for rid, o in list(rollouts.items())[:64]:
                    if isinstance(o, dict) and isinstance(o.get("outcome"), str):
                        row = (str(rid)[:128], device_id, o["outcome"][:16],
                               _int_or_none(o.get("version")), _int_or_none(o.get("base")),
                               _text(o.get("error")))
                        if self._outcomes is not None:
                            if self._outcomes.get((row[0], device_id)) == row:
                                continue
                            new_outcomes[(row[0], device_id)] = row
                        rollout_rows.append((*row, ts))
            telemetry_rows.extend((device_id, u.seen, ts, seq, body)
                                  for ts, seq, body in u.telemetry)
            result_rows.extend((device_id, rid, u.seen, body) for rid, body in u.results)
        with self._lock, self._transaction() as cur:
            cur.executemany(sql(
                "INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET last_seen = "
                "CASE WHEN excluded.last_seen > devices.last_seen THEN excluded.last_seen "
                "ELSE devices.last_seen END"), seen_rows)
            if status_rows:
                cur.executemany(sql("UPDATE devices SET state = ?, status_ts = ?, "
                                    "agent_version = ? WHERE device_id = ?"),
                                status_rows)
            if reported_rows:
                cur.executemany(sql("UPDATE devices SET tags = ?, profile = ?, last_error = ?, "
                                    "reported = ?, reported_ts = ? "
                                    "WHERE device_id = ? AND reported_ts <= ?"), reported_rows)
                cur.executemany(sql("DELETE FROM device_tags WHERE device_id = ?"), tag_del)
                cur.executemany(sql("DELETE FROM device_models WHERE device_id = ?"), model_del)
            if tag_rows:
                cur.executemany(sql("INSERT INTO device_tags (tag, device_id, position) "
                                    "VALUES (?, ?, ?) ON CONFLICT DO NOTHING"), tag_rows)
            if model_rows:
                cur.executemany(sql(
                    "INSERT INTO device_models (device_id, model, version, state, source, "
                    "source_kind, last_error) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING"), model_rows)
            if rollout_rows:
                cur.executemany(sql(
                    "INSERT INTO device_rollouts (rollout_id, device_id, outcome, version, base, "
                    "error, ts) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rollout_id, device_id) "
                    "DO UPDATE SET outcome = excluded.outcome, version = excluded.version, "
                    "base = excluded.base, error = excluded.error, ts = excluded.ts "
                    "WHERE excluded.ts >= device_rollouts.ts"), rollout_rows)
            if telemetry_rows:
                cur.executemany(sql("INSERT INTO telemetry (device_id, received, ts, seq, body) "
                                    "VALUES (?, ?, ?, ?, ?)"), telemetry_rows)
            if result_rows:
                cur.executemany(sql(
                    "INSERT INTO command_results (device_id, request_id, received, body) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (device_id, request_id) DO UPDATE SET "
                    "received = excluded.received, body = excluded.body"), result_rows)
        # Only once the transaction committed: a failed write is written again next time.
        if self._written is not None and self._outcomes is not None:
            self._written.update(new_written)
            self._outcomes.update(new_outcomes)

    def prune(self, now: float, stale_after_s: float, window_s: float, max_points: int) -> int:
        """Expire stale devices and old telemetry; returns how many devices left the view."""
        cutoff = now - stale_after_s
        with self._lock, self._transaction() as cur:
            cur.execute(self._sql("SELECT device_id FROM devices WHERE last_seen < ?"), (cutoff,))
            gone = [(r[0],) for r in cur.fetchall()]
            if self._written is not None:
                for (device_id,) in gone:
                    self._written.pop(device_id, None)
            for table in ("device_tags", "device_models", "telemetry", "command_results",
                          "devices"):
                cur.executemany(self._sql(f"DELETE FROM {table} WHERE device_id = ?"),  # noqa: S608
                                gone)
            cur.execute(self._sql("DELETE FROM telemetry WHERE received < ?"), (now - window_s,))
            # Bounded count per device: drop what is beyond the newest max_points.
            cur.execute(self._sql(
                "DELETE FROM telemetry WHERE (device_id, received) IN (SELECT device_id, received "
                "FROM (SELECT device_id, received, ROW_NUMBER() OVER (PARTITION BY device_id "
                "ORDER BY received DESC) AS n FROM telemetry) ranked WHERE n > ?)"), (max_points,))
        return len(gone)

    # -- inventory queries -------------------------------------------------------------------
    def known_devices(self) -> list[str]:
        """Every device in view, most recently seen first (the catch-up order)."""
        return [r[0] for r in self._rows("SELECT device_id FROM devices ORDER BY last_seen DESC")]

    def counts(self, now: float, offline_after_s: float) -> dict[str, Any]:
        cutoff = now - offline_after_s
        rows = self._rows(
            "SELECT CASE WHEN state = 'online' AND last_seen >= ? THEN 'online' "
            "WHEN state = 'online' THEN 'silent' ELSE state END, COUNT(*) FROM devices GROUP BY 1",
            (cutoff,))
        by_state = {str(k): int(n) for k, n in rows}
        groups = self._rows("SELECT tag, COUNT(*) FROM device_tags GROUP BY tag ORDER BY tag")
        models = self._rows("SELECT model, version, source_kind, COUNT(*) FROM device_models "
                            "GROUP BY model, version, source_kind ORDER BY model, version")
        errors = self._rows("SELECT COUNT(*) FROM devices WHERE last_error <> ''")
        out_models: dict[str, dict[str, Any]] = {}
        for model, version, kind, n in models:
            m = out_models.setdefault(model, {"versions": {}, "sources": {}})
            key = str(version) if version is not None else "none"
            m["versions"][key] = m["versions"].get(key, 0) + int(n)
            m["sources"][kind or "unknown"] = m["sources"].get(kind or "unknown", 0) + int(n)
        return {"devices": sum(by_state.values()), "by_state": by_state,
                "groups": {str(t): int(n) for t, n in groups}, "models": out_models,
                "with_errors": int(errors[0][0])}

    def devices(self, *, group: str | None = None, model: str | None = None,
                version: int | None = None, state: str | None = None, after: str = "",
                limit: int = 100, now: float = 0.0,
                offline_after_s: float = 0.0) -> list[dict[str, Any]]:
        """One page of devices in id order, after the cursor ``after``."""
        where: list[str] = ["d.device_id > ?"]
        params: list[Any] = [after]
        if group is not None:
            where.append("d.device_id IN (SELECT device_id FROM device_tags WHERE tag = ?)")
            params.append(group)
        if model is not None or version is not None:
            sub: list[str] = []
            sub_params: list[Any] = []
            if model is not None:
                sub.append("model = ?")
                sub_params.append(model)
            if version is not None:
                sub.append("version = ?")
                sub_params.append(version)
            where.append("d.device_id IN (SELECT device_id FROM device_models WHERE "  # noqa: S608 - fixed fragments, values bound
                         + " AND ".join(sub) + ")")
            params.extend(sub_params)
        cutoff = now - offline_after_s
        if state == "online":
            where.append("d.state = 'online' AND d.last_seen >= ?")
            params.append(cutoff)
        elif state == "silent":
            where.append("d.state = 'online' AND d.last_seen < ?")
            params.append(cutoff)
        elif state is not None:
            where.append("d.state = ?")
            params.append(state)
        params.append(limit)
        sql = ("SELECT d.device_id, d.state, d.last_seen, d.agent_version, d.tags, d.profile, "  # noqa: S608 - fixed fragments, values bound
               "d.last_error, d.first_seen FROM devices d WHERE " + " AND ".join(where)
               + " ORDER BY d.device_id LIMIT ?")
        rows = self._rows(sql, params)
        out = [{"device_id": r[0], "state": r[1], "online": r[1] == "online" and r[2] >= cutoff,
                "last_seen": r[2], "agent_version": r[3], "tags": json.loads(r[4]),
                "profile": r[5], "last_error": r[6], "first_seen": r[7], "models": {}}
               for r in rows]
        if out:
            index = {d["device_id"]: d for d in out}
            marks = ",".join("?" * len(out))
            sql = ("SELECT device_id, model, version, state, source, source_kind, "  # noqa: S608
                   f"last_error FROM device_models WHERE device_id IN ({marks})")
            for device_id, name, ver, st, source, kind, err in self._rows(sql, list(index)):
                index[device_id]["models"][name] = {"version": ver, "state": st, "source": source,
                                                    "source_kind": kind, "last_error": err}
        return out

    def device(self, device_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT device_id, state, status_ts, agent_version, first_seen, "
                          "last_seen, reported_ts, reported FROM devices WHERE device_id = ?",
                          (device_id,))
        if not rows:
            return None
        r = rows[0]
        doc = self.device_doc(device_id)
        return {"device_id": r[0], "state": r[1], "status_ts": r[2], "agent_version": r[3],
                "first_seen": r[4], "last_seen": r[5], "reported_ts": r[6],
                "reported": json.loads(r[7]), "pins": doc[1] if doc else {},
                "pin_revision": doc[0] if doc else 0}

    def telemetry(self, device_id: str, since: float, limit: int) -> list[dict[str, Any]]:
        rows = self._rows("SELECT received, ts, seq, body FROM telemetry WHERE device_id = ? "
                          "AND received >= ? ORDER BY received DESC LIMIT ?",
                          (device_id, since, limit))
        return [{"received": r[0], "ts": r[1], "seq": r[2], **json.loads(r[3])}
                for r in reversed(rows)]

    def groups(self) -> dict[str, int]:
        return {str(t): int(n) for t, n in
                self._rows("SELECT tag, COUNT(*) FROM device_tags GROUP BY tag ORDER BY tag")}

    def target_devices(self, target: str) -> list[tuple[str, str, float]]:
        """(device_id, state, last_seen) of every device a target covers."""
        if target == "fleet":
            return [(r[0], r[1], r[2]) for r in
                    self._rows("SELECT device_id, state, last_seen FROM devices")]
        group = target.removeprefix("group:")
        return [(r[0], r[1], r[2]) for r in self._rows(
            "SELECT d.device_id, d.state, d.last_seen FROM devices d JOIN device_tags t "
            "ON t.device_id = d.device_id WHERE t.tag = ?", (group,))]

    def version_histogram(self, target: str, model: str) -> dict[int, int]:
        if target == "fleet":
            rows = self._rows("SELECT version, COUNT(*) FROM device_models WHERE model = ? "
                              "AND version IS NOT NULL GROUP BY version", (model,))
        else:
            rows = self._rows(
                "SELECT m.version, COUNT(*) FROM device_models m JOIN device_tags t ON "
                "t.device_id = m.device_id WHERE t.tag = ? AND m.model = ? AND m.version IS NOT "
                "NULL GROUP BY m.version", (target.removeprefix("group:"), model))
        return {int(v): int(n) for v, n in rows}

    # -- device documents (pins) -------------------------------------------------------------
    def device_doc(self, device_id: str) -> tuple[int, dict[str, Any]] | None:
        rows = self._rows("SELECT revision, models FROM device_docs WHERE device_id = ?",
                          (device_id,))
        return (int(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def reported_revision(self, device_id: str) -> int:
        """The device-document revision the device last reported having seen."""
        rows = self._rows("SELECT reported FROM devices WHERE device_id = ?", (device_id,))
        if not rows:
            return 0
        desired = json.loads(rows[0][0]).get("desired") or {}
        rev = (desired.get("revisions") or {}).get("device") if isinstance(desired, dict) else 0
        return rev if isinstance(rev, int) and not isinstance(rev, bool) else 0

    def put_device_doc(self, device_id: str, revision: int, models: dict[str, Any]) -> None:
        self._run("INSERT INTO device_docs (device_id, revision, models) VALUES (?, ?, ?) "
                  "ON CONFLICT (device_id) DO UPDATE SET revision = excluded.revision, "
                  "models = excluded.models", (device_id, revision, json.dumps(models)))

    # -- rollouts ----------------------------------------------------------------------------
    ROLLOUT_COLUMNS = ("rollout_id", "kind", "model", "target", "version", "from_version",
                       "waves", "min_devices", "max_failures", "wave_timeout_s", "phase", "wave",
                       "threshold", "doc_state", "published", "members", "created", "updated",
                       "finished", "reason", "publishes")

    def create_rollout(self, row: dict[str, Any], members: Iterable[tuple[str, int]]) -> None:
        cols = self.ROLLOUT_COLUMNS
        with self._lock, self._transaction() as cur:
            cur.execute(self._sql(f"INSERT INTO rollouts ({', '.join(cols)}) VALUES "  # noqa: S608
                                  f"({', '.join('?' * len(cols))})"), [row[c] for c in cols])
            cur.executemany(self._sql("INSERT INTO rollout_members (rollout_id, device_id, "
                                      "bucket) VALUES (?, ?, ?)"),
                            [(row["rollout_id"], d, b) for d, b in members])

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        rows = self._rows(f"SELECT {', '.join(self.ROLLOUT_COLUMNS)} FROM rollouts "  # noqa: S608
                          "WHERE rollout_id = ?", (rollout_id,))
        return dict(zip(self.ROLLOUT_COLUMNS, rows[0], strict=True)) if rows else None

    def rollouts(self, active_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        where = "WHERE phase IN ('running', 'paused', 'reverting') " if active_only else ""
        rows = self._rows(f"SELECT {', '.join(self.ROLLOUT_COLUMNS)} FROM rollouts "  # noqa: S608
                          f"{where}ORDER BY created DESC LIMIT ?", (limit,))
        return [dict(zip(self.ROLLOUT_COLUMNS, r, strict=True)) for r in rows]

    def latest_rollout(self, model: str, target: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT rollout_id FROM rollouts WHERE model = ? AND target = ? "
                          "ORDER BY created DESC LIMIT 1", (model, target))
        return self.rollout(rows[0][0]) if rows else None

    def update_rollout(self, rollout_id: str, expect_phase: str | None = None,
                       **values: Any) -> bool:
        """Update a rollout's row; with ``expect_phase``, only while it is in that phase (a
        compare-and-set between the leader and an operator's request). Returns whether a row
        changed."""
        sets = ", ".join(f"{k} = ?" for k in values)
        where, params = "rollout_id = ?", [*values.values(), rollout_id]
        if expect_phase is not None:
            where += " AND phase = ?"
            params.append(expect_phase)
        with self._lock, self._transaction() as cur:
            cur.execute(self._sql(f"UPDATE rollouts SET {sets} WHERE {where}"),  # noqa: S608
                        params)
            return bool(cur.rowcount)

    def waves(self, rollout_id: str) -> list[dict[str, Any]]:
        cols = ("wave", "pct", "threshold", "started", "deadline", "finished", "result", "counts")
        rows = self._rows(f"SELECT {', '.join(cols)} FROM rollout_waves WHERE "  # noqa: S608
                          "rollout_id = ? ORDER BY wave", (rollout_id,))
        out = []
        for r in rows:
            w = dict(zip(cols, r, strict=True))
            w["counts"] = json.loads(w["counts"]) if w["counts"] else {}
            out.append(w)
        return out

    def put_wave(self, rollout_id: str, wave: int, **values: Any) -> None:
        """Update a wave's row, or insert it (an insert needs every column)."""
        sets = ", ".join(f"{k} = ?" for k in values)
        cols = ["rollout_id", "wave", *values]
        with self._lock, self._transaction() as cur:
            cur.execute(self._sql(f"UPDATE rollout_waves SET {sets} WHERE "  # noqa: S608
                                  "rollout_id = ? AND wave = ?"),
                        [*values.values(), rollout_id, wave])
            if not cur.rowcount:
                cur.execute(self._sql(f"INSERT INTO rollout_waves ({', '.join(cols)}) VALUES "  # noqa: S608
                                      f"({', '.join('?' * len(cols))})"),
                            [rollout_id, wave, *values.values()])

    def member_buckets(self, rollout_id: str, reachable_after: float) -> list[int]:
        """Sorted buckets of the members seen online since ``reachable_after``."""
        rows = self._rows("SELECT m.bucket FROM rollout_members m JOIN devices d ON "
                          "d.device_id = m.device_id WHERE m.rollout_id = ? AND "
                          "d.state = 'online' AND d.last_seen >= ? ORDER BY m.bucket",
                          (rollout_id, reachable_after))
        return [int(r[0]) for r in rows]

    def outcome_histogram(self, rollout_id: str, reachable_after: float,
                          thresholds: Sequence[int]) -> list[tuple[int, str, bool, bool, bool,
                                                                   int]]:
        """(wave, outcome, reachable, late, runs_version, count) over the members.

        ``wave`` is the index of the wave whose bucket range holds the member (``thresholds``
        are the waves' upper bounds; ``len(thresholds)`` for buckets above the last),
        ``outcome`` the device's reported outcome for this rollout ('' when it reported none),
        ``runs_version`` whether its reported model version is the rollout's. Grouped in the
        database, so the rows are a few hundred whatever the fleet's size.
        """
        case = " ".join(f"WHEN m.bucket < ? THEN {i}" for i in range(len(thresholds)))
        wave = f"CASE {case} ELSE {len(thresholds)} END" if thresholds else "0"
        sql = ("SELECT " + wave + ", COALESCE(o.outcome, ''), "
               "CASE WHEN d.state = 'online' AND d.last_seen >= ? THEN 1 ELSE 0 END, m.late, "
               "CASE WHEN dm.version = r.version THEN 1 ELSE 0 END, COUNT(*) "
               "FROM rollout_members m JOIN rollouts r ON r.rollout_id = m.rollout_id "
               "LEFT JOIN devices d ON d.device_id = m.device_id "
               "LEFT JOIN device_rollouts o ON o.rollout_id = m.rollout_id "
               "AND o.device_id = m.device_id "
               "LEFT JOIN device_models dm ON dm.device_id = m.device_id AND dm.model = r.model "
               "WHERE m.rollout_id = ? GROUP BY 1, 2, 3, 4, 5")
        rows = self._rows(sql, (*thresholds, reachable_after, rollout_id))
        return [(int(w), str(o), bool(re), bool(la), bool(rv), int(n))
                for w, o, re, la, rv, n in rows]

    def pending_members(self, rollout_id: str, threshold: int, reachable_after: float,
                        done: tuple[str, ...], limit: int) -> list[str]:
        """Reachable in-share members whose reported outcome is not one of ``done`` (the
        devices a wave still waits for)."""
        marks = ", ".join("?" * len(done))
        sql = ("SELECT m.device_id FROM rollout_members m JOIN devices d ON "  # noqa: S608
               "d.device_id = m.device_id LEFT JOIN device_rollouts o ON o.rollout_id = "
               "m.rollout_id AND o.device_id = m.device_id WHERE m.rollout_id = ? AND "
               "m.bucket < ? AND m.late = 0 AND d.state = 'online' AND d.last_seen >= ? AND "
               f"(o.outcome IS NULL OR o.outcome NOT IN ({marks})) LIMIT ?")
        return [r[0] for r in self._rows(sql, (rollout_id, threshold, reachable_after, *done,
                                               limit))]

    def mark_late(self, rollout_id: str, threshold: int, reachable_after: float) -> int:
        """Mark the in-share members still without an answer as late (the wave's deadline
        passed); returns how many."""
        with self._lock, self._transaction() as cur:
            cur.execute(self._sql(
                "UPDATE rollout_members SET late = 1 WHERE rollout_id = ? AND bucket < ? "
                "AND late = 0 AND device_id IN (SELECT d.device_id FROM devices d WHERE "
                "d.state = 'online' AND d.last_seen >= ?) AND device_id NOT IN (SELECT "
                "device_id FROM device_rollouts WHERE rollout_id = ? AND outcome IN "
                "('applied', 'failed', 'held'))"),
                (rollout_id, threshold, reachable_after, rollout_id))
            return int(cur.rowcount or 0)


class SqliteStore(Store):
    """SQLite in WAL mode, one connection shared under the lock."""

    def __init__(self, path: Path) -> None:
        super().__init__(single_writer=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                       timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from exc
        self.path = path

    def _cursor(self) -> Any:
        return self._db.cursor()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        cur = self._db.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            yield cur
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.rollback()
            raise StoreError(f"database: {exc}") from exc
        except BaseException:
            if self._db.in_transaction:
                self._db.rollback()
            raise
        finally:
            cur.close()

    def try_lead(self, name: str, owner: str, ttl_s: float) -> bool:
        now = time.time()
        with self._lock, self._transaction() as cur:
            cur.execute("SELECT owner, expires FROM leases WHERE name = ?", (name,))
            row = cur.fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            cur.execute("INSERT INTO leases (name, owner, expires) VALUES (?, ?, ?) ON CONFLICT "
                        "(name) DO UPDATE SET owner = excluded.owner, expires = excluded.expires",
                        (name, owner, now + ttl_s))
            return True

    def release(self, name: str, owner: str) -> None:
        self._run("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresStore(Store):
    """PostgreSQL through psycopg 3: one connection for queries, one holding advisory locks."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError("a postgresql:// database needs psycopg: "
                              "pip install 'edgeagent[postgres]'", "database.url") from exc
        self._psycopg = psycopg
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
            self._locks = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        self._lock_guard = threading.Lock()
        self._held: set[str] = set()

    def _cursor(self) -> Any:
        return self._db.cursor()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        try:
            with self._db.transaction(), self._db.cursor() as cur:
                yield cur
        except self._psycopg.Error as exc:
            raise StoreError(f"database: {exc}") from exc

    def init_schema(self) -> None:
        # Replicas starting together must not race on CREATE TABLE IF NOT EXISTS.
        with self._lock_guard, self._locks.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key("edgeagent-fleet:schema"),))
            try:
                super().init_schema()
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)",
                            (lock_key("edgeagent-fleet:schema"),))

    def try_lead(self, name: str, owner: str, ttl_s: float) -> bool:
        with self._lock_guard:
            if name in self._held:
                return True
            try:
                with self._locks.cursor() as cur:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(name),))
                    row = cur.fetchone()
            except self._psycopg.Error as exc:
                raise StoreError(f"database: {exc}") from exc
            if row and row[0]:
                self._held.add(name)
                return True
            return False

    def release(self, name: str, owner: str) -> None:
        with self._lock_guard:
            if name in self._held:
                self._held.discard(name)
                with self._locks.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (lock_key(name),))

    def close(self) -> None:
        with self._lock, self._lock_guard:
            self._db.close()
            self._locks.close()


def open_store(url: str) -> Store:
    """The store for a ``[database] url``: a path, ``sqlite:///PATH`` or ``postgresql://``.

    Raises:
        ConfigError: psycopg missing for a PostgreSQL URL.
        StoreError: the database cannot be opened or reached.
    """
    if url.startswith(("postgresql://", "postgres://")):
        store: Store = PostgresStore(url)
    else:
        store = SqliteStore(Path(url.removeprefix("sqlite://")))
    store.init_schema()
    return store
