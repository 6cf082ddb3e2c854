"""A :class:`~edgeagent.control.desired.Deployer` over the model manager and a catalog of
versions: what desired state uses on boxes whose versions are known locally (configured files).
A hub-backed deployer implements the same protocol over ``edgeagent.hub``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from edgeagent.errors import ModelNotFound, ModelNotReady
from edgeagent.runtime.manager import ModelManager, ModelSource

if TYPE_CHECKING:  # the hub stack (tuf, httpx) is imported only where a hub is configured
    from edgeagent.hub.sync import HubSync

#: The versions of a model this box can deploy (raises ModelNotFound for an unknown model).
Catalog = Callable[[str], Awaitable[Mapping[int, ModelSource]]]


class CatalogDeployer:
    """Activates catalog versions through the manager (load, warm up, checks, swap).

    Args:
        manager: The model manager.
        catalog: The versions known per model.
    """

    def __init__(self, manager: ModelManager, catalog: Catalog) -> None:
        self._manager = manager
        self._catalog = catalog
        self._history: dict[str, list[int]] = {}

    def active_version(self, name: str) -> int | None:
        try:
            return self._manager.get(name).version
        except (ModelNotFound, ModelNotReady):
            return None

    async def _source(self, name: str, version: int) -> ModelSource:
        versions = await self._catalog(name)
        if version not in versions:
            have = ", ".join(map(str, sorted(versions))) or "none"
            raise ModelNotFound(f"model {name!r} has no version {version} (known: {have})")
        return versions[version]

    async def check(self, name: str, version: int) -> None:
        await self._source(name, version)

    async def activate(self, name: str, version: int) -> None:
        source = await self._source(name, version)
        previous = self.active_version(name)
        await self._manager.load(name, source)
        if previous is not None and previous != version:
            self._history.setdefault(name, []).append(previous)

    async def rollback(self, name: str) -> int:
        history = self._history.get(name)
        if not history:
            raise ModelNotFound(f"model {name!r}: no previous version to roll back to")
        version = history[-1]
        await self._manager.load(name, await self._source(name, version))
        history.pop()
        return version

    async def sync(self) -> None:
        """Nothing to refresh: the catalog is local."""


class HubDeployer(CatalogDeployer):
    """Desired state through the hub: hub models activate through :class:`HubSync` (fetch,
    verify, load, check, record); configured local files through the catalog.

    Args:
        manager: The model manager.
        catalog: The versions of non-hub models.
        hub: The hub sync of this agent.
    """

    def __init__(self, manager: ModelManager, catalog: Catalog, hub: HubSync) -> None:
        super().__init__(manager, catalog)
        self._hub = hub

    async def check(self, name: str, version: int) -> None:
        """Refuse up front a version the hub does not list (nor the store holds), so a desired
        state naming it changes nothing.

        Raises:
            ModelNotFound: an unknown model, or a version the hub does not have.
            HubError: the hub's metadata could not be refreshed (and the store lacks it).
        """
        if name not in self._hub.sections:
            await super().check(name, version)
            return
        if version in self._hub.store.installed_versions(name):
            return  # verified when it was installed; needs no hub
        index = await self._hub.refreshed_index()
        if version not in index.versions.get(name, ()):
            have = ", ".join(map(str, index.versions.get(name, ()))) or "none"
            raise ModelNotFound(f"the hub has no version {version} of {name!r} "
                                f"(it has: {have})")

    async def activate(self, name: str, version: int) -> None:
        """Activate through the hub, and pin the version so the poll loop keeps it."""
        if name not in self._hub.sections:
            await super().activate(name, version)
            return
        await self._hub.activate(name, version, explicit=True)
        self._hub.set_desired(name, version)

    async def rollback(self, name: str) -> int:
        if name not in self._hub.sections:
            return await super().rollback(name)
        version = self._hub.rollback_target(name)
        await self._hub.activate(name, version, explicit=True)
        self._hub.set_desired(name, version)
        return version

    async def sync(self) -> None:
        await self._hub.sync_once()
