"""Desired state: which model versions a fleet manager wants on this device, and reconciling.

A desired-state document (retained on ``{prefix}/{id}/desired`` or
``{prefix}/groups/{group}/desired``)::

    {"revision": 7, "models": {"NAME": {"version": 3}}}

Group documents apply to devices tagged with the group (``[agent] tags``); the device's own
document wins per model; between groups, the first tag in ``[agent] tags`` wins. An empty
retained payload withdraws a document.

This module parses the documents; the version owner (:mod:`edgeagent.versions.owner`) checks
them (a model or version the box cannot get refuses the whole document, and the documents held
before stay), keeps them, and decides each model's version from them with the other sources.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from edgeagent.control.rollout import load_object
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
    doc = load_object(payload, MAX_DESIRED_BYTES, {"revision", "models", "ts"},
                      DesiredStateError)
    revision = doc.get("revision")
    if isinstance(revision, bool) or not isinstance(revision, int) or not 0 <= revision < 2**63:
        raise DesiredStateError(f"revision: expected an integer >= 0, got {revision!r}")
    models = doc.get("models")
    if not isinstance(models, dict):
        raise DesiredStateError(f"models: expected an object, got {models!r}")
    out: dict[str, int] = {}
    for name, entry in models.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise DesiredStateError(f"models: {name!r} is not a model name")
        if not isinstance(entry, dict) or set(entry) != {"version"}:
            raise DesiredStateError(f"models.{name}: expected {{\"version\": N}}, got {entry!r}")
        version = entry["version"]
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**63:
            raise DesiredStateError(f"models.{name}.version: expected an integer >= 1, "
                                    f"got {version!r}")
        out[name] = version
    return DesiredDoc(revision, out)


def revision_hint(payload: bytes) -> int:
    """The revision of a refused document when it can still be read (-1 otherwise), so a fleet
    manager waiting on that revision sees the refusal."""
    if len(payload) > MAX_DESIRED_BYTES:
        return -1  # an oversized document is not parsed at all
    try:
        revision = orjson.loads(payload).get("revision")
    except (orjson.JSONDecodeError, AttributeError):
        return -1
    ok = isinstance(revision, int) and not isinstance(revision, bool) and 0 <= revision < 2**63
    return revision if ok else -1
