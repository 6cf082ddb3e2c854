"""The telemetry spool: a bounded, crash-safe SQLite queue that every telemetry message passes.

A message is inserted (with the next ``seq``, allocated in the same transaction), published at
QoS 1, and deleted when the broker acknowledges it. Whatever the broker has not acknowledged
stays on disk and is sent again, oldest first, once the broker is back; this survives restarts
and power cuts (``synchronous=FULL``: a committed message is on disk).

The bound (messages and bytes) forces the oldest messages out; how many were forced out is kept
in the same database and reported in telemetry (``spool.dropped``) so a receiver can tell a gap
the bound caused from a loss.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeagent.errors import EdgeAgentError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class SpooledMessage:
    """One message waiting for the broker's acknowledgement."""

    seq: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class SpoolStats:
    """What the spool holds: ``depth`` messages of ``bytes`` in all; ``dropped`` ever forced out."""

    depth: int
    bytes: int
    dropped: int
    next_seq: int

    def to_dict(self) -> dict[str, int]:
        return {"depth": self.depth, "bytes": self.bytes, "dropped": self.dropped,
                "next_seq": self.next_seq}


#: Builds a message's payload once its ``seq`` is known (and the spool's figures before it).
PayloadBuilder = Callable[[int, SpoolStats], bytes]


class Spool:
    """A bounded on-disk FIFO of telemetry messages, safe to call from any thread.

    Args:
        path: The SQLite database file (created with its folder).
        max_messages: Most messages kept; the oldest are forced out beyond it.
        max_bytes: Most payload bytes kept; the oldest are forced out beyond it.

    Raises:
        EdgeAgentError: the database cannot be opened (permissions, a full disk).
    """

    def __init__(self, path: Path, max_messages: int, max_bytes: int) -> None:
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open(path)
        except (OSError, sqlite3.Error) as exc:
            raise EdgeAgentError(f"cannot open the telemetry spool {path}: {exc}") from exc

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            return db

        try:
            return connect()
        except sqlite3.DatabaseError as exc:
            if "not a database" not in str(exc) and "malformed" not in str(exc):
                raise
        # A file that is not a database cannot be repaired: keep it for a post-mortem and start
        # over, since refusing to spool at all would lose every message from now on.
        aside = path.with_name(path.name + ".corrupt")
        log.error("telemetry spool %s is corrupt; moved to %s, starting a new one", path, aside)
        path.replace(aside)
        return connect()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _stats(self) -> SpoolStats:
        depth, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages").fetchone()
        return SpoolStats(int(depth), int(size), self._meta("dropped"), self._meta("next_seq") or 1)

    def add(self, topic: str, build: PayloadBuilder) -> int:
        """Allocate the next ``seq``, build the payload with it, store it; return the seq.

        The seq and the message are committed together, so a seq is never reused, even across
        a power cut. Messages beyond the bound are forced out, oldest first, and counted.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._stats()
                seq = before.next_seq
                payload = build(seq, before)
                self._db.execute("INSERT INTO messages (seq, topic, payload) VALUES (?, ?, ?)",
                                 (seq, topic, payload))
                self._set_meta("next_seq", seq + 1)
                forced = self._enforce_bound(before.depth + 1, before.bytes + len(payload))
                if forced:
                    self._set_meta("dropped", before.dropped + forced)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if forced:
            log.warning("telemetry spool full (%d messages / %d bytes max): dropped the %d oldest",
                        self.max_messages, self.max_bytes, forced)
        return seq

    def _enforce_bound(self, depth: int, size: int) -> int:
        forced = 0
        while depth > self.max_messages or size > self.max_bytes:
            row = self._db.execute(
                "SELECT seq, LENGTH(payload) FROM messages ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                break
            self._db.execute("DELETE FROM messages WHERE seq = ?", (row[0],))
            depth, size, forced = depth - 1, size - int(row[1]), forced + 1
        return forced

    def peek(self, limit: int = 64) -> list[SpooledMessage]:
        """The oldest messages, in seq order, without removing them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload FROM messages ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [SpooledMessage(int(s), str(t), bytes(p)) for s, t, p in rows]

    def remove(self, seqs: Iterable[int]) -> None:
        """Forget messages the broker acknowledged (one transaction)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in seqs])
            self._db.execute("COMMIT")

    def stats(self) -> SpoolStats:
        with self._lock:
            return self._stats()

    def close(self) -> None:
        with self._lock:
            self._db.close()
