"""Tuning as a service of the agent: the candidate set and key for a model version, the stored
result, and the search on its own worker thread (never the event loop, never the load or
inference workers), one model at a time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from edgeagent.config import ModelSection
from edgeagent.device.plan import PlanOverrides
from edgeagent.tuning.candidates import (
    Candidate,
    VariantFile,
    VariantPlanner,
    candidates,
    default_candidate,
)
from edgeagent.tuning.memory import TuningMemory, key_doc
from edgeagent.tuning.search import ProgressHook, Row, Tuner, TuneResult

log = logging.getLogger(__name__)

#: Bundle variants -> (loadable ones, best first; (rejected, why) pairs). From the profile and
#: the box (``edgeagent.device.plan.loadable_variants``), built by the composition root.
Loadable = Callable[[Sequence[Any]], tuple[list[Any], list[tuple[Any, str]]]]


@dataclass(frozen=True)
class Plan:
    """What one tuning of a model version covers."""

    files: tuple[VariantFile, ...]
    candidates: tuple[Candidate, ...]
    key: dict[str, Any]
    rejected: tuple[tuple[str, str], ...] = ()
    """Bundle variants this box cannot load (file, why): not candidates."""

    @property
    def default(self) -> Candidate:
        return self.candidates[0]


@dataclass
class Running:
    """A tuning in progress (``status`` shows it)."""

    version: int
    done: int = 0
    total: int = 0


class TuningService:
    """Tuning for the version owner.

    Args:
        tuner: Runs the search (blocking).
        memory: Stored results.
        box: The box facts results are keyed on (:func:`edgeagent.tuning.memory.box_facts`).
        cpu_count: Logical CPUs (thread counts to try).
        planner: (format, precision, overrides) -> plan, for the providers each variant may
            use.
        loadable: Which bundle variants the runtimes here can load.
    """

    def __init__(self, tuner: Tuner, memory: TuningMemory, *, box: Mapping[str, Any],
                 cpu_count: int, planner: VariantPlanner, loadable: Loadable) -> None:
        self.tuner = tuner
        self.memory = memory
        self.box = dict(box)
        self.cpu_count = cpu_count
        self.planner = planner
        self.loadable = loadable
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgeagent-tune")
        self.running: dict[str, Running] = {}
        self.results: dict[str, TuneResult] = {}
        """The result in force per model (recalled at activation, or just found)."""

    def plan(self, section: ModelSection, files: Sequence[VariantFile],
             default_file: str, rejected: Sequence[tuple[str, str]] = ()) -> Plan:
        """The candidate set and the key for a version whose loadable files are ``files`` and
        whose default (the profile's pick, with the model's overrides) is ``default_file``."""
        by_file = {f.file: f for f in files}
        first = by_file[default_file]
        overrides = PlanOverrides(section.providers, section.threads)
        default = default_candidate(first, self.planner(first.format, first.precision,
                                                        overrides), section)
        cands = candidates(files, self.planner, section, self.cpu_count, default)
        return Plan(tuple(files), tuple(cands), key_doc(files, self.box, cands, section.tune),
                    tuple(rejected))

    def recall(self, name: str, plan: Plan) -> TuneResult | None:
        """The stored result for this plan's key (blocking: reads a file)."""
        result = self.memory.recall(name, plan.key)
        if result is not None:
            self.results[name] = result
        else:
            self.results.pop(name, None)
        return result

    async def search(self, section: ModelSection, version: int, plan: Plan,
                     progress: ProgressHook | None = None) -> TuneResult:
        """Run the search on the tuning worker and store the result (atomically)."""
        name = section.name
        running = self.running[name] = Running(version, 0, len(plan.candidates))
        loop = asyncio.get_running_loop()

        def tick(done: int, total: int, row: Row) -> None:
            running.done, running.total = done, total
            if progress is not None:
                loop.call_soon_threadsafe(progress, done, total, row)

        def work() -> TuneResult:
            result = self.tuner.search(section, version, plan.files, plan.candidates,
                                       progress=tick)
            self.memory.remember(name, plan.key, result)
            return result

        try:
            result: TuneResult = await loop.run_in_executor(self._pool, work)
        finally:
            self.running.pop(name, None)
        self.results[name] = result
        log.info("model %s version %d tuned in %.0f s: %s (%s over the default %s)", name,
                 version, result.elapsed_s,
                 result.chosen.describe() if result.chosen else "nothing passed",
                 f"{result.margin:.2f}x" if result.margin else "no figure",
                 result.default.describe())
        return result

    def describe(self, name: str) -> dict[str, Any] | None:
        """``status``/``reported``: the result in force and a run in progress."""
        out: dict[str, Any] = {}
        result = self.results.get(name)
        if result is not None:
            out.update(result.summary())
        running = self.running.get(name)
        if running is not None:
            out["running"] = {"version": running.version, "done": running.done,
                              "total": running.total}
        return out or None

    def cancel(self) -> None:
        """Stop after the candidate being measured (the agent is stopping)."""
        self.tuner.stopped.set()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
