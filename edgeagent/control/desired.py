"""Desired state: which model versions a fleet manager wants on this device, and reconciling.

A desired-state document (retained on ``{prefix}/{id}/desired`` or
``{prefix}/groups/{group}/desired``)::

    {"revision": 7, "models": {"NAME": {"version": 3}}}

Group documents apply to devices tagged with the group (``[agent] tags``); the device's own
document wins per model; between groups, the first tag in ``[agent] tags`` wins. An empty
retained payload withdraws a document.

Reconciling is all or nothing: every change is checked first (the model is known, the hub has
the version), and a refusal changes nothing; then each change is activated (fetch, verify, load,
check); if one fails, those already activated go back to their previous versions. The outcome
(``applied``, ``refused``, ``failed``) and the revisions it answers are reported in the reported
state and kept in ``state_dir`` across restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeagent.errors import EdgeAgentError
from edgeagent.telemetry.topics import NAME_RE

log = logging.getLogger(__name__)

#: Largest desired-state payload accepted (a fleet with hundreds of models fits easily).
MAX_DESIRED_BYTES = 64 * 1024


class DesiredStateError(EdgeAgentError):
    """A desired-state document is malformed."""


@dataclass(frozen=True)
class DesiredDoc:
    """One parsed document: a revision and the version wanted per model."""

    revision: int
    models: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision,
                "models": {n: {"version": v} for n, v in sorted(self.models.items())}}


def parse_desired(payload: bytes) -> DesiredDoc | None:
    """Parse a desired-state payload; None for an empty (withdrawn) one.

    Raises:
        DesiredStateError: naming what is wrong (size, JSON, a key, a type).
    """
    if not payload:
        return None
    if len(payload) > MAX_DESIRED_BYTES:
        raise DesiredStateError(f"payload of {len(payload)} bytes exceeds {MAX_DESIRED_BYTES}")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DesiredStateError(f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DesiredStateError("expected a JSON object")
    unknown = sorted(set(doc) - {"revision", "models", "ts"})
    if unknown:
        raise DesiredStateError(f"unknown key {unknown[0]!r} (known: revision, models)")
    revision = doc.get("revision")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise DesiredStateError(f"revision: expected an integer >= 0, got {revision!r}")
    models = doc.get("models")
    if not isinstance(models, dict):
        raise DesiredStateError(f"models: expected an object, got {models!r}")
    out: dict[str, int] = {}
    for name, entry in models.items():
        if not NAME_RE.match(name):
            raise DesiredStateError(f"models: {name!r} is not a model name")
        if not isinstance(entry, dict) or set(entry) != {"version"}:
            raise DesiredStateError(f"models.{name}: expected {{\"version\": N}}, got {entry!r}")
        version = entry["version"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DesiredStateError(f"models.{name}.version: expected an integer >= 1, "
                                    f"got {version!r}")
        out[name] = version
    return DesiredDoc(revision, out)


class Deployer(Protocol):
    """What reconciling needs from the model side (the hub plugs in here).

    ``check`` has no side effects; ``activate`` leaves the old version serving on failure.
    """

    def active_version(self, name: str) -> int | None:
        """The version serving now, or None."""

    async def check(self, name: str, version: int) -> None:
        """Raise (ModelNotFound, HubError, ...) unless ``version`` of ``name`` can be deployed."""

    async def activate(self, name: str, version: int) -> None:
        """Fetch, verify, load and check ``version``, then make it the active one."""

    async def rollback(self, name: str) -> int:
        """Go back to the version active before the current one; return it."""

    async def sync(self) -> None:
        """Refresh what the model source knows (hub metadata)."""


@dataclass
class Outcome:
    """The result of the last reconciliation, reported as ``reported.desired``."""

    state: str = "none"
    """``none`` (nothing desired yet), ``applied``, ``refused`` or ``failed``."""
    revisions: Mapping[str, int] | None = None
    """Revision per source (``device``, ``group:NAME``) this outcome answers."""
    models: Mapping[str, int] | None = None
    error: str = ""
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "revisions": dict(self.revisions or {}),
                "models": dict(self.models or {}), "error": self.error, "ts": self.ts}


def atomic_write_json(path: Path, doc: Any) -> None:
    """Write JSON so a power cut leaves the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Reconciler:
    """Holds the desired-state documents and applies their merge, one reconciliation at a time.

    Args:
        deployer: The model side.
        groups: The device's groups (``[agent] tags``), in precedence order.
        state_file: Where the last outcome is kept across restarts.
    """

    def __init__(self, deployer: Deployer, groups: tuple[str, ...], state_file: Path) -> None:
        self.deployer = deployer
        self.groups = groups
        self.state_file = state_file
        self._docs: dict[str, DesiredDoc] = {}
        self._errors: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self.outcome = self._load()

    def _load(self) -> Outcome:
        try:
            doc = json.loads(self.state_file.read_text(encoding="utf-8"))
            return Outcome(doc["state"], doc["revisions"], doc["models"], doc["error"], doc["ts"])
        except (OSError, ValueError, KeyError, TypeError):
            return Outcome()

    def _finish(self, outcome: Outcome) -> Outcome:
        outcome.ts = time.time()
        self.outcome = outcome
        atomic_write_json(self.state_file, outcome.to_dict())
        log.info("desired state %s: %s%s", outcome.revisions, outcome.state,
                 f" ({outcome.error})" if outcome.error else "")
        return outcome

    def sources(self) -> list[str]:
        return ["device", *(f"group:{g}" for g in self.groups)]

    def revisions(self) -> dict[str, int]:
        return {s: self._docs[s].revision for s in self.sources() if s in self._docs}

    def merged(self) -> dict[str, tuple[int, str]]:
        """Version and source per model: the device wins, then groups in tag order."""
        out: dict[str, tuple[int, str]] = {}
        for source in self.sources():
            doc = self._docs.get(source)
            for name, version in (doc.models if doc else {}).items():
                out.setdefault(name, (version, source))
        return out

    async def receive(self, source: str, payload: bytes) -> Outcome | None:
        """A (retained) document arrived for ``source``; reconcile unless it is malformed.

        A malformed document is refused and reported; the documents already held stay as they
        are, so nothing is half-applied. Returns the outcome (None when nothing changed).
        """
        try:
            doc = parse_desired(payload)
        except DesiredStateError as exc:
            revisions = {**self.revisions(), source: _revision_hint(payload)}
            return self._finish(Outcome("refused", revisions, self.outcome.models,
                                        f"{source}: {exc}"))
        if doc is None:
            self._docs.pop(source, None)
        else:
            self._docs[source] = doc
        return await self.reconcile()

    async def reconcile(self, force: bool = False) -> Outcome | None:
        """Bring the active versions to the merged desired state (all or nothing)."""
        async with self._lock:
            merged = self.merged()
            revisions = self.revisions()
            wanted = {n: v for n, (v, _) in merged.items()}
            if not revisions:
                return None
            changes = {n: v for n, v in wanted.items()
                       if self.deployer.active_version(n) != v}
            if (not force and not changes and self.outcome.state == "applied"
                    and dict(self.outcome.revisions or {}) == revisions):
                return None
            for name, version in sorted(changes.items()):
                try:
                    await self.deployer.check(name, version)
                except EdgeAgentError as exc:
                    return self._finish(Outcome("refused", revisions, wanted,
                                                f"{name} version {version}: {exc}"))
            done: list[tuple[str, int | None]] = []
            for name, version in sorted(changes.items()):
                previous = self.deployer.active_version(name)
                try:
                    await self.deployer.activate(name, version)
                except EdgeAgentError as exc:
                    await self._undo(done)
                    return self._finish(Outcome("failed", revisions, wanted,
                                                f"{name} version {version}: {exc}"))
                done.append((name, previous))
            return self._finish(Outcome("applied", revisions, wanted))

    async def _undo(self, done: list[tuple[str, int | None]]) -> None:
        for name, previous in reversed(done):
            if previous is None:
                continue
            try:
                await self.deployer.activate(name, previous)
            except EdgeAgentError as exc:
                log.error("model %s: could not go back to version %d: %s", name, previous, exc)

    def report(self) -> dict[str, Any]:
        """The ``desired`` entry of the reported state."""
        return self.outcome.to_dict()


def _revision_hint(payload: bytes) -> int:
    """The revision of a refused document when it can still be read (-1 otherwise), so a fleet
    manager waiting on that revision sees the refusal."""
    try:
        revision = json.loads(payload).get("revision")
    except (ValueError, AttributeError):
        return -1
    return revision if isinstance(revision, int) and not isinstance(revision, bool) else -1
