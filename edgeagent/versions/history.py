"""The one persisted history of model versions on this box: ``state_dir/versions.json``.

Per model: the active version, the previous ones (newest first, for rollback), the versions
that failed here and why, the operator's pin, and for ``path`` models the content hash of each
local version. Beside it, the fleet documents last received (device and group desired
documents, rollouts, and each rollout's base), so a box that restarts without its broker keeps
honouring the fleet instead of drifting to the configuration's ``latest``.

Hub and ``path`` models share it: rollback works the same for both and survives a restart.
Every write goes through :func:`edgeagent.fsutil.write_json_atomic` under an flock, so the agent
and an operator's command in another process (agent stopped) never lose each other's changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from edgeagent.errors import EdgeAgentError
from edgeagent.fsutil import locked, write_json_atomic

log = logging.getLogger(__name__)

SCHEMA = 2
STATE_FILE = "versions.json"
#: Rollout bases remembered (the oldest rollout ids are forgotten first).
MAX_BASES = 256


class StateError(EdgeAgentError):
    """The state file cannot be read."""


@dataclass
class ModelHistory:
    """What this box ran and may run of one model."""

    active: int | None = None
    previous: list[int] = field(default_factory=list)
    """Versions active before, newest first (kept for rollback)."""
    failed: dict[int, str] = field(default_factory=dict)
    """Versions that failed to activate here, with why: not tried again unless asked for."""
    operator_pin: int | None = None
    """A version the box's operator pinned (``pull NAME@V``, ``rollback``)."""
    local: dict[int, str] = field(default_factory=dict)
    """``path`` models: version -> SHA-256 of the file that version was."""

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous,
                "failed": {str(k): v for k, v in sorted(self.failed.items())},
                "operator_pin": self.operator_pin,
                "local": {str(k): v for k, v in sorted(self.local.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelHistory:
        return cls(_opt_int(data.get("active")), [int(v) for v in data.get("previous", [])],
                   {int(k): str(v) for k, v in (data.get("failed") or {}).items()},
                   _opt_int(data.get("operator_pin")),
                   {int(k): str(v) for k, v in (data.get("local") or {}).items()})

    def record_active(self, version: int, keep: int) -> None:
        if self.active != version:
            older = [v for v in [self.active, *self.previous] if v is not None and v != version]
            self.previous = older[:keep]
        self.active = version
        self.failed.pop(version, None)

    def kept(self) -> set[int]:
        """Versions whose files must stay on disk."""
        out = {v for v in (self.active, self.operator_pin) if v is not None}
        return out | set(self.previous)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass
class FleetState:
    """The fleet documents last received, as raw JSON-ready documents."""

    device: dict[str, Any] | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollouts: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """target (``group:NAME`` or ``fleet``) -> model -> rollout document."""
    bases: dict[str, int | None] = field(default_factory=dict)
    """rollout id -> the version this device ran when it first saw it."""
    outcome: dict[str, Any] = field(default_factory=dict)
    """The desired-state outcome last reported."""
    switched: list[str] = field(default_factory=list)
    """Rollout ids whose version this device ran at some point (an abort then "reverts" it)."""

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "groups": self.groups, "rollouts": self.rollouts,
                "bases": self.bases, "outcome": self.outcome, "switched": self.switched}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FleetState:
        return cls(data.get("device"), dict(data.get("groups") or {}),
                   {t: dict(m) for t, m in (data.get("rollouts") or {}).items()},
                   dict(data.get("bases") or {}), dict(data.get("outcome") or {}),
                   [str(r) for r in data.get("switched") or []])

    def remember_base(self, rollout_id: str, base: int | None) -> None:
        if rollout_id in self.bases:
            return
        self.bases[rollout_id] = base
        while len(self.bases) > MAX_BASES:
            del self.bases[next(iter(self.bases))]

    def remember_switch(self, rollout_id: str) -> None:
        if rollout_id not in self.switched:
            self.switched = [*self.switched, rollout_id][-MAX_BASES:]


@dataclass
class VersionState:
    """The whole file."""

    models: dict[str, ModelHistory] = field(default_factory=dict)
    fleet: FleetState = field(default_factory=FleetState)

    def model(self, name: str) -> ModelHistory:
        return self.models.setdefault(name, ModelHistory())

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA,
                "models": {n: h.to_dict() for n, h in sorted(self.models.items())},
                "fleet": self.fleet.to_dict()}


class History:
    """Reads and writes ``state_dir/versions.json`` (blocking: call from an executor, except
    the small writes the owner makes while it holds a model's lock).

    Args:
        state_dir: The agent's state directory.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        self._lock_file = state_dir / f".{STATE_FILE}.lock"
        self._legacy = state_dir / "hub" / "state.json"

    def read(self) -> VersionState:
        """The state on disk (empty when there is none; migrated from the old hub state).

        Raises:
            StateError: the file is unreadable (names the file and what to do).
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return self._migrate()
        except OSError as exc:
            raise StateError(f"{self.path}: unreadable ({exc.strerror})") from exc
        try:
            doc = orjson.loads(raw)
            return VersionState({n: ModelHistory.from_dict(m) for n, m in doc["models"].items()},
                                FleetState.from_dict(doc.get("fleet") or {}))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"{self.path}: not a state file this agent can read ({exc}); move "
                             "it aside to start over (the store's files stay)") from exc

    def modify(self, change: Callable[[VersionState], None]) -> VersionState:
        """Read, apply ``change``, write back atomically, all under the lock."""
        with locked(self._lock_file):
            state = self.read()
            change(state)
            write_json_atomic(self.path, state.to_dict())
            return state

    def _migrate(self) -> VersionState:
        """Carry over what the hub's state file of earlier releases knew: active, previous and
        failed versions. Its pins are not carried over: they could not tell an operator's pin
        from one a fleet deploy left, and the fleet's documents arrive again over MQTT."""
        try:
            doc = orjson.loads(self._legacy.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return VersionState()
        state = VersionState()
        for name, m in (doc.get("models") or {}).items():
            try:
                state.models[name] = ModelHistory(
                    _opt_int(m.get("active")), [int(v) for v in m.get("previous", [])],
                    {int(k): str(v) for k, v in (m.get("failed") or {}).items()})
            except (TypeError, ValueError, AttributeError):
                continue
            if m.get("desired") is not None or m.get("requested") is not None:
                log.warning("model %s: the pin or request in %s is not carried over; pin it "
                            "again with 'edgeagent pull %s@VERSION' if it was yours",
                            name, self._legacy, name)
        return state
