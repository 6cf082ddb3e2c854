"""Building blocks of the tuning tests: a clock and a measurer driven by tables, real models."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.config import ModelSection, TuneSection
from edgeagent.device.plan import PlannedProvider, PlanOverrides, ProviderPlan
from edgeagent.runtime.base import LoadedModel
from edgeagent.runtime.checks import ModelCheck
from edgeagent.runtime.manager import ModelSource
from edgeagent.runtime.registry import BackendRegistry
from edgeagent.tuning import Candidate, Figures, Tuner, TuningMemory, TuningService, VariantFile
from edgeagent.tuning.measure import Pruned
from tests import onnx_models

CPU = "CPUExecutionProvider"
SAMPLE = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
BOX = {"cpu_model": "Test CPU", "cpu_flags": ["avx2"], "packages": {"onnxruntime": "1"}}


class FakeClock:
    """Seconds that pass only when a test (or the measurer) says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        with self.lock:
            self.now += s


class TableMeasurer:
    """Figures from a table keyed by (variant, threads); each measurement takes ``cost_s`` on
    the fake clock. Records what it measured."""

    def __init__(self, clock: FakeClock, table: Mapping[tuple[Any, ...], Figures | str], *,
                 cost_s: float = 1.0, hook: Callable[[Candidate], None] | None = None) -> None:
        self.clock = clock
        self.table = table
        self.cost_s = cost_s
        self.hook = hook
        self.measured: list[Candidate] = []

    def measure(self, candidate: Candidate, model: LoadedModel, batch: int, deadline: float,
                beat_p50_ms: float | None) -> Figures:
        self.measured.append(candidate)
        if self.hook is not None:
            self.hook(candidate)
        model.run({s.name: np.zeros((1, *s.shape[1:]), np.float32) for s in model.inputs})
        self.clock.advance(self.cost_s)
        got = self.table.get((candidate.variant, candidate.threads, candidate.batch),  # type: ignore[call-overload]
                             self.table.get((candidate.variant, candidate.threads),
                                            Figures(10.0, 12.0, 100.0, 0.01)))
        if isinstance(got, str):
            raise Pruned(got)
        return got


def planner(fmt: str, precision: str, sha: str, overrides: PlanOverrides) -> ProviderPlan:
    return ProviderPlan(fmt, precision, (PlannedProvider(CPU),), threads=overrides.threads or 0)


def variant_planner(fmt: str, precision: str, overrides: PlanOverrides) -> ProviderPlan:
    return planner(fmt, precision, "", overrides)


def models(folder: Path) -> tuple[Path, Path, tuple[ModelCheck, ...]]:
    """A good fp32 MLP, a 'fast' file that gives other answers, and checks from the good one."""
    folder.mkdir(parents=True, exist_ok=True)
    good = onnx_models.mlp(folder / "m.onnx", n_in=4, n_hidden=8, n_out=3, seed=1)
    bad = onnx_models.mlp(folder / "m-fast.onnx", n_in=4, n_hidden=8, n_out=3, seed=2)
    import onnxruntime as ort

    expected = ort.InferenceSession(str(good)).run(["logits"], {"input": SAMPLE})[0]
    return good, bad, (ModelCheck({"input": SAMPLE}, {"logits": expected}),)


def variant(path: Path, precision: str = "fp32",
            checks: tuple[ModelCheck, ...] = ()) -> VariantFile:
    return VariantFile(path.name, "onnx", precision, f"sha-{path.stem}",
                       ModelSource(path, 1, precision, checks=checks, sha256=f"sha-{path.stem}"))


def section(**tune: object) -> ModelSection:
    return ModelSection(name="m", path="m.onnx", tune=TuneSection(**tune))  # type: ignore[arg-type]


def service(state_dir: Path, measurer: TableMeasurer, clock: FakeClock,
            box: Mapping[str, object] = BOX, cpu_count: int = 2,
            memory: Callable[[], float] = lambda: 0.0) -> TuningService:
    tuner = Tuner(BackendRegistry(), planner, measurer, clock=clock, memory=memory)

    def loadable(variants: object) -> tuple[list[object], list[tuple[object, str]]]:
        return list(variants), []  # type: ignore[call-overload]

    return TuningService(tuner, TuningMemory(state_dir), box=box, cpu_count=cpu_count,
                         planner=variant_planner, loadable=loadable)
