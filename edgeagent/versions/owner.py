"""The one owner of "which version of model X serves, and why" (DESIGN 3.6).

Every route that can change a model's version calls this component and nothing else: start-up,
SIGHUP, the hub poll, the repository endpoint, the operator's commands (``pull``, ``rollback``
over the local admin channel), fleet documents and fleet commands. For each model it gathers
the inputs of the pure policy (:func:`edgeagent.versions.policy.decide`), and when the target
differs from what serves it runs the one activation path under the model's one lock: get the
version from its source (the hub's verified store, or a kept local copy), load, warm up, check,
swap (the manager), record in the one persisted history, collect what is no longer kept. A
failure leaves the last good version serving and is recorded with its reason; a transient one
(hub unreachable, metadata expired) is not, and is tried again on the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.config import ModelSection
from edgeagent.control.desired import DesiredDoc, DesiredStateError, parse_desired, revision_hint
from edgeagent.control.rollout import RolloutDoc, RolloutError, parse_rollout
from edgeagent.device.plan import PlanOverrides
from edgeagent.errors import EdgeAgentError, HubError, ModelNotFound, TransientError
from edgeagent.runtime.manager import ModelManager, ModelSource
from edgeagent.versions.history import History, ModelHistory, VersionState
from edgeagent.versions.local import LocalFiles
from edgeagent.versions.policy import (
    Decision,
    GroupDocs,
    Inputs,
    Pin,
    Rollout,
    decide,
    rollout_outcome,
)

if TYPE_CHECKING:  # the hub stack (tuf, httpx) is imported only where a hub is configured
    from edgeagent.hub.source import HubSource
    from edgeagent.tuning import Plan, TuneResult, TuningService, VariantFile
    from edgeagent.tuning.search import ProgressHook

log = logging.getLogger(__name__)

#: Called at each named step (tests stop a process there).
StepHook = Callable[[str], None]


def transient(exc: BaseException) -> bool:
    """Whether a failure says nothing about the release itself (try again later): the hub
    could not be reached, or its metadata has expired. Everything else (verification of a
    complete file, load, warm-up, checks, no variant for this box) marks the version failed."""
    return isinstance(exc, TransientError)


@dataclass
class Outcome:
    """What activating a model's target gave."""

    decision: Decision
    serving: int | None
    error: str = ""
    transient: bool = False


@dataclass
class DesiredOutcome:
    """``reported.desired``: how the device and group documents stand on this box."""

    state: str = "none"
    """``none`` (no document), ``applied``, ``refused``, ``failed`` or ``pending``."""
    revisions: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    error: str = ""
    overridden: dict[str, str] = field(default_factory=dict)
    """Models a document names that a more specific source decides here (the operator's pin)."""
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "revisions": self.revisions, "models": self.models,
                "error": self.error, "overridden": self.overridden, "ts": self.ts}


class VersionOwner:
    """Decides and activates the version of every configured model.

    Args:
        manager: Loads, checks and swaps versions (the only code that touches sessions).
        state_dir: Where the history (``versions.json``) and kept local copies live.
        base_dir: What a relative model ``path`` is relative to.
        device_id: This device's id (rollout buckets).
        groups: The device's groups (``[agent] tags``), in precedence order.
        keep_versions: Previous versions kept per model for rollback.
        hub: The hub source, or None on a box without a hub.
        poll_interval_s: How often the hub is asked for new releases.
        on_step: Called with each named step (tests); None in production.
        tuning: On-box tuning (None: every model runs what the profile picks).
    """

    def __init__(self, manager: ModelManager, state_dir: Path, base_dir: Path, *,
                 device_id: str, groups: Sequence[str] = (), keep_versions: int = 2,
                 hub: HubSource | None = None, poll_interval_s: float = 300.0,
                 on_step: StepHook | None = None, tuning: TuningService | None = None) -> None:
        self.manager = manager
        self.history = History(state_dir)
        self.local = LocalFiles(state_dir, base_dir)
        self.hub = hub
        self.device_id = device_id
        self.groups = tuple(groups)
        self.keep_versions = keep_versions
        self.poll_interval_s = poll_interval_s
        self._on_step = on_step
        self._sections: dict[str, ModelSection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._state = VersionState()
        self._decisions: dict[str, Decision] = {}
        self._errors: dict[str, str] = {}
        """Last activation error per model that is not a recorded failure (transient)."""
        self._available: dict[str, frozenset[int]] = {}
        self._local_current: dict[str, int] = {}
        self._unloaded: set[str] = set()
        self._listeners: list[Callable[[], None]] = []
        self._io = ThreadPoolExecutor(1, thread_name_prefix="edgeagent-versions")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failures = 0
        self._desired = DesiredOutcome()
        self._refusals: dict[str, str] = {}
        """Fleet documents refused, by topic key, with why (reported)."""
        self._reconfigured: set[str] = set()
        """Models whose overrides changed (SIGHUP): the serving version is activated again."""
        self.tuning = tuning
        self._tune_tasks: dict[str, asyncio.Task[None]] = {}
        self._tune_errors: dict[str, str] = {}
        """Why a tuned configuration did not activate (the default serves instead)."""
        self._tuning_now: set[str] = set()

    # ---- plumbing -----------------------------------------------------------------------

    def _step(self, name: str) -> None:
        if self._on_step is not None:
            self._on_step(name)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _write(self, change: Callable[[VersionState], None]) -> None:
        """Persist a change (atomically, off the event loop) and adopt what was written."""
        self._state = await self._run(self.history.modify, change)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Be told (synchronously, on the loop) whenever a model's version or reason changed."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    def _hist(self, name: str) -> ModelHistory:
        return self._state.models.get(name) or ModelHistory()

    def known(self, name: str) -> ModelSection:
        try:
            return self._sections[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}: not in the configuration") from None

    def names(self) -> list[str]:
        return sorted(self._sections)

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, sections: Sequence[ModelSection]) -> None:
        """Read the history, serve what the box has (never waiting for the hub), then poll."""
        self._state = await self._run(self.history.read)
        if self.hub is not None:
            await self.hub.start()
        await self.configure(sections)
        for name in self.names():
            outcome = await self.converge(name, offline=True)
            if outcome.serving is None and not outcome.error:
                log.info("model %s: waiting for %s", name, outcome.decision.source)
        self._task = asyncio.create_task(self._loop(), name="versions-poll")

    async def stop(self) -> None:
        if self.tuning is not None:
            self.tuning.cancel()
        for task in list(self._tune_tasks.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.tuning is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tuning.close)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.hub is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.hub.close)
        self._io.shutdown(wait=True)

    async def configure(self, sections: Sequence[ModelSection]) -> list[str]:
        """Adopt the configured models; those no longer configured are unloaded. Returns the
        names removed."""
        new = {s.name: s for s in sections}
        removed = [n for n in self._sections if n not in new]
        self._reconfigured |= {n for n, s in new.items() if n in self._sections
                               and _overrides(self._sections[n]) != _overrides(s)}
        self._sections = new
        for name in new:
            self.manager.declare(name)
        for name in removed:
            async with self._lock(name):
                await self.manager.unload(name)
                self.manager.forget(name)
                self._decisions.pop(name, None)
        return removed

    def wake(self) -> None:
        """Poll the hub and converge now (a command, a new document)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            delay = await self.sync_once()
            if self.hub is not None:
                self.hub.status.next_sync_s = round(delay, 1)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _backoff(self) -> float:
        base = min(self.poll_interval_s, 2.0 * 2.0 ** min(self._failures, 10))
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security

    async def sync_once(self) -> float:
        """One pass: refresh the hub's releases, then converge every model. Returns the delay
        to the next pass (the poll interval, or a backoff while something transient failed)."""
        delay = self.poll_interval_s
        if self.hub is not None and any(not s.path for s in self._sections.values()):
            try:
                await self.hub.refresh()
                self._failures = 0
            except HubError as exc:
                log.warning("hub: %s; serving what is installed, trying again", exc)
                if transient(exc):
                    self._failures += 1
                    delay = self._backoff()
        retry = False
        for name in self.names():
            if name in self._unloaded:
                continue
            outcome = await self.converge(name)
            retry = retry or outcome.transient
        if retry:
            self._failures = max(self._failures, 1)
            delay = min(delay, self._backoff())
        return delay

    # ---- deciding -----------------------------------------------------------------------

    def _rollout(self, target: str, name: str) -> Rollout | None:
        raw = self._state.fleet.rollouts.get(target, {}).get(name)
        if raw is None:
            return None
        doc = RolloutDoc(**raw)
        return Rollout(doc, target, self._state.fleet.bases.get(doc.rollout_id), self.device_id)

    def _pin(self, raw: Mapping[str, Any] | None, name: str) -> Pin | None:
        if raw is None or name not in raw.get("models", {}):
            return None
        return Pin(int(raw["models"][name]["version"]), int(raw["revision"]))

    def inputs(self, name: str) -> Inputs:
        """Everything that has a say in ``name``'s version now."""
        section = self._sections[name]
        hist = self._hist(name)
        fleet = self._state.fleet
        groups = [GroupDocs(g, self._rollout(f"group:{g}", name),
                            self._pin(fleet.groups.get(g), name)) for g in self.groups]
        hub_latest = None
        if self.hub is not None and not section.path:
            hub_latest = self.hub.latest(name)
        return Inputs(
            name, None if section.path else section.version,
            local_version=self._local_current.get(name), operator_pin=hist.operator_pin,
            device=self._pin(fleet.device, name), groups=groups,
            fleet_rollout=self._rollout("fleet", name), hub_latest=hub_latest,
            available=self._available.get(name, frozenset()), failed=dict(hist.failed),
            active=hist.active)

    def decision(self, name: str) -> Decision:
        return decide(self.inputs(name))

    async def _observe(self, name: str) -> None:
        """Refresh what the box has of ``name`` (store listing; a path model's current file)."""
        section = self._sections[name]
        if section.path:
            hist = self._hist(name)
            try:
                version, sha = await self._run(self.local.current, section, dict(hist.local))
            except EdgeAgentError as exc:
                self._errors[name] = str(exc)
                self._local_current.pop(name, None)
            else:
                self._local_current[name] = version
                if hist.local.get(version) != sha:
                    await self._write(lambda s: s.model(name).local.__setitem__(version, sha))
            kept = await self._run(self.local.versions, name)
            self._available[name] = frozenset(kept) & frozenset(self._hist(name).local)
        elif self.hub is not None:
            self._available[name] = frozenset(
                await self._run(self.hub.installed_versions, name))

    def _serving(self, name: str) -> int | None:
        try:
            return self.manager.get(name).version
        except EdgeAgentError:
            return None

    async def converge(self, name: str, *, offline: bool = False) -> Outcome:
        """Bring ``name`` to the policy's target (under its lock); never raises for the model's
        own failures: they are recorded and reported.

        Args:
            name: A configured model.
            offline: Only activate what the box already has (start-up: never wait for a hub).
        """
        async with self._lock(name):
            return await self._converge(name, offline=offline)

    async def _converge(self, name: str, *, offline: bool = False) -> Outcome:
        self._unloaded.discard(name)
        await self._observe(name)
        decision = self.decision(name)
        changed = self._decisions.get(name) != decision
        self._decisions[name] = decision
        serving = self._serving(name)
        target = decision.target
        last_good = self._hist(name).active
        if decision.blocked and serving is None and last_good is not None \
                and last_good not in self._hist(name).failed:
            # The target failed here before: the last good version serves (after a restart,
            # nothing serves yet).
            target = last_good
        outcome = Outcome(decision, serving)
        if target is not None and target == serving and name in self._reconfigured:
            serving = None  # the same version, loaded again with the new overrides
        self._reconfigured.discard(name)
        if target is None or (decision.blocked and target == decision.target) \
                or target == serving:
            if target is not None and target == serving and self._hist(name).active != target:
                await self._record_active(name, target)
            if target is None or target == serving:
                self._errors.pop(name, None)
            if changed:
                self._notify()
            return outcome
        if offline and target not in self._available.get(name, frozenset()):
            return outcome
        outcome = await self._activate(name, target, decision)
        if decision.blocked:
            outcome.error = decision.blocked
        self._decisions[name] = self.decision(name)
        self._notify()
        return outcome

    async def _source(self, name: str, version: int) -> ModelSource:
        """What to load for ``version``: the tuned configuration when a stored tuning result
        fits this version and box, else :meth:`_default_source`."""
        source = await self._default_source(name, version)
        if self.tuning is None:
            return source
        try:
            plan = await self._tuning_plan(name, version, source)
            result = await self._run(self.tuning.recall, name, plan)
            if result is None or result.chosen is None or result.chosen == plan.default:
                return source
            return await self._candidate_source(name, version, source, result.chosen)
        except EdgeAgentError as exc:
            if transient(exc):
                raise
            log.warning("model %s: tuning result not used (%s)", name, exc)
            return source

    async def _candidate_source(self, name: str, version: int, default: ModelSource,
                                candidate: Any) -> ModelSource:
        """The source of one tuning candidate (its variant fetched, its provider and threads)."""
        source = default
        if not self._sections[name].path and candidate.variant != default.path.name:
            assert self.hub is not None
            source = await self.hub.fetch(name, version, variant=candidate.variant)
        return dataclasses.replace(source, overrides=candidate.overrides, tuned=candidate.id)

    async def _tuning_plan(self, name: str, version: int, default: ModelSource) -> Plan:
        """The candidate set and key of ``version`` on this box (no download)."""
        from edgeagent.tuning import VariantFile

        assert self.tuning is not None
        section = self._sections[name]
        if section.path:
            info: VariantFile = await self._run(_path_variant, default)
            return self.tuning.plan(section, [info], info.file)
        assert self.hub is not None
        variants = await self._run(self.hub.variants, name, version)
        wanted = [v for v in variants
                  if (not section.variant or v.file == section.variant)
                  and (not section.precision or v.precision == section.precision)]
        usable, rejected = self.tuning.loadable(wanted)
        files = [VariantFile(v.file, v.format, v.precision, v.sha256) for v in usable]
        if default.path.name not in {f.file for f in files}:
            raise EdgeAgentError(f"the variant serving ({default.path.name}) is not among "
                                 "those the runtimes here can load")
        return self.tuning.plan(section, files, default.path.name,
                                [(v.file, why) for v, why in rejected])

    async def _default_source(self, name: str, version: int) -> ModelSource:
        """What to load for ``version`` untuned: the file the model's overrides (else the
        profile) pick, with the overrides' providers and threads."""
        section = self._sections[name]
        overrides = PlanOverrides(section.providers, section.threads)
        if section.path:
            sha = self._hist(name).local.get(version, "")
            source: ModelSource = await self._run(self.local.source, name, version, sha)
            return dataclasses.replace(source, precision=section.precision or source.precision,
                                       overrides=overrides)
        if self.hub is None:
            raise ModelNotFound(f"model {name!r} comes from the hub, and no hub is configured")
        source = await self.hub.fetch(name, version, variant=section.variant,
                                      precision=section.precision)
        return dataclasses.replace(source, overrides=overrides)

    async def _activate(self, name: str, version: int, decision: Decision) -> Outcome:
        """The one activation path (the model's lock is held): get, load, check, swap, record."""
        log.info("model %s: activating version %d (%s)", name, version, decision.source)
        try:
            source = await self._source(name, version)
            try:
                await self.manager.load(name, source)
            except EdgeAgentError as exc:
                if not source.tuned or transient(exc):
                    raise
                self._tune_errors[name] = f"tuned {source.tuned} did not activate: {exc}"
                log.warning("model %s: the tuned configuration did not activate (%s); the "
                            "default is tried", name, exc)
                await self.manager.load(name, await self._default_source(name, version))
        except EdgeAgentError as exc:
            serving = self._serving(name)
            if transient(exc):
                self._errors[name] = str(exc)
                log.warning("model %s version %d not activated yet: %s", name, version, exc)
                return Outcome(decision, serving, str(exc), transient=True)
            why = str(exc)
            await self._write(lambda s: s.model(name).failed.__setitem__(version, why))
            self._errors.pop(name, None)
            log.error("model %s version %d failed here, %s: %s", name, version,
                      f"version {serving} keeps serving" if serving else "nothing serves it",
                      exc)
            return Outcome(self.decision(name), serving, str(exc))
        self._step("loaded")
        rollout = decision.rollout
        if rollout is not None and version == rollout.doc.version:
            rollout_id = rollout.doc.rollout_id
            await self._write(lambda s: s.fleet.remember_switch(rollout_id))
        await self._record_active(name, version)
        self._errors.pop(name, None)
        self._tune_later(name)
        return Outcome(decision, version)

    # ---- tuning -------------------------------------------------------------------------

    def _tune_later(self, name: str) -> None:
        """After an activation: tune in the background when the model asks for it and no
        stored result fits (the activated version serves meanwhile)."""
        if self.tuning is None or not self._sections[name].tune.enabled \
                or name in self.tuning.results or name in self._tune_tasks:
            return

        async def run() -> None:
            try:
                await self.tune(name)
            except EdgeAgentError as exc:
                log.warning("model %s: tuning did not finish: %s", name, exc)
            finally:
                self._tune_tasks.pop(name, None)

        self._tune_tasks[name] = asyncio.create_task(run(), name=f"tune {name}")

    async def tune(self, name: str, progress: ProgressHook | None = None) -> TuneResult:
        """Tune the serving version of ``name`` now (``edgeagent tune``; after an activation),
        store the result, and switch a better configuration in (:meth:`apply_tuning`).

        Raises:
            ModelNotFound: unknown; ModelNotReady: nothing serves it; EdgeAgentError: no
            tuning here, or it is being tuned already.
        """
        from edgeagent.errors import ModelNotReady

        section = self.known(name)
        if self.tuning is None:
            raise EdgeAgentError("tuning is not available in this agent")
        if name in self._tuning_now:
            raise EdgeAgentError(f"model {name!r} is being tuned already")
        version = self._serving(name)
        if version is None:
            raise ModelNotReady(f"model {name!r} is not serving: nothing to tune")
        self._tuning_now.add(name)
        try:
            return await self._tune(name, section, version, progress)
        finally:
            self._tuning_now.discard(name)

    async def _tune(self, name: str, section: ModelSection, version: int,
                    progress: ProgressHook | None) -> TuneResult:
        assert self.tuning is not None
        async with self._lock(name):
            default = await self._default_source(name, version)
            plan = await self._tuning_plan(name, version, default)
        files: list[VariantFile] = []
        for f in plan.files:
            source: ModelSource | None = default
            if not section.path and f.file != default.path.name:
                assert self.hub is not None
                try:
                    source = await self.hub.fetch(name, version, variant=f.file)
                except EdgeAgentError as exc:
                    log.warning("model %s: variant %s not fetched for tuning: %s", name,
                                f.file, exc)
                    source = None
            files.append(dataclasses.replace(f, source=source))
        plan = dataclasses.replace(plan, files=tuple(files))
        result = await self.tuning.search(section, version, plan, progress)
        await self.apply_tuning(name, version, result)
        return result

    def tuned_batch(self, name: str) -> int | None:
        """The batch size the tuned configuration serving ``name`` was measured at (None when
        no tuned configuration serves)."""
        if self.tuning is None:
            return None
        result = self.tuning.results.get(name)
        try:
            tuned = self.manager.get(name).source.tuned
        except EdgeAgentError:
            return None
        if result is None or result.chosen is None or not tuned or tuned != result.chosen.id:
            return None
        return result.chosen.batch

    async def apply_tuning(self, name: str, version: int, result: TuneResult) -> bool:
        """Re-activate the serving ``version`` with the configuration ``result`` chose, under
        the model's lock, through the one activation path (load, warm-up, checks, swap).
        Returns whether a new configuration now serves; the old one serves on any failure, or
        when another version serves by now."""
        async with self._lock(name):
            if self._serving(name) != version:
                log.info("model %s: version %d was tuned, another serves now: not applied",
                         name, version)
                return False
            want = "" if result.chosen is None or result.chosen == result.default \
                else result.chosen.id
            if self.manager.get(name).source.tuned == want:
                return False
            self._tune_errors.pop(name, None)
            outcome = await self._activate(name, version,
                                           Decision(version, "tuning", "tuned configuration"))
            self._decisions[name] = self.decision(name)
        self._notify()
        return outcome.serving == version and not outcome.error

    async def _record_active(self, name: str, version: int) -> None:
        await self._write(lambda s: s.model(name).record_active(version, self.keep_versions))
        self._step("state-written")
        await self._collect()
        self._step("collected")

    async def _collect(self) -> None:
        keep = {n: h.kept() for n, h in self._state.models.items()}
        for name, fleet_versions in self._fleet_versions().items():
            keep.setdefault(name, set()).update(fleet_versions)
        if self.hub is not None:
            await self.hub.collect(keep)
        for name, section in self._sections.items():
            if section.path:
                await self._run(self.local.collect, name, keep.get(name, set()))

    def _fleet_versions(self) -> dict[str, set[int]]:
        """Versions a fleet document may ask for again soon (rollout bases and targets)."""
        out: dict[str, set[int]] = {}
        fleet = self._state.fleet
        for target in fleet.rollouts.values():
            for name, raw in target.items():
                base = fleet.bases.get(raw["rollout_id"])
                out.setdefault(name, set()).update(
                    v for v in (raw["version"], base) if v is not None)
        return out

    # ---- the repository endpoint and start-up -------------------------------------------

    async def load(self, name: str) -> int:
        """(Re)load ``name`` at its target (the repository ``load`` endpoint).

        Raises:
            ModelNotFound: unknown; EdgeAgentError: nothing serves it (with the reason).
        """
        self.known(name)
        async with self._lock(name):
            hist = self._hist(name)
            decision = self.decision(name)
            if decision.target is not None and decision.target in hist.failed:
                # An explicit load tries a failed target once more.
                target = decision.target
                await self._write(lambda s: _forget_failure(s, name, target))
            outcome = await self._converge(name)
        if outcome.serving is None:
            why = outcome.error or f"waiting for {outcome.decision.source}"
            raise EdgeAgentError(f"model {name!r} is not serving: {why}")
        if outcome.error:
            raise EdgeAgentError(f"model {name!r}: version {outcome.decision.target} not "
                                 f"activated ({outcome.error}); version {outcome.serving} serves")
        return outcome.serving

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` until it is loaded again or the agent restarts (an unload does
        not last across a restart: the configuration says what serves at start)."""
        self.known(name)
        async with self._lock(name):
            self._unloaded.add(name)
            await self.manager.unload(name)
        self._notify()

    # ---- the operator's commands ----------------------------------------------------------

    async def _check_version(self, name: str, version: int) -> None:
        section = self.known(name)
        if section.path:
            await self._observe(name)
            if version not in self._available.get(name, frozenset()):
                kept = ", ".join(map(str, sorted(self._available.get(name, ())))) or "none"
                raise ModelNotFound(f"model {name!r} has no local version {version} "
                                    f"(kept: {kept})")
        elif self.hub is None:
            raise ModelNotFound(f"model {name!r} comes from the hub, and no hub is configured")
        else:
            await self.hub.check(name, version)

    async def pin(self, name: str, version: int) -> Outcome:
        """The operator pins ``version`` (``edgeagent pull NAME@V``): tried now (a version that
        failed before too); the pin is written only once the version serves.

        Raises:
            ModelNotFound: no such model or version; EdgeAgentError: it did not activate (the
            old version serves; nothing was pinned).
        """
        await self._check_version(name, version)
        async with self._lock(name):
            await self._write(lambda s: _forget_failure(s, name, version))
            decision = Decision(version, "operator", "operator pin")
            if self._serving(name) == version:
                outcome = Outcome(decision, version)
                await self._record_active(name, version)
            else:
                outcome = await self._activate(name, version, decision)
            if outcome.serving != version:
                self._decisions[name] = self.decision(name)
                self._notify()
                raise EdgeAgentError(f"model {name} version {version} not activated, nothing "
                                     f"pinned: {outcome.error}")
            await self._write(lambda s: setattr(s.model(name), "operator_pin", version))
            outcome = await self._converge(name)
        self._notify()
        return outcome

    async def unpin(self, name: str) -> Outcome:
        """Clear the operator's pin (``edgeagent pull NAME``): follow the fleet, else the
        configuration, again (the hub is asked for its latest first)."""
        section = self.known(name)
        if self.hub is not None and not section.path:
            with contextlib.suppress(HubError):
                await self.hub.refresh()
        async with self._lock(name):
            await self._write(lambda s: setattr(s.model(name), "operator_pin", None))
            outcome = await self._converge(name)
        self._notify()
        return outcome

    def rollback_target(self, name: str) -> int:
        """The newest kept previous version.

        Raises:
            ModelNotFound: nothing to roll back to.
        """
        self.known(name)
        hist = self._hist(name)
        available = self._available.get(name, frozenset())
        for version in hist.previous:
            if version in available:
                return version
        raise ModelNotFound(f"model {name}: no previous version on this box to roll back to")

    async def rollback(self, name: str) -> Outcome:
        """The operator goes back to the newest kept previous version, and pins it."""
        self.known(name)
        async with self._lock(name):
            await self._observe(name)
        return await self.pin(name, self.rollback_target(name))

    # ---- fleet documents ----------------------------------------------------------------

    def _doc_models(self) -> set[str]:
        fleet = self._state.fleet
        out = set((fleet.device or {}).get("models", {}))
        for doc in fleet.groups.values():
            out |= set(doc.get("models", {}))
        return out

    async def receive_desired(self, source: str, payload: bytes) -> DesiredOutcome:
        """A device (``device``) or group (``group:NAME``) desired document arrived (an empty
        payload withdraws it). A malformed one, or one naming a model or version this box
        cannot get, is refused whole and the documents held before stay."""
        doc: DesiredDoc | None = None
        try:
            doc = parse_desired(payload)
            if doc is not None:
                await self._check_desired(doc)
        except DesiredStateError as exc:
            return self._refuse_desired(source, revision_hint(payload), str(exc))
        except EdgeAgentError as exc:
            assert doc is not None
            return self._refuse_desired(source, doc.revision, str(exc))
        before = self._doc_models()
        raw = doc.to_dict() if doc is not None else None

        def change(s: VersionState) -> None:
            if source == "device":
                s.fleet.device = raw
            elif raw is None:
                s.fleet.groups.pop(source[6:], None)
            else:
                s.fleet.groups[source[6:]] = raw

        await self._write(change)
        self._refusals.pop(source, None)
        names = sorted((before | self._doc_models()) & set(self._sections))
        for name in names:
            await self.converge(name)
        return self._desired_outcome()

    async def _check_desired(self, doc: DesiredDoc) -> None:
        for name, version in sorted(doc.models.items()):
            try:
                await self._check_version(name, version)
            except EdgeAgentError as exc:
                raise EdgeAgentError(f"{name} version {version}: {exc}") from exc

    def _refuse_desired(self, source: str, revision: int, why: str) -> DesiredOutcome:
        log.warning("desired state from %s refused: %s", source, why)
        self._refusals[source] = why
        self._desired = DesiredOutcome("refused", {**self._revisions(), source: revision},
                                       self._desired.models, f"{source}: {why}",
                                       ts=time.time())
        self._notify()
        return self._desired

    def _revisions(self) -> dict[str, int]:
        fleet = self._state.fleet
        out = {}
        if fleet.device is not None:
            out["device"] = int(fleet.device["revision"])
        for group in self.groups:
            if group in fleet.groups:
                out[f"group:{group}"] = int(fleet.groups[group]["revision"])
        return out

    def _desired_outcome(self) -> DesiredOutcome:
        """How the held device and group documents stand now."""
        revisions = self._revisions()
        if not revisions:
            self._desired = DesiredOutcome()
            return self._desired
        wanted: dict[str, int] = {}
        overridden: dict[str, str] = {}
        errors: list[str] = []
        pending = False
        for name in sorted(self._doc_models() & set(self._sections)):
            decision = self._decisions.get(name) or self.decision(name)
            inputs = self.inputs(name)
            doc_pin = inputs.device or next((g.desired for g in inputs.groups if g.desired), None)
            if doc_pin is None:
                continue
            wanted[name] = doc_pin.version
            if decision.kind not in ("device", "group"):
                overridden[name] = decision.source
                continue
            serving = self._serving(name)
            failed = self._hist(name).failed
            if decision.target in failed:
                errors.append(f"{name} version {decision.target}: {failed[decision.target]}")
            elif serving != decision.target:
                pending = True
        state = "failed" if errors else ("pending" if pending else "applied")
        self._desired = DesiredOutcome(state, revisions, wanted, "; ".join(errors), overridden,
                                       time.time())
        return self._desired

    async def receive_rollout(self, target: str, model: str, payload: bytes) -> None:
        """A rollout document for ``target`` (``group:NAME`` or ``fleet``) and ``model``
        arrived (an empty payload withdraws it). The first time a rollout id is seen, the
        version served then is recorded as its base."""
        key = f"rollout {target}/{model}"
        try:
            doc = parse_rollout(payload, model)
        except RolloutError as exc:
            log.warning("%s refused: %s", key, exc)
            self._refusals[key] = str(exc)
            self._notify()
            return
        self._refusals.pop(key, None)
        base = self._hist(model).active if model in self._sections else None

        def change(s: VersionState) -> None:
            if doc is None:
                s.fleet.rollouts.get(target, {}).pop(model, None)
                return
            s.fleet.rollouts.setdefault(target, {})[model] = doc.to_dict()
            s.fleet.remember_base(doc.rollout_id, base)

        await self._write(change)
        if model in self._sections:
            await self.converge(model)
        else:
            self._notify()

    async def prune_documents(self, received: set[str]) -> None:
        """Drop the fleet documents kept on the box that the broker did not send again after a
        connect (``received``: ``device``, ``group:NAME``, ``rollout:TARGET/MODEL``): they were
        withdrawn while the box was offline."""
        fleet = self._state.fleet
        gone: list[tuple[str, str | None]] = []
        if fleet.device is not None and "device" not in received:
            gone.append(("device", None))
        gone += [(f"group:{g}", None) for g in fleet.groups if f"group:{g}" not in received]
        gone += [(target, model) for target, models in fleet.rollouts.items() for model in models
                 if f"rollout:{target}/{model}" not in received]
        for key, model in gone:
            log.info("fleet document %s%s is no longer on the broker: dropped", key,
                     f"/{model}" if model else "")
            if model is None:
                await self.receive_desired(key, b"")
            else:
                await self.receive_rollout(key, model, b"")

    # ---- reporting ----------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        """What decides ``name`` and what it ran, for ``status`` and ``reported``."""
        decision = self._decisions.get(name) or self.decision(name)
        hist = self._hist(name)
        out: dict[str, Any] = {
            "target": decision.target, "source": decision.source,
            "source_kind": decision.kind, "fleet_control": decision.fleet,
            "operator_pin": hist.operator_pin, "active": hist.active,
            "previous": hist.previous,
            "failed": {str(k): v for k, v in sorted(hist.failed.items())},
        }
        section = self._sections.get(name)
        if section is not None and (any(_overrides(section)) or section.threads == 0):
            out["overrides"] = {"providers": list(section.providers),
                                "precision": section.precision, "variant": section.variant,
                                "threads": section.threads}
        if decision.blocked:
            out["blocked"] = (f"version {decision.target} failed here before "
                              f"({decision.blocked}); 'edgeagent pull {name}@{decision.target}' "
                              "tries it again")
        if name in self._errors:
            out["error"] = self._errors[name]
        tuning = self.tuning.describe(name) if self.tuning is not None else None
        if tuning is not None or name in self._tune_errors:
            out["tuning"] = {**(tuning or {}), "state": (
                "running" if tuning and "running" in tuning else "done" if tuning else "failed")}
            if name in self._tune_errors:
                out["tuning"]["error"] = self._tune_errors[name]
        if name in self._unloaded:
            out["unloaded"] = True
        return out

    def rollouts(self) -> dict[str, dict[str, Any]]:
        """``reported.rollouts``: how this device stands in every rollout it holds."""
        out: dict[str, dict[str, Any]] = {}
        for target, models in self._state.fleet.rollouts.items():
            for name in models:
                rollout = self._rollout(target, name)
                assert rollout is not None
                entry: dict[str, Any] = {
                    "model": name, "target": target, "version": rollout.doc.version,
                    "base": rollout.base, "bucket": rollout.bucket,
                    "in_share": rollout.in_share, "state": rollout.doc.state}
                if name not in self._sections:
                    entry.update(outcome="held", error="the model is not configured here")
                else:
                    decision = self._decisions.get(name) or self.decision(name)
                    outcome, error = rollout_outcome(
                        rollout, decision, self._serving(name), self._hist(name).failed,
                        rollout.doc.rollout_id in self._state.fleet.switched)
                    entry.update(outcome=outcome, error=error)
                out[rollout.doc.rollout_id] = entry
        return out

    def desired(self) -> dict[str, Any]:
        """``reported.desired``."""
        if self._desired.state != "refused":
            self._desired_outcome()
        return self._desired.to_dict()

    def refusals(self) -> dict[str, str]:
        return dict(self._refusals)

    def active_versions(self) -> dict[str, int | None]:
        return {n: self._hist(n).active for n in self.names()}


def _path_variant(source: ModelSource) -> VariantFile:
    """A path model's one file as a tuning variant (blocking: may read the file)."""
    from edgeagent.runtime.inspect import onnx_precision, sha256_file
    from edgeagent.runtime.registry import model_format
    from edgeagent.tuning import VariantFile

    fmt = model_format(source.path)
    precision = source.precision
    if precision == "auto":
        precision = onnx_precision(source.path)[0] if fmt == "onnx" else "fp32"
    return VariantFile(source.path.name, fmt, precision, source.sha256 or
                       sha256_file(source.path), source)


def _overrides(section: ModelSection) -> tuple[Any, ...]:
    return (section.providers, section.precision, section.variant, section.threads)


def _forget_failure(state: VersionState, name: str, version: int) -> None:
    state.model(name).failed.pop(version, None)


def summary(outcomes: Iterable[tuple[str, Outcome]]) -> tuple[list[str], list[str]]:
    """Names serving their target, and ``name: why`` for the others (honest reload logs)."""
    ok, bad = [], []
    for name, outcome in outcomes:
        if outcome.error or outcome.serving is None:
            bad.append(f"{name}: {outcome.error or 'waiting for ' + outcome.decision.source}")
        else:
            ok.append(name)
    return ok, bad
