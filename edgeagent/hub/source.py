"""The hub as a source of verified model files (it decides nothing).

It refreshes the hub's TUF metadata (what releases exist), downloads a release into the
content-addressed store (variant chosen for this box, Range resume, length and hash checks) and
describes an installed version to the model manager. Which version serves is the version
owner's answer (:mod:`edgeagent.versions`); this module only answers "what does the hub list"
and "give me version V, verified".

Named steps (``on_step``, for the kill tests): ``refreshed`` -> ``bundle`` -> ``download-half``
-> ``downloaded`` -> ``installed``; the owner adds ``loaded`` -> ``state-written`` ->
``collected``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.config import HubSection
from edgeagent.device.plan import rank_variants
from edgeagent.errors import HubError, ModelNotFound
from edgeagent.hub.bundle import Bundle, Variant, read_checks
from edgeagent.hub.client import HubClient, HubIndex, HubUnreachable, MetadataExpired
from edgeagent.hub.fetcher import HubFetcher, Progress
from edgeagent.hub.store import DiskUsageReader, Installed, ModelStore
from edgeagent.runtime.checks import ModelCheck
from edgeagent.runtime.manager import ModelSource

log = logging.getLogger(__name__)

#: Picks the variant for this box: variants -> (chosen, why). Raises HubError if none fits.
Chooser = Callable[[Sequence[Variant]], tuple[Variant, str]]
#: Partial downloads older than this are removed when the store is collected.
PARTIAL_KEEP_S = 24 * 3600
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


def stored_variant_choices(state_dir: Path, names: Sequence[str], chooser: Chooser,
                           active: Mapping[str, int | None]) -> list[dict[str, Any]]:
    """For ``edgeagent probe``: the variant each hub model would get on this box, from the
    bundle of its active (else newest) version in the store; ``variant`` None if the store has
    no bundle of it yet (blocking)."""
    store = ModelStore(state_dir / "hub")
    out: list[dict[str, Any]] = []
    for name in names:
        installed = store.installed_versions(name)
        version = active.get(name)
        version = version if version in installed else (installed[-1] if installed else None)
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
    next_sync_s: float | None = None
    releases: dict[str, list[int]] = field(default_factory=dict)


def trusted_root_path(hub: HubSection, base_dir: Path | None) -> Path:
    """``hub.root`` as a path: a relative one is relative to ``base_dir`` (the folder of the
    config file that names it), not to the working directory of whoever starts the agent."""
    root = Path(hub.root)
    return root if root.is_absolute() or base_dir is None else base_dir / root


class HubSource:
    """Verified releases from one hub, into the store under ``state_dir/hub``.

    Args:
        hub: The ``[hub]`` section.
        state_dir: The agent's state directory.
        chooser: Picks a bundle variant for this box.
        fetcher: Transfers; None = a new :class:`HubFetcher`.
        on_step: Called with each step's name (tests); None in production.
        base_dir: What a relative ``hub.root`` is relative to (the config file's folder).
        disk_usage: Reads the store's free space (``shutil.disk_usage``; tests pass a fake).
    """

    def __init__(self, hub: HubSection, state_dir: Path, chooser: Chooser, *,
                 fetcher: HubFetcher | None = None, on_step: StepHook | None = None,
                 base_dir: Path | None = None,
                 disk_usage: DiskUsageReader = shutil.disk_usage) -> None:
        self.hub = hub
        self.store = ModelStore(state_dir / "hub", disk_usage)
        self.chooser = chooser
        self._fetcher = fetcher or HubFetcher.from_section(hub)
        self.client = HubClient(hub.url, trusted_root_path(hub, base_dir),
                                self.store.metadata_dir, self._fetcher)
        self._on_step = on_step
        # ngclient is single-instance and blocking: one worker thread, one transfer at a time.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgeagent-hub")
        self.index: HubIndex | None = None
        """The releases the last verified refresh listed (None before the first one)."""
        self.status = SyncStatus()

    def _step(self, name: str) -> None:
        if self._on_step is not None:
            self._on_step(name)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- what the hub lists -------------------------------------------------------------

    async def refresh(self) -> HubIndex:
        """Refresh the hub's metadata on the hub's worker thread; the status says how it went.

        Raises:
            HubUnreachable, MetadataExpired, HubError: the releases known before stay known.
        """
        self.status.last_sync = time.time()
        try:
            index: HubIndex = await self._run(self.refresh_blocking)
        except HubUnreachable as exc:
            self.status.state, self.status.last_error = "unreachable", str(exc)
            raise
        except MetadataExpired as exc:
            self.status.state, self.status.last_error = "expired", str(exc)
            raise
        except HubError as exc:
            self.status.state, self.status.last_error = "refused", str(exc)
            raise
        self.status.state, self.status.last_error = "ok", ""
        self.status.releases = {n: list(v) for n, v in index.versions.items()}
        return index

    def refresh_blocking(self) -> HubIndex:
        """Refresh (blocking: the CLI's commands with the agent stopped, and the worker)."""
        index = self.index = self.client.refresh()
        self._step("refreshed")
        return index

    def latest(self, name: str) -> int | None:
        """The newest release of ``name`` the last refresh listed (None if not known)."""
        return None if self.index is None else self.index.latest(name)

    def lists(self, name: str, version: int) -> bool:
        return self.index is not None and version in self.index.versions.get(name, ())

    def installed_versions(self, name: str) -> list[int]:
        """Versions in the store (blocking, a directory listing)."""
        return self.store.installed_versions(name)

    async def check(self, name: str, version: int) -> None:
        """Refuse up front a version the store lacks and the hub does not list.

        Raises:
            ModelNotFound: the hub has no such version; HubError: the hub cannot be asked.
        """
        if version in await self._run(self.store.installed_versions, name):
            return  # verified when it was installed; needs no hub
        if not self.lists(name, version):
            await self.refresh()
        if not self.lists(name, version):
            have = ", ".join(map(str, self.index.versions.get(name, ()))) if self.index else ""
            raise ModelNotFound(f"the hub has no version {version} of {name!r} "
                                f"(it has: {have or 'none'})")

    # ---- getting a version --------------------------------------------------------------

    async def fetch(self, name: str, version: int, *, variant: str = "",
                    precision: str = "") -> ModelSource:
        """Version ``version`` of ``name``, verified in the store (downloaded if needed).

        Args:
            name, version: The release.
            variant: That bundle variant (a file name: the model's override, or a tuning
                result); empty = the chooser's pick for this box.
            precision: Only variants of this precision are considered (the model's override).

        Raises:
            HubError (HubUnreachable: transient), VerificationError: not available (a variant
            or precision the bundle does not have: HubError naming what it has).
        """
        if version not in await self._run(self.store.installed_versions, name) \
                and not self.lists(name, version):
            await self.refresh()
        inst: Installed = await self._run(self.fetch_blocking, name, version, None, variant,
                                          precision)
        source: ModelSource = await self._run(self.source, inst)
        return source

    def pick(self, bundle: Bundle, variant: str = "", precision: str = "") -> tuple[Variant, str]:
        """The variant of ``bundle`` to run: ``variant`` by file name, else the chooser's pick
        among those of ``precision`` (all if empty).

        Raises:
            HubError: the bundle has no such variant, or none of that precision fits the box.
        """
        have = ", ".join(f"{v.file} ({v.format}/{v.precision})" for v in bundle.variants)
        if variant:
            found = next((v for v in bundle.variants if v.file == variant), None)
            if found is None:
                raise HubError(f"{bundle.name} version {bundle.version} has no variant "
                               f"{variant!r} (it has: {have})")
            return found, "variant asked for by name"
        candidates = [v for v in bundle.variants if not precision or v.precision == precision]
        if not candidates:
            raise HubError(f"{bundle.name} version {bundle.version} has no {precision} variant "
                           f"(it has: {have})")
        chosen, why = self.chooser(candidates)
        return chosen, (f"precision {precision} asked for; {why}" if precision else why)

    def variants(self, name: str, version: int) -> tuple[Variant, ...]:
        """The variants of an installed version's bundle (blocking: reads the store)."""
        return self.store.installed(name, version).bundle.variants

    def fetch_blocking(self, name: str, version: int, progress: Progress | None,
                       variant: str = "", precision: str = "") -> Installed:
        """Download and verify one release into the store (blocking; after a refresh).

        A version already installed with another variant gets the one asked for added beside
        it (downloaded, verified, linked into the version's folder).

        Raises:
            HubError: no variant fits, not enough disk, hub unreachable; VerificationError.
        """
        if version in self.store.installed_versions(name):
            installed: Installed = self.store.installed(name, version)
            if not (variant or precision):
                return installed
            wanted, reason = self.pick(installed.bundle, variant, precision)
            if wanted.file == installed.variant.file:
                return installed
            self._download(name, version, [wanted], progress)
            return self.store.add_variant(installed, wanted, reason)
        bundle = self.client.bundle(name, version)
        bundle_bytes = self._bundle_bytes(bundle)
        chosen, reason = self.pick(bundle, variant, precision)
        log.info("model %s version %d: variant %s chosen: %s", name, version, chosen.file, reason)
        self._step("bundle")
        self._download(name, version, [chosen, *((bundle.checks,) if bundle.checks else ())],
                       progress)
        self._step("downloaded")
        inst = self.store.install(bundle_bytes, bundle, chosen, reason)
        self._step("installed")
        return inst

    def _download(self, name: str, version: int, refs: Sequence[Any],
                  progress: Progress | None) -> None:
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

    def source(self, inst: Installed) -> ModelSource:
        """The manager's view of an installed version (checks read from the store)."""
        checks: tuple[ModelCheck, ...] = ()
        if inst.bundle.checks is not None:
            checks = read_checks((inst.directory / inst.bundle.checks.file).read_bytes(),
                                 inst.bundle.checks, inst.variant.file)
        return ModelSource(inst.model_path, inst.version, inst.variant.precision, origin="hub",
                           variant=f"{inst.variant.file} ({inst.reason})", checks=checks,
                           sha256=inst.variant.sha256)

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

    # ---- housekeeping -------------------------------------------------------------------

    async def collect(self, keep: Mapping[str, set[int]]) -> None:
        """Remove from the store every version not in ``keep`` (the owner's history), and
        partial downloads nobody resumed for a day (recent ones are kept to resume)."""
        freed = await self._run(self._collect, keep)
        if freed:
            log.info("hub store: freed %d bytes", freed)

    def _collect(self, keep: Mapping[str, set[int]]) -> int:
        recent = time.time() - PARTIAL_KEEP_S
        downloads = self.store.downloads
        partials = [p.name.removesuffix(".part") for p in downloads.glob("*.part")
                    if p.stat().st_mtime > recent] if downloads.is_dir() else []
        return self.store.gc(keep, partials)

    async def start(self) -> None:
        """Sweep what an interrupted run left in the store (before anything loads from it)."""
        await self._run(self.store.recover)

    def close(self) -> None:
        """Release the worker thread and the transfers (a transfer or retry wait in progress
        is cancelled first, so shutting down never waits for a slow hub)."""
        self._fetcher.cancel()
        self._pool.shutdown(wait=True)
        self._fetcher.close()

    def describe(self) -> dict[str, Any]:
        """The hub part of the agent's status."""
        s = self.status
        return {"configured": True, "url": self.hub.url, "state": s.state,
                "last_sync": s.last_sync, "last_error": s.last_error,
                "next_sync_s": s.next_sync_s, "releases": s.releases}
