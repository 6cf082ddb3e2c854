"""What a configuration reload (SIGHUP) changes: a pure comparison of two configurations.

Live: the log level and format, the shutdown grace period, and the ``[[models]]`` list (added
models are loaded, removed ones unloaded, a changed source reloaded, changed limits applied).
Everything else (listen address, state directory, token, hub, broker, device identity) is
reported and waits for a restart: the running agent keeps its old value, so what it reports
stays what it does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgeagent.config import AgentConfig, ModelSection

#: [agent] keys that take effect without a restart.
LIVE_AGENT_KEYS = ("log_level", "log_format", "shutdown_grace_s")
#: Model keys that only change scheduling; any other changed key means loading the model anew.
LIMIT_KEYS = ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "max_concurrency")


@dataclass(frozen=True)
class ReloadPlan:
    """The outcome of comparing the running configuration with a newly read one."""

    config: AgentConfig
    """The configuration to run on: the old one with the live parts of the new one."""
    load: tuple[str, ...] = ()
    """Models added, or whose source (path, version) changed."""
    unload: tuple[str, ...] = ()
    """Models no longer configured."""
    limits: tuple[str, ...] = ()
    """Models whose scheduling limits changed (and that are not reloaded anyway)."""
    restart_keys: tuple[str, ...] = ()
    """Changed keys that only a restart applies, as key paths (``http.listen``)."""
    failed: tuple[str, ...] = ()
    """``name: why`` for models that were to be loaded and do not serve what they should."""

    def summary(self) -> str:
        """One line for the log and systemd's STATUS=."""
        parts = []
        failed = {f.split(":", 1)[0] for f in self.failed}
        loaded = tuple(n for n in self.load if n not in failed)
        for label, names in (("loaded", loaded), ("unloaded", self.unload),
                             ("new limits", self.limits), ("not loaded", self.failed)):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        if self.restart_keys:
            parts.append(f"needs a restart to apply: {', '.join(self.restart_keys)}")
        return "; ".join(parts) or "no change"


def _changed_keys(old: Any, new: Any, section: str) -> list[str]:
    return [f"{section}.{f.name}" for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)]


def _source(m: ModelSection) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(m).items() if k not in LIMIT_KEYS}


def plan_reload(old: AgentConfig, new: AgentConfig) -> ReloadPlan:
    """Compare the running configuration with a new one; no I/O."""
    restart: list[str] = []
    for f in dataclasses.fields(AgentConfig):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(before):
            keys = _changed_keys(before, after, f.name)
            if f.name == "agent":
                keys = [k for k in keys if k.split(".", 1)[1] not in LIVE_AGENT_KEYS]
            restart.extend(keys)
    old_models = {m.name: m for m in old.models}
    new_models = {m.name: m for m in new.models}
    load = tuple(n for n, m in new_models.items()
                 if n not in old_models or _source(old_models[n]) != _source(m))
    unload = tuple(n for n in old_models if n not in new_models)
    limits = tuple(n for n, m in new_models.items()
                   if n in old_models and n not in load and old_models[n] != m)
    live_agent = {k: getattr(new.agent, k) for k in LIVE_AGENT_KEYS}
    config = dataclasses.replace(old, agent=dataclasses.replace(old.agent, **live_agent),
                                 models=new.models)
    return ReloadPlan(config, load, unload, limits, tuple(restart))
