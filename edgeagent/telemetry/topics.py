"""The MQTT topic names (DESIGN 3.5), in one place for the agent and the fleet side."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Request ids and group names: what may sit in one topic level.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass(frozen=True)
class Topics:
    """Topics of one device under a prefix (default ``edgeagent``)."""

    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def reported(self) -> str:
        return f"{self.base}/reported"

    @property
    def desired(self) -> str:
        return f"{self.base}/desired"

    @property
    def commands(self) -> str:
        """The subscription filter for commands (one level: results do not match it)."""
        return f"{self.base}/cmd/+"

    def command(self, request_id: str) -> str:
        return f"{self.base}/cmd/{request_id}"

    def result(self, request_id: str) -> str:
        return f"{self.base}/cmd/{request_id}/result"

    def group_desired(self, group: str) -> str:
        return group_desired(self.prefix, group)

    def group_rollouts(self, group: str) -> str:
        """The subscription filter for a group's rollouts (one per model)."""
        return group_rollout(self.prefix, group, "+")

    @property
    def fleet_rollouts(self) -> str:
        """The subscription filter for the fleet-wide rollouts."""
        return fleet_rollout(self.prefix, "+")


def group_desired(prefix: str, group: str) -> str:
    """``{prefix}/groups/{group}/desired``."""
    return f"{prefix}/groups/{group}/desired"


def group_rollout(prefix: str, group: str, model: str) -> str:
    """``{prefix}/groups/{group}/rollouts/{model}``: a group's rollout of one model."""
    return f"{prefix}/groups/{group}/rollouts/{model}"


def fleet_rollout(prefix: str, model: str) -> str:
    """``{prefix}/fleet/rollouts/{model}``: the fleet-wide rollout of one model."""
    return f"{prefix}/fleet/rollouts/{model}"


def device_of(prefix: str, topic: str) -> str | None:
    """The device id in ``{prefix}/{id}/...`` (None for group topics and other prefixes)."""
    head, sep, rest = topic.partition("/")
    if head != prefix or not sep:
        return None
    device, _, _ = rest.partition("/")
    return None if device in ("groups", "fleet") else device
