"""Measuring one loaded candidate: latency at batch 1, throughput at its batch, noise.

The clock is injected (tests drive a fake one, so budgets and pruning are asserted without
timing anything); :class:`TimedMeasurer` is what the agent uses.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeagent.runtime.base import LoadedModel
from edgeagent.runtime.datatypes import numpy_dtype
from edgeagent.tuning.candidates import Candidate

Clock = Callable[[], float]


@dataclass(frozen=True)
class Figures:
    """What a candidate measured."""

    p50_ms: float
    p99_ms: float
    throughput: float
    """Items per second at the candidate's batch."""
    noise: float = 0.0
    """Run-to-run spread of the throughput rounds: (max - min) / median."""
    memory_mb: float = 0.0
    """Resident memory the loaded candidate added."""
    runs: int = 0
    device_mb: float | None = None
    """GPU memory the loaded candidate added (None where no GPU memory is read)."""

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ms": round(self.p50_ms, 4), "p99_ms": round(self.p99_ms, 4),
                "throughput": round(self.throughput, 2), "noise": round(self.noise, 4),
                "memory_mb": round(self.memory_mb, 2), "runs": self.runs,
                "device_mb": None if self.device_mb is None else round(self.device_mb, 2)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Figures:
        device = raw.get("device_mb")
        return cls(float(raw["p50_ms"]), float(raw["p99_ms"]), float(raw["throughput"]),
                   float(raw.get("noise", 0.0)), float(raw.get("memory_mb", 0.0)),
                   int(raw.get("runs", 0)), None if device is None else float(device))


class Pruned(Exception):
    """The first runs showed the candidate cannot win; measuring stopped."""


class Measurer(Protocol):
    """Measures one loaded candidate until ``deadline`` (on the tuner's clock)."""

    def measure(self, candidate: Candidate, model: LoadedModel, batch: int, deadline: float,
                beat_p50_ms: float | None) -> Figures:
        """Raises :class:`Pruned` when the first runs are slower than ``prune_factor`` x
        ``beat_p50_ms`` (the best so far), when it is given."""
        ...


def sample_inputs(model: LoadedModel, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the model's shapes, the dynamic first dimension set to ``batch`` (others 1)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = tuple(batch if (i == 0 and d < 0) else (1 if d < 0 else d)
                      for i, d in enumerate(spec.shape))
        if spec.datatype == "BYTES":
            out[spec.name] = np.full(shape, b"", dtype=object)
            continue
        dtype = numpy_dtype(spec.datatype)
        if np.issubdtype(dtype, np.floating):
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[spec.name] = np.zeros(shape, dtype=dtype)
    return out


def batchable(model: LoadedModel) -> bool:
    """Whether every input's first dimension is dynamic (a batch can be stacked)."""
    return all(s.shape and s.shape[0] < 0 for s in model.inputs)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class TimedMeasurer:
    """Times real runs on ``clock``: latency runs at batch 1, then throughput in ``rounds``.

    Args:
        clock: Seconds, monotonic.
        probe_runs: Runs after which a candidate slower than ``prune_factor`` x the best p50
            so far is pruned (and at least ``probe_s`` of them: one scheduling hiccup on a
            busy box must not prune a model whose runs take microseconds).
        latency_runs: At most this many batch-1 runs (fewer when the slice runs out).
        rounds: Throughput rounds (their spread is the noise).
    """

    def __init__(self, clock: Clock = time.perf_counter, *, probe_runs: int = 5,
                 probe_s: float = 0.25, latency_runs: int = 200, rounds: int = 3,
                 prune_factor: float = 2.0) -> None:
        self.clock = clock
        self.probe_runs = probe_runs
        self.probe_s = probe_s
        self.latency_runs = latency_runs
        self.rounds = rounds
        self.prune_factor = prune_factor

    def measure(self, candidate: Candidate, model: LoadedModel, batch: int, deadline: float,
                beat_p50_ms: float | None) -> Figures:
        one = sample_inputs(model, 1)
        model.run(one)
        start = self.clock()
        half = start + (deadline - start) / 2
        times: list[float] = []
        probe_until = min(start + self.probe_s, half)
        probing = beat_p50_ms is not None
        while len(times) < self.latency_runs and (len(times) < self.probe_runs
                                                  or self.clock() < half):
            t0 = self.clock()
            model.run(one)
            times.append((self.clock() - t0) * 1000)
            if not probing or len(times) < self.probe_runs or self.clock() < probe_until:
                continue
            probing = False
            assert beat_p50_ms is not None
            if statistics.median(times) > self.prune_factor * beat_p50_ms:
                raise Pruned(f"p50 {statistics.median(times):.3f} ms after {len(times)} runs, "
                             f"over {self.prune_factor:g}x the best so far "
                             f"({beat_p50_ms:.3f} ms)")
        feed = sample_inputs(model, batch) if batch > 1 else one
        model.run(feed)
        round_s = max(1e-3, (deadline - self.clock()) / self.rounds)
        rates: list[float] = []
        runs = len(times)
        for _ in range(self.rounds):
            t0 = self.clock()
            n = 0
            while n < 3 or self.clock() - t0 < round_s:
                model.run(feed)
                n += 1
            rates.append(n * batch / max(1e-9, self.clock() - t0))
            runs += n
        median = statistics.median(rates)
        noise = (max(rates) - min(rates)) / median if median else 0.0
        return Figures(statistics.median(times), percentile(times, 99), median, noise, runs=runs)
