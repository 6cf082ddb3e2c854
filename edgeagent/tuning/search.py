"""The search: load each candidate, gate it on the bundle's checks, measure it, choose.

Bounded in time (``tune.budget_s`` on the injected clock: what is left untried when it is
spent says so), pruning early (a candidate over the memory budget is dropped after loading, one
far slower than the best so far after its first runs), and never choosing a candidate that
fails the checks or the objective's limits. The default (what the profile runs) is measured
first, so every figure has something to compare with; another candidate replaces it only when
it wins by more than ``tune.min_gain`` and by more than the measured run-to-run noise.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeagent.config import ModelSection, TuneSection
from edgeagent.errors import EdgeAgentError
from edgeagent.runtime.base import LoadedModel
from edgeagent.runtime.checks import run_checks
from edgeagent.runtime.manager import Planner
from edgeagent.runtime.memory import release_free_heap
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.tuning.candidates import BUILTIN, Candidate, VariantFile
from edgeagent.tuning.measure import Clock, Figures, Measurer, Pruned, batchable

log = logging.getLogger(__name__)

#: The share of the budget kept for confirming a winner against the default.
CONFIRM_SHARE = 0.25
#: Alternating default/winner measurements in the confirmation.
CONFIRM_PAIRS = 3

#: Resident memory of this process in MB (injected: tests give a fake).
MemoryReader = Callable[[], float]
#: Called after each candidate: (done, total, the candidate's row).
ProgressHook = Callable[[int, int, "Row"], None]


def resident_mb(statm: Path = Path("/proc/self/statm")) -> float:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        pages = int(statm.read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def nvml_used_mb() -> float:
    """GPU memory in use, summed over the GPUs NVML sees (0 when it cannot tell); for the
    memory a GPU candidate adds."""
    try:
        import pynvml  # optional: the nvidia-ml-py package

        pynvml.nvmlInit()
        return float(sum(pynvml.nvmlDeviceGetMemoryInfo(
            pynvml.nvmlDeviceGetHandleByIndex(i)).used
            for i in range(pynvml.nvmlDeviceGetCount()))) / (1 << 20)
    except Exception:  # no NVML, no driver, no GPU: nothing to read
        return 0.0


@dataclass
class Row:
    """One candidate's line in the table."""

    candidate: Candidate
    outcome: str = "not tried"
    """``chosen``, ``lost``, ``failed checks``, ``failed``, ``over limit``, ``pruned`` or
    ``not tried``."""
    why: str = ""
    figures: Figures | None = None
    default: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate.to_dict(), "id": self.candidate.id,
                "outcome": self.outcome, "why": self.why, "default": self.default,
                "figures": self.figures.to_dict() if self.figures else None}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Row:
        figures = raw.get("figures")
        return cls(Candidate.from_dict(raw["candidate"]), str(raw["outcome"]),
                   str(raw.get("why", "")), Figures.from_dict(figures) if figures else None,
                   bool(raw.get("default", False)))


@dataclass
class TuneResult:
    """What a tuning run found for one model version."""

    model: str
    version: int
    objective: str
    chosen: Candidate | None
    default: Candidate
    rows: list[Row]
    margin: float | None = None
    """The chosen candidate's figure over the default's (throughput ratio, or the default's
    p50 over the chosen one's): 1.0 when the default was kept."""
    noise: float = 0.0
    """The run-to-run noise the margin had to beat."""
    elapsed_s: float = 0.0
    budget_s: float = 0.0
    ts: float = field(default_factory=time.time)
    confirm: list[float] = field(default_factory=list)
    """The winner's ratios over the default in the paired re-measurement (empty: none)."""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "objective": self.objective,
                "chosen": self.chosen.to_dict() if self.chosen else None,
                "default": self.default.to_dict(), "rows": [r.to_dict() for r in self.rows],
                "margin": None if self.margin is None else round(self.margin, 4),
                "noise": round(self.noise, 4), "elapsed_s": round(self.elapsed_s, 2),
                "budget_s": self.budget_s, "ts": self.ts, "confirm": self.confirm}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TuneResult:
        chosen = raw.get("chosen")
        return cls(str(raw["model"]), int(raw["version"]), str(raw["objective"]),
                   Candidate.from_dict(chosen) if chosen else None,
                   Candidate.from_dict(raw["default"]), [Row.from_dict(r) for r in raw["rows"]],
                   raw.get("margin"), float(raw.get("noise", 0.0)),
                   float(raw.get("elapsed_s", 0.0)), float(raw.get("budget_s", 0.0)),
                   float(raw.get("ts", 0.0)), [float(r) for r in raw.get("confirm", [])])

    def summary(self) -> dict[str, Any]:
        """What ``status`` and MQTT ``reported`` carry."""
        return {"chosen": self.chosen.describe() if self.chosen else None,
                "config": self.chosen.to_dict() if self.chosen else None,
                "default": self.default.describe(), "objective": self.objective,
                "margin": None if self.margin is None else round(self.margin, 3),
                "noise": round(self.noise, 3), "candidates": len(self.rows),
                "measured": sum(1 for r in self.rows if r.figures is not None),
                "version": self.version, "ts": self.ts}


def _score(objective: str, f: Figures) -> float:
    """Higher is better."""
    return f.throughput if objective == "throughput" else -f.p50_ms


def _gain(objective: str, best: Figures, base: Figures) -> float:
    if objective == "throughput":
        return best.throughput / base.throughput if base.throughput else float("inf")
    return base.p50_ms / best.p50_ms if best.p50_ms else float("inf")


def _limit_problem(tune: TuneSection, f: Figures) -> str:
    if tune.max_memory_mb and f.memory_mb > tune.max_memory_mb:
        return f"adds {f.memory_mb:.0f} MB, over the memory budget of {tune.max_memory_mb:g} MB"
    if tune.max_p99_ms and f.p99_ms > tune.max_p99_ms:
        return f"p99 {f.p99_ms:.3f} ms, over the bound of {tune.max_p99_ms:g} ms"
    return ""


def _label_losers(rows: Sequence[Row], chosen: Row, objective: str,
                  reverted: bool = False) -> None:
    """Say, for each measured candidate that lost on its figures, by how much (``reverted``:
    the default is chosen because the search's best did not hold up in paired runs)."""
    assert chosen.figures is not None
    what = "throughput" if objective == "throughput" else "speed (1/p50)"
    for row in rows:
        if row.outcome == "lost" and row.figures is not None \
                and not row.why.startswith("beat the default by only"):
            ratio = _gain(objective, row.figures, chosen.figures)
            row.why = f"{what} {ratio:.2f}x of the chosen one's"
            if reverted and ratio > 1:
                row.why += " in the search, behind the best, which did not hold up in " \
                           "paired runs against the default"


class Tuner:
    """Runs the search for one model at a time (blocking: call it off the event loop).

    Args:
        registry: The backends (the same runtimes the agent serves with).
        planner: The composition root's planner (profile, box, overrides -> plan).
        measurer: Measures a loaded candidate.
        clock: The budget's clock (seconds).
        memory: Resident memory in MB (what a loaded candidate adds).
        device_memory: GPU memory in use in MB (:func:`nvml_used_mb` on a GPU box); None:
            not read.
    """

    def __init__(self, registry: BackendRegistry, planner: Planner, measurer: Measurer, *,
                 clock: Clock = time.monotonic, memory: MemoryReader = resident_mb,
                 device_memory: MemoryReader | None = None) -> None:
        self.registry = registry
        self.planner = planner
        self.measurer = measurer
        self.clock = clock
        self.memory = memory
        self.device_memory = device_memory
        self.stopped = threading.Event()
        """Set when the agent stops: the search ends after the candidate being measured."""

    def search(self, section: ModelSection, version: int, files: Sequence[VariantFile],
               cands: Sequence[Candidate], *, progress: ProgressHook | None = None
               ) -> TuneResult:
        """Try ``cands`` (the default first) within the budget; choose by the objective."""
        tune = section.tune
        by_file = {v.file: v for v in files}
        start = self.clock()
        end = start + tune.budget_s
        # The last part of the budget confirms a winner against the default, paired.
        deadline = end - (CONFIRM_SHARE * tune.budget_s if len(cands) > 1 else 0.0)
        rows = [Row(c, default=(i == 0)) for i, c in enumerate(cands)]
        best_p50: float | None = None
        for i, row in enumerate(rows):
            now = self.clock()
            if now >= deadline or self.stopped.is_set():
                why = "the agent is stopping" if self.stopped.is_set() \
                    else f"the time budget ({tune.budget_s:g} s) was spent"
                for rest in rows[i:]:
                    rest.why = why
                break
            # An even share of what is left (the default gets at least its share).
            share = (deadline - now) / (len(rows) - i)
            self._try(row, by_file[row.candidate.variant], now + share, best_p50, tune)
            if row.figures is not None and row.outcome == "measured":
                best_p50 = row.figures.p50_ms if best_p50 is None \
                    else min(best_p50, row.figures.p50_ms)
            if progress is not None:
                progress(i + 1, len(rows), row)
        result = self._choose(section, version, rows)
        if result.chosen is not None and result.chosen != result.default \
                and not self.stopped.is_set():
            self._confirm(result, rows, by_file, end, tune)
        result.elapsed_s = self.clock() - start
        result.budget_s = tune.budget_s
        return result

    def _confirm(self, result: TuneResult, rows: list[Row], by_file: Mapping[str, VariantFile],
                 end: float, tune: TuneSection) -> None:
        """Measure the default and the winner alternately (:data:`CONFIRM_PAIRS` pairs) in
        what is left of the budget; the winner stays only if the median of the pair ratios
        beats the default by more than ``min_gain`` and by more than the ratios' spread.
        Paired runs see the same neighbours' load, so a busy spell cannot make a winner."""
        default = next(r for r in rows if r.default)
        chosen = next(r for r in rows if r.outcome == "chosen")
        models: list[LoadedModel] = []
        ratios: list[float] = []
        try:
            for row in (default, chosen):
                c = row.candidate
                source = by_file[c.variant].source
                assert source is not None
                plan = self.planner(c.format, c.precision, by_file[c.variant].sha256,
                                    c.overrides)
                models.append(self.registry.for_format(c.format).load(source.path, plan))
            for pair in range(CONFIRM_PAIRS):
                got: list[Figures] = []
                for row, model in zip((default, chosen), models, strict=True):
                    now = self.clock()
                    left = (end - now) / (2 * (CONFIRM_PAIRS - pair))
                    got.append(self.measurer.measure(row.candidate, model,
                                                     row.candidate.batch, now + left, None))
                ratios.append(_gain(tune.objective, got[1], got[0]))
        except (EdgeAgentError, Pruned) as exc:
            log.warning("tuning %s: the paired re-measurement failed (%s)", result.model, exc)
            ratios = []
        finally:
            for model in models:
                model.close()
            release_free_heap()
        if not ratios:
            return
        median = statistics.median(ratios)
        spread = max(ratios) - min(ratios)
        result.confirm = [round(r, 4) for r in ratios]
        if median - 1 > max(tune.min_gain, spread):
            result.margin = median
            result.noise = max(result.noise, spread)
            chosen.why = f"best by the objective; {median:.2f}x the default in " \
                         f"{len(ratios)} paired runs (spread {spread:.2f})"
            return
        chosen.outcome = "lost"
        chosen.why = (f"best in the search, but {median:.2f}x the default in {len(ratios)} "
                      f"paired runs (spread {spread:.2f}): not beyond the noise")
        default.outcome, default.why = "chosen", "the default: the winner did not hold up"
        result.chosen, result.margin = default.candidate, 1.0
        result.noise = max(result.noise, spread)
        _label_losers([r for r in rows if r is not chosen], default, tune.objective,
                      reverted=True)

    def _try(self, row: Row, variant: VariantFile, deadline: float, beat_p50: float | None,
             tune: TuneSection) -> None:
        c = row.candidate
        source = variant.source
        if source is None:
            row.outcome, row.why = "failed", f"{variant.file} is not on the box"
            return
        before = self.memory()
        device_before = self.device_memory() if self.device_memory else None
        model: LoadedModel | None = None
        try:
            plan = self.planner(c.format, c.precision, variant.sha256, c.overrides)
            model = self.registry.for_format(c.format).load(source.path, plan)
            got = model.provider
            if got != c.provider and not (c.provider == BUILTIN and got in ("cpu", "")):
                row.outcome = "failed"
                row.why = f"{c.provider} did not load it (ran on {got}: " \
                          f"{model.fallback_reason or 'fell back'})"
                return
            try:
                run_checks(model, source.checks)
            except EdgeAgentError as exc:
                row.outcome, row.why = "failed checks", str(exc)
                return
            added = max(0.0, self.memory() - before)
            if tune.max_memory_mb and added > tune.max_memory_mb:
                row.outcome = "over limit"
                row.why = f"adds {added:.0f} MB, over the memory budget of " \
                          f"{tune.max_memory_mb:g} MB"
                return
            batch = c.batch if batchable(model) else 1
            if batch != c.batch:
                row.outcome, row.why = "failed", "the model's first dimension is fixed: no batch"
                return
            figures = self.measurer.measure(c, model, batch, deadline, beat_p50)
            device = None if device_before is None or self.device_memory is None \
                else max(0.0, self.device_memory() - device_before)
            row.figures = Figures(figures.p50_ms, figures.p99_ms, figures.throughput,
                                  figures.noise, added, figures.runs, device)
            row.outcome = "measured"
        except Pruned as exc:
            row.outcome, row.why = "pruned", str(exc)
        except EdgeAgentError as exc:
            row.outcome, row.why = "failed", str(exc)
        finally:
            if model is not None:
                model.close()
            release_free_heap()

    def _choose(self, section: ModelSection, version: int, rows: list[Row]) -> TuneResult:
        tune = section.tune
        objective = tune.objective
        for row in rows:
            if row.outcome == "measured" and row.figures is not None:
                problem = _limit_problem(tune, row.figures)
                if problem:
                    row.outcome, row.why = "over limit", problem
        valid = [r for r in rows if r.outcome == "measured" and r.figures is not None]
        default = rows[0]
        result = TuneResult(section.name, version, objective, None, default.candidate, rows)
        if not valid:
            return result
        best = max(valid, key=lambda r: _score(objective, r.figures))  # type: ignore[arg-type]
        chosen = best
        if default in valid and best is not default:
            assert best.figures is not None
            assert default.figures is not None
            gain = _gain(objective, best.figures, default.figures)
            noise = max(default.figures.noise, best.figures.noise)
            result.noise = noise
            if gain - 1 <= max(tune.min_gain, noise):
                chosen = default
                best.outcome = "lost"
                best.why = (f"beat the default by only {100 * (gain - 1):.1f} %, within the "
                            f"noise ({100 * noise:.1f} %) or the minimum gain "
                            f"({100 * tune.min_gain:.0f} %)")
        chosen.outcome, chosen.why = "chosen", "best by the objective" if chosen is best \
            else "the default: nothing beat it by more than the noise"
        assert chosen.figures is not None
        if default.figures is not None and default in valid:
            result.margin = _gain(objective, chosen.figures, default.figures)
            result.noise = max(result.noise, default.figures.noise)
        for row in valid:
            if row.outcome == "measured":
                row.outcome = "lost"
        _label_losers(rows, chosen, objective)
        result.chosen = chosen.candidate
        return result
