"""Staged rollouts: the retained rollout document and the device's bucket (DESIGN 3.5).

A rollout is one retained document per target, written by the fleet controller:
``{prefix}/groups/{group}/rollouts/{model}`` for a group, ``{prefix}/fleet/rollouts/{model}``
for the whole fleet::

    {"rollout_id": "r-12", "model": "classifier", "version": 3, "share": 25.0,
     "state": "running", "ts": 1764576000.0}

``share`` is the percentage of the target that should run ``version`` now (0 to 100, in
0.01 % steps); ``state`` is ``running``, ``paused``, ``aborted`` or ``done``. An empty retained
payload withdraws the document. Advancing a wave is one re-publish with a higher share;
aborting is one publish with ``"state": "aborted"``.

Each device decides for itself whether it is in the share: its bucket is the first 8 bytes of
SHA-256 of ``"{rollout_id}/{device_id}"`` (UTF-8), big-endian, modulo 10,000; it is in the share
when ``bucket < share * 100``. The controller computes the same buckets from its inventory.
This module is shared by the agent and the fleet side so both compute the same thing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import orjson

from edgeagent.errors import EdgeAgentError
from edgeagent.telemetry.topics import NAME_RE

#: Buckets per rollout: a share has 0.01 % steps.
BUCKETS = 10_000
#: Largest rollout document accepted (a few hundred bytes in practice).
MAX_ROLLOUT_BYTES = 4096
STATES = ("running", "paused", "aborted", "done")
#: States in which a device inside the share runs the rollout's version.
ACTIVE_STATES = ("running", "paused", "done")


class RolloutError(EdgeAgentError):
    """A rollout document is malformed."""


def load_object(payload: bytes, limit: int, keys: set[str] | None,
                error: type[EdgeAgentError]) -> dict[str, Any]:
    """A fleet document's JSON object, bounded: size first, then orjson (nesting depth and
    integer size), then no keys beyond ``keys`` (None: any keys, as commands take).

    Raises:
        error: naming what is wrong.
    """
    if len(payload) > limit:
        raise error(f"payload of {len(payload)} bytes exceeds {limit}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise error(f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise error("expected a JSON object")
    if keys is not None and (unknown := sorted(set(doc) - keys)):
        raise error(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")
    return doc


def bucket(rollout_id: str, device_id: str) -> int:
    """The device's bucket for a rollout, in ``[0, 10000)``."""
    digest = hashlib.sha256(f"{rollout_id}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def share_threshold(share: float) -> int:
    """How many buckets a share covers: a device is in when ``bucket < share_threshold``."""
    return max(0, min(BUCKETS, round(share * 100)))


def in_share(rollout_id: str, device_id: str, share: float) -> bool:
    """Whether the device is in the current share of the rollout."""
    return bucket(rollout_id, device_id) < share_threshold(share)


@dataclass(frozen=True)
class RolloutDoc:
    """One parsed rollout document."""

    rollout_id: str
    model: str
    version: int
    share: float
    state: str
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rollout_id": self.rollout_id, "model": self.model, "version": self.version,
                "share": self.share, "state": self.state, "ts": self.ts}

    def payload(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def describe(self) -> str:
        """How a model's source reads when this rollout decided it."""
        return f"rollout {self.rollout_id} at {self.share:g} %"


def _number(doc: dict[str, Any], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RolloutError(f"{key}: expected a number, got {value!r}")
    return float(value)


def parse_rollout(payload: bytes, model: str | None = None) -> RolloutDoc | None:
    """Parse a rollout payload; None for an empty (withdrawn) one.

    Args:
        payload: The retained message.
        model: The model the topic names; the document must agree.

    Raises:
        RolloutError: naming what is wrong (size, JSON, a key, a type, a range).
    """
    if not payload:
        return None
    doc = load_object(payload, MAX_ROLLOUT_BYTES,
                      {"rollout_id", "model", "version", "share", "state", "ts"}, RolloutError)
    rollout_id = doc.get("rollout_id")
    if not isinstance(rollout_id, str) or not NAME_RE.match(rollout_id):
        raise RolloutError(f"rollout_id: expected an id of letters, digits, '_', '.', ':', '-', "
                           f"got {rollout_id!r}")
    name = doc.get("model")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RolloutError(f"model: expected a model name, got {name!r}")
    if model is not None and name != model:
        raise RolloutError(f"model: the document names {name!r} on the topic of {model!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**63:
        raise RolloutError(f"version: expected an integer >= 1, got {version!r}")
    share = _number(doc, "share")
    if not 0 <= share <= 100:
        raise RolloutError(f"share: expected a percentage from 0 to 100, got {share:g}")
    state = doc.get("state")
    if state not in STATES:
        raise RolloutError(f"state: expected one of {', '.join(STATES)}, got {state!r}")
    ts = _number(doc, "ts") if "ts" in doc else 0.0
    return RolloutDoc(rollout_id, name, version, share, state, ts)
