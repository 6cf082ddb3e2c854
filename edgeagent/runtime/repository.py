"""The model repository: the models this agent knows and how to (re)load each one.

It backs the model repository extension of the HTTP API and the CLI's operator commands. It
only acts on models the agent already knows (configured local paths, the store, the hub); a
model is never taken from a request body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.config import ModelSection
from edgeagent.errors import ModelNotFound
from edgeagent.runtime.manager import ModelManager, ModelSource, ModelVersion

log = logging.getLogger(__name__)

#: Resolves a configured hub model to what to load (the hub issue provides it).
HubResolver = Callable[[ModelSection], Awaitable[ModelSource]]
#: Told, by name, when a load of a hub model through the repository has ended, either way.
HubLoaded = Callable[[str], Awaitable[None]]


@dataclass
class KnownModel:
    """A model the repository can load: its configuration entry."""

    section: ModelSection


class ModelRepository:
    """Loads, unloads and lists the models this agent knows."""

    def __init__(self, manager: ModelManager, base_dir: Path,
                 hub_resolver: HubResolver | None = None) -> None:
        self._manager = manager
        self._base_dir = base_dir
        self._known: dict[str, KnownModel] = {}
        self._hub_resolver = hub_resolver
        self._hub_loaded: HubLoaded | None = None

    def set_hub_resolver(self, resolver: HubResolver | None,
                         loaded: HubLoaded | None = None) -> None:
        """Where hub models come from, and who records what their loads did (the hub's
        state: active version, failures), before :meth:`load` returns."""
        self._hub_resolver, self._hub_loaded = resolver, loaded

    def configure(self, sections: tuple[ModelSection, ...]) -> None:
        """Make the configured models known (and the manager aware of them)."""
        self._known = {s.name: KnownModel(s) for s in sections}
        for name in self._known:
            self._manager.declare(name)

    def known(self, name: str) -> KnownModel:
        try:
            return self._known[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}: not in the configuration") from None

    def names(self) -> list[str]:
        return sorted(self._known)

    async def source_for(self, name: str) -> ModelSource:
        """What loading this model means now: its configured file, or the hub's chosen version."""
        section = self.known(name).section
        if section.path:
            path = Path(section.path)
            if not path.is_absolute():
                path = self._base_dir / path
            return ModelSource(path=path, precision="auto", origin="path")
        if self._hub_resolver is None:
            raise ModelNotFound(f"model {name!r} comes from the hub, and no hub is configured")
        return await self._hub_resolver(section)

    async def load(self, name: str) -> ModelVersion:
        """(Re)load a known model; the running version serves until the new one is ready.

        For a hub model, the hub's state records the outcome before this returns, so an
        operator's next command (``rollback`` after ``pull``) sees it.
        """
        source = await self.source_for(name)
        try:
            return await self._manager.load(name, source)
        finally:
            if source.origin == "hub" and self._hub_loaded is not None:
                await self._hub_loaded(name)

    async def unload(self, name: str) -> None:
        self.known(name)
        await self._manager.unload(name)

    def index(self) -> list[dict[str, Any]]:
        """Triton's repository index entries: name, version, state, reason."""
        out = []
        for name in self.names():
            slot = self._manager.slot(name)
            entry: dict[str, Any] = {"name": name, "state": slot.state.upper()}
            if slot.active is not None:
                entry["version"] = str(slot.active.version)
            if slot.last_error:
                entry["reason"] = slot.last_error
            out.append(entry)
        return out
