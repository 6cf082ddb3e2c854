"""Hub sync: pull what this box should run, verify it, try it, and only then switch to it.

Activation runs in steps, each a name the tests can stop at (``on_step``): ``refreshed`` ->
``bundle`` -> ``download-half`` -> ``downloaded`` -> ``installed`` -> ``loaded`` ->
``state-written`` -> ``collected``. The manager does load, warm-up, checks and the atomic swap;
the active-version state is written only after it succeeded, so any failure (or a kill) leaves
the old version serving. Unreachable hub: keep serving, retry with backoff and jitter. Expired
metadata: keep serving, report it, install nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.config import HubSection, ModelSection
from edgeagent.device.plan import rank_variants
from edgeagent.errors import EdgeAgentError, HubError, ModelNotFound, ModelNotReady
from edgeagent.hub.bundle import Bundle, Variant, bundle_path, read_checks
from edgeagent.hub.client import HubClient, HubIndex, HubUnreachable, MetadataExpired
from edgeagent.hub.fetcher import HubFetcher, Progress
from edgeagent.hub.store import DiskUsageReader, Installed, ModelState, ModelStore
from edgeagent.runtime.manager import ModelCheck, ModelManager, ModelSource

log = logging.getLogger(__name__)

#: Picks the variant for this box: variants -> (chosen, why). Raises HubError if none fits.
Chooser = Callable[[Sequence[Variant]], tuple[Variant, str]]
#: Called at each named step (tests stop a process there).
StepHook = Callable[[str], None]


def profile_chooser(profile: Any, facts: Any) -> Chooser:
    """A chooser from the device profile and facts (``edgeagent.device.plan.rank_variants``)."""

    def choose(variants: Sequence[Variant]) -> tuple[Variant, str]:
        ranking = rank_variants(profile, facts, variants)
        rejected = "; ".join(f"{r.variant.file}: {r.reason}" for r in ranking.rejected)
        if not ranking.ranked:
            raise HubError(f"no variant runs on this box ({rejected})")
        best: Variant = ranking.ranked[0]
        why = f"{best.format}/{best.precision} ranked first of {len(ranking.ranked)} usable " \
              f"for profile {profile.name}"
        return best, why + (f"; rejected {rejected}" if rejected else "")

    return choose


def stored_variant_choices(state_dir: Path, names: Sequence[str],
                           chooser: Chooser) -> list[dict[str, Any]]:
    """For ``edgeagent probe``: the variant each hub model would get on this box, from the
    bundle of its active (else newest) version in the store; ``variant`` None if the store has
    no bundle of it yet (blocking)."""
    store = ModelStore(state_dir / "hub")
    out: list[dict[str, Any]] = []
    for name in names:
        installed = store.installed_versions(name)
        active = store.model_state(name).active
        version = active if active in installed else (installed[-1] if installed else None)
        entry: dict[str, Any] = {"name": name, "version": version, "variant": None}
        if version is None:
            entry["reason"] = "not in the store yet: unknown until the agent pulls its bundle"
        else:
            try:
                variant, entry["reason"] = chooser(store.installed(name, version).bundle.variants)
                entry["variant"] = f"{variant.file} ({variant.format}/{variant.precision})"
            except HubError as exc:
                entry["reason"] = str(exc)
        out.append(entry)
    return out


@dataclass
class SyncStatus:
    """What ``status`` reports about the hub."""

    state: str = "idle"
    """``idle``, ``ok``, ``unreachable``, ``expired`` or ``refused``."""
    last_sync: float | None = None
    last_error: str = ""
    next_retry_s: float | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


def trusted_root_path(hub: HubSection, base_dir: Path | None) -> Path:
    """``hub.root`` as a path: a relative one is relative to ``base_dir`` (the folder of the
    config file that names it), not to the working directory of whoever starts the agent."""
    root = Path(hub.root)
    return root if root.is_absolute() or base_dir is None else base_dir / root


class HubSync:
    """Pulls, verifies, activates and rolls back hub models for one agent.

    Args:
        hub: The ``[hub]`` section.
        models: The configured models (only those with a ``version`` are the hub's).
        state_dir: The agent's state directory (the store is ``state_dir/hub``).
        manager: Loads, checks and swaps versions.
        chooser: Picks a bundle variant for this box.
        fetcher: Transfers; None = a new :class:`HubFetcher`.
        on_step: Called with each step's name (tests); None in production.
        base_dir: What a relative ``hub.root`` is relative to (the config file's folder).
        disk_usage: Reads the store's free space (``shutil.disk_usage``; tests pass a fake).

    The version a model is brought to is, first to last: an operator's pending request
    (``pull``/``rollback``, tried once), the pinned desired version (:meth:`set_desired`), the
    configured integer ``version``, the hub's latest.
    """

    def __init__(self, hub: HubSection, models: Sequence[ModelSection], state_dir: Path,
                 manager: ModelManager | None, chooser: Chooser, *,
                 fetcher: HubFetcher | None = None, on_step: StepHook | None = None,
                 base_dir: Path | None = None,
                 disk_usage: DiskUsageReader = shutil.disk_usage) -> None:
        self.hub = hub
        self.sections = {m.name: m for m in models if m.version is not None}
        self.store = ModelStore(state_dir / "hub", disk_usage)
        self.manager = manager
        self.chooser = chooser
        self._fetcher = fetcher or HubFetcher.from_section(hub)
        self.client = HubClient(hub.url, trusted_root_path(hub, base_dir),
                                self.store.metadata_dir, self._fetcher)
        self._on_step = on_step
        # ngclient is single-instance and blocking: one worker thread, one sync at a time.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgeagent-hub")
        self._lock = asyncio.Lock()
        # One activation per model at a time: the poll loop, the load endpoint and the fleet's
        # desired state may act on the same model at once.
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failures = 0
        self._tried: dict[str, int] = {}  # requests handed to the load endpoint
        self.status = SyncStatus()

    def _step(self, name: str) -> None:
        if self._on_step is not None:
            self._on_step(name)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _model_lock(self, name: str) -> asyncio.Lock:
        return self._model_locks.setdefault(name, asyncio.Lock())

    def _manager_loading(self, name: str) -> bool:
        """A load of this model is under way in the manager (e.g. from the load endpoint)."""
        if self.manager is None:
            return False
        try:
            return self.manager.slot(name).loading.locked()
        except ModelNotFound:
            return False

    # ---- the resolver (start-up and the repository load endpoint) -----------------------

    async def resolve(self, section: ModelSection) -> ModelSource:
        """What to load for a hub model, from the store only (start-up never waits for the hub).

        An operator's pending request (pull/rollback) is tried while an older version still
        serves (a failure then keeps it); otherwise the active version, else the desired
        (pinned) one, else the configured one. Waits for an activation of the model under way.

        Raises:
            ModelNotReady: nothing in the store yet (the sync will pull it).
        """
        async with self._model_lock(section.name):
            source: ModelSource = await self._run(self._resolve, section)
            return source

    def _resolve(self, section: ModelSection) -> ModelSource:
        name = section.name
        state = self.store.model_state(name)
        installed = set(self.store.installed_versions(name))
        serving = self.manager is not None and self.manager.ready(name)
        candidates = [state.requested if serving else None, state.active, state.desired]
        if isinstance(section.version, int):
            candidates.append(section.version)
        for version in candidates:
            if version is not None and version in installed:
                if version == state.requested and serving:
                    self._tried[name] = version
                return self.source(self.store.installed(name, version))
        self._wake.set()
        raise ModelNotReady(f"model {name!r} is not in the store yet; the hub sync is pulling it")

    def source(self, inst: Installed) -> ModelSource:
        """The manager's view of an installed version (checks read from the store)."""
        checks: tuple[ModelCheck, ...] = ()
        if inst.bundle.checks is not None:
            checks = read_checks((inst.directory / inst.bundle.checks.file).read_bytes(),
                                 inst.bundle.checks)
        return ModelSource(inst.model_path, inst.version, inst.variant.precision, origin="hub",
                           variant=f"{inst.variant.file} ({inst.reason})", checks=checks,
                           sha256=inst.variant.sha256)

    # ---- fetching into the store (blocking) ---------------------------------------------

    def refresh(self) -> HubIndex:
        """Refresh the hub's metadata (blocking)."""
        index = self.client.refresh()
        self._step("refreshed")
        return index

    async def refreshed_index(self) -> HubIndex:
        """:meth:`refresh` on the hub's worker thread (the one ngclient allows): the releases
        the hub lists now.

        Raises:
            HubError: unreachable hub, expired or refused metadata.
        """
        index: HubIndex = await self._run(self.refresh)
        return index

    def fetch(self, name: str, version: int, progress: Progress | None = None) -> Installed:
        """Download and verify one release into the store (blocking; after :meth:`refresh`).

        Raises:
            HubError: no variant fits, not enough disk, hub unreachable; VerificationError.
        """
        if version in self.store.installed_versions(name):
            installed: Installed = self.store.installed(name, version)
            return installed
        bundle = self.client.bundle(name, version)
        bundle_bytes = self._bundle_bytes(bundle)
        variant, reason = self.chooser(bundle.variants)
        log.info("model %s version %d: variant %s chosen: %s", name, version, variant.file, reason)
        self._step("bundle")
        refs = [variant, *((bundle.checks,) if bundle.checks else ())]
        missing = [r for r in refs if self.store.blob(r.sha256) is None]
        self._check_space(sum(r.size for r in missing))
        for ref in missing:
            partial = self.store.partial_path(ref.sha256)
            half = [False]

            def tick(done: int, total: int, half: list[bool] = half) -> None:
                if progress is not None:
                    progress(done, total)
                if not half[0] and done * 2 >= total:
                    half[0] = True
                    self._step("download-half")

            self.client.download(name, version, ref.file, partial, tick)
            self.store.commit_blob(partial, ref.sha256)
        self._step("downloaded")
        inst = self.store.install(bundle_bytes, bundle, variant, reason)
        self._step("installed")
        return inst

    @staticmethod
    def _bundle_bytes(bundle: Bundle) -> bytes:
        return json.dumps(bundle.to_dict(), indent=2, sort_keys=True).encode()

    def _check_space(self, needed: int) -> None:
        free = self.store.free_bytes()
        # Keep a margin: a full disk takes the whole box down, not just this download.
        if needed + 64 * 1024 * 1024 > free and needed > 0:
            raise HubError(f"not enough disk for the download: {needed} bytes needed, "
                           f"{free} free under {self.store.root}")
        budget = self.hub.disk_budget_mb * 1024 * 1024
        if budget and self.store.used_bytes() + needed > budget:
            raise HubError(f"the download ({needed} bytes) would exceed hub.disk_budget_mb "
                           f"({self.hub.disk_budget_mb} MB; {self.store.used_bytes()} bytes used)")

    # ---- activation ---------------------------------------------------------------------

    async def activate(self, name: str, version: int, *, explicit: bool = False,
                       index: HubIndex | None = None) -> Installed:
        """Fetch (if needed), load, warm up, check and switch to a version; record it.

        A version older than the active one is refused unless ``explicit`` (a rollback or a
        pull that names it). On any failure the old version keeps serving and the failure is
        recorded (and not retried automatically).

        Activations of one model run one at a time (a second waits for the first); one that
        finds the version already served (loaded meanwhile through the load endpoint) only
        records it.

        Raises:
            HubError, VerificationError, ModelError: the version was not activated.
        """
        assert self.manager is not None, "activation needs a model manager"
        async with self._model_lock(name):
            state: ModelState = await self._run(self.store.model_state, name)
            if state.active is not None and version < state.active and not explicit:
                raise HubError(f"model {name}: hub version {version} is older than the active "
                               f"version {state.active}; refused (use 'edgeagent rollback "
                               f"{name}' or 'edgeagent pull {name}@{version}')")
            try:
                if index is None and version not in self.store.installed_versions(name):
                    await self._run(self.refresh)
                inst: Installed = await self._run(self.fetch, name, version)
                if not self._serving(name, inst):
                    await self.manager.load(name, self.source(inst))
            except EdgeAgentError as exc:
                await self._run(self._record_failed, name, version, str(exc))
                raise
            self._step("loaded")
            await self._run(self._record_active, name, version)  # reports the new state
            return inst

    def _serving(self, name: str, inst: Installed) -> bool:
        """The manager serves exactly this installed version already."""
        if self.manager is None or not self.manager.ready(name):
            return False
        source = self.manager.get(name).source
        return (source.origin, source.version, source.sha256) == \
            ("hub", inst.version, inst.variant.sha256)

    def _record_failed(self, name: str, version: int, why: str) -> None:
        def change(state: ModelState) -> None:
            state.failed[version] = why
            if state.requested == version:
                state.requested = None

        self._report(name, self.store.modify(name, change))

    def _record_active(self, name: str, version: int) -> None:
        def change(state: ModelState) -> None:
            if state.active != version:
                previous = [v for v in [state.active, *state.previous] if v not in (None, version)]
                state.previous = [v for v in previous if v is not None][: self.hub.keep_versions]
            state.active = version
            state.failed.pop(version, None)
            if state.requested == version:
                state.requested = None

        self._report(name, self.store.modify(name, change))
        self._step("state-written")
        self._collect()
        self._step("collected")

    def _collect(self) -> None:
        everything = self.store.read_state()
        keep = {n: {v for v in [s.active, s.requested, s.desired, *s.previous] if v is not None}
                for n, s in everything.items()}
        freed = self.store.gc(keep)
        if freed:
            log.info("hub store: freed %d bytes", freed)

    def reconcile(self, name: str) -> None:
        """Record a version the manager serves that the state does not know as active yet
        (loaded through the repository endpoint)."""
        if self.manager is None or not self.manager.ready(name):
            return
        served = self.manager.get(name)
        if served.source.origin != "hub":
            return
        state = self.store.model_state(name)
        tried = self._tried.pop(name, None)
        if state.active != served.version:
            self._record_active(name, served.version)
        elif tried is not None and tried == state.requested and tried != served.version:
            # The request went through the load endpoint and did not take.
            self._record_failed(name, tried,
                                self.manager.slot(name).last_error or "did not activate")

    async def _reconcile(self, name: str) -> None:
        async with self._model_lock(name):
            if not self._manager_loading(name):  # else judged on the next pass, once loaded
                await self._run(self.reconcile, name)

    async def loaded(self, name: str) -> None:
        """A load through the repository (start-up, the load endpoint) has ended: record what
        it did now, not on the next poll (an operator's ``rollback`` right after ``pull`` must
        see the version ``pull`` activated as the active one)."""
        await self._reconcile(name)

    # ---- operator actions ---------------------------------------------------------------

    def request(self, name: str, version: int, *, pin: bool) -> None:
        """Ask for a version (pull/rollback): tried next, and allowed to be older (blocking).

        Args:
            name: The model.
            version: The version to try next.
            pin: Also make it the desired version (``pull NAME@V``, ``rollback``), so the
                poll loop keeps it; False clears any pin (``pull NAME``: follow the
                configuration again).
        """
        def change(state: ModelState) -> None:
            state.requested = version
            state.desired = version if pin else None
            state.failed.pop(version, None)

        self.store.modify(name, change)

    def set_desired(self, name: str, version: int | None) -> None:
        """Pin the version the poll loop and start-up bring ``name`` to, overriding the
        configured ``version`` (or ``latest``); None removes the pin (the configuration rules
        again). Persisted atomically in the store's state, so it survives restarts.

        The fleet's desired state calls this; an explicit rollback or ``pull NAME@V`` pins the
        same way. A pinned version that failed before is tried once more; one that fails stays
        failed (the old version keeps serving) until pinned again. Call it from the event
        loop's thread (it wakes the poll loop); the write is small and synchronous.
        """
        def change(state: ModelState) -> None:
            state.desired = version
            if version is not None:
                state.failed.pop(version, None)

        self._report(name, self.store.modify(name, change))
        self.wake()

    def rollback_target(self, name: str) -> int:
        """The version a rollback goes back to: the newest kept previous one.

        Raises:
            HubError: nothing to roll back to.
        """
        state = self.store.model_state(name)
        installed = set(self.store.installed_versions(name))
        for version in state.previous:
            if version in installed:
                return version
        raise HubError(f"model {name}: no previous version in the store to roll back to")

    # ---- the poll loop ------------------------------------------------------------------

    async def store_ready(self) -> None:
        """Sweep what an interrupted run left in the store (before anything loads from it)."""
        await self._run(self.store.recover)

    async def start(self) -> None:
        """Start polling the hub (returns at once)."""
        await self.store_ready()
        self._task = asyncio.create_task(self._loop(), name="hub-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.close()

    def close(self) -> None:
        """Release the transfers (blocking use, without :meth:`start`)."""
        self._fetcher.cancel()  # a retry's wait or a slow transfer must not hold the shutdown
        self._pool.shutdown(wait=True)
        self._fetcher.close()

    def wake(self) -> None:
        """Sync now (a command, a new request)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            delay = await self.sync_once()
            self.status.next_retry_s = round(delay, 1)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _backoff(self) -> float:
        base = min(self.hub.poll_interval_s, 2.0 * 2.0 ** min(self._failures, 10))
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security

    async def sync_once(self) -> float:
        """One pass: refresh, then bring every hub model to its target. Returns the delay to
        the next pass (the poll interval, or a backoff after a failure)."""
        async with self._lock:
            self.status.last_sync = time.time()
            for name in self.sections:
                await self._reconcile(name)
            try:
                index = await self._run(self.refresh)
            except HubUnreachable as exc:
                self._failures += 1
                self.status.state, self.status.last_error = "unreachable", str(exc)
                log.warning("hub unreachable (%s); serving what is installed, retrying", exc)
                return self._backoff()
            except MetadataExpired as exc:
                self.status.state, self.status.last_error = "expired", str(exc)
                log.error("%s", exc)
                return self.hub.poll_interval_s
            except HubError as exc:
                self.status.state, self.status.last_error = "refused", str(exc)
                log.error("hub metadata refused: %s", exc)
                return self.hub.poll_interval_s
            self._failures = 0
            self.status.state, self.status.last_error = "ok", ""
            for name, section in self.sections.items():
                await self._sync_model(name, section, index)
            return self.hub.poll_interval_s

    async def _sync_model(self, name: str, section: ModelSection, index: HubIndex) -> None:
        if self._manager_loading(name):
            return  # the load endpoint is on it; recorded on the next pass
        state = await self._run(self.store.model_state, name)
        explicit = state.requested is not None
        pinned = state.desired is not None or isinstance(section.version, int)
        if state.requested is not None:
            target: int | None = state.requested
        elif state.desired is not None:
            target = state.desired
        elif isinstance(section.version, int):
            target = section.version
        else:
            target = index.latest(name)
        if target is None:
            self.status.models.setdefault(name, {})["error"] = f"no release of {name} on the hub"
            return
        if target == state.active and self.manager is not None and self.manager.ready(name):
            return
        if target in state.failed and not explicit:
            return
        if target not in index.versions.get(name, ()) and \
                target not in await self._run(self.store.installed_versions, name):
            log.warning("model %s version %d is not on the hub (%s)", name, target,
                        bundle_path(name, target))
            return
        try:
            await self.activate(name, target, explicit=explicit or pinned, index=index)
        except EdgeAgentError as exc:
            log.error("model %s version %d not activated, keeping what serves: %s",
                      name, target, exc)
            self.status.models.setdefault(name, {})["error"] = str(exc)

    def _report(self, name: str, state: ModelState) -> None:
        """Show ``name``'s state, as just written to the store, in the agent's status."""
        self.status.models[name] = {"active": state.active, "previous": state.previous,
                                    "desired": state.desired,
                                    "failed": {str(k): v for k, v in state.failed.items()}}

    def describe(self) -> dict[str, Any]:
        """The hub part of the agent's status."""
        s = self.status
        return {"configured": True, "url": self.hub.url, "state": s.state,
                "last_sync": s.last_sync, "last_error": s.last_error,
                "next_sync_s": s.next_retry_s, "models": s.models}
