"""Admission and scheduling of inference requests, per model: bounded queue, concurrency limit,
statistics. Transport-free: the HTTP layer calls :meth:`InferenceScheduler.infer` with numpy
arrays and maps :class:`Overloaded` to 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeagent.config import ModelSection
from edgeagent.errors import Overloaded
from edgeagent.runtime.manager import ModelManager, ModelVersion
from edgeagent.runtime.stats import ModelStats


@dataclass(frozen=True)
class ModelLimits:
    """Scheduling limits of one model (from its ``[[models]]`` entry)."""

    max_batch_size: int = 0
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 64
    max_concurrency: int = 2

    @classmethod
    def from_section(cls, s: ModelSection) -> ModelLimits:
        return cls(s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size, s.max_concurrency)


class _Lane:
    """The queue of one model: a semaphore for running requests and a count of waiting ones."""

    def __init__(self, limits: ModelLimits, stats: ModelStats) -> None:
        self.limits = limits
        self.stats = stats
        self.running = asyncio.Semaphore(limits.max_concurrency)
        self.waiting = 0


class InferenceScheduler:
    """Runs requests through per-model lanes; refuses with Overloaded when a queue is full."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager
        self._lanes: dict[str, _Lane] = {}
        self._stats: dict[str, ModelStats] = {}

    def configure(self, limits: Mapping[str, ModelLimits]) -> None:
        """Set (or change, on reload) the limits of each model; statistics are kept."""
        for name, lim in limits.items():
            lane = self._lanes.get(name)
            if lane is None or lane.limits != lim:
                self._lanes[name] = _Lane(lim, self.stats(name))

    def stats(self, name: str) -> ModelStats:
        return self._stats.setdefault(name, ModelStats(name))

    def all_stats(self) -> dict[str, ModelStats]:
        return dict(self._stats)

    def queue_depth(self, name: str) -> int:
        lane = self._lanes.get(name)
        return lane.waiting if lane else 0

    def _lane(self, name: str) -> _Lane:
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(ModelLimits(), self.stats(name))
        return lane

    async def infer(self, name: str, inputs: Mapping[str, np.ndarray],
                    output_names: Sequence[str] | None = None,
                    version: int | None = None) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        """Run one request on a model's active version, within its limits.

        Raises:
            Overloaded: the model's queue is full.
            ModelNotFound, ModelNotReady, InferenceInputError, InferenceError: from the manager.
        """
        self._manager.get(name, version)  # unknown / not ready: fail before queueing
        lane = self._lane(name)
        if lane.waiting >= lane.limits.max_queue_size:
            lane.stats.rejected += 1
            raise Overloaded(
                f"model {name!r} has {lane.waiting} requests queued (max_queue_size "
                f"{lane.limits.max_queue_size}); retry later",
                retry_after_s=1.0,
            )
        arrived = time.perf_counter_ns()
        lane.waiting += 1
        try:
            await lane.running.acquire()
        finally:
            lane.waiting -= 1
        started = time.perf_counter_ns()
        lane.stats.in_flight += 1
        ok = False
        try:
            mv, outputs = await self._manager.infer(name, inputs, output_names, version)
            ok = True
        finally:
            lane.running.release()
            lane.stats.in_flight -= 1
            done = time.perf_counter_ns()
            if ok:
                batch = _batch_size(inputs)
                lane.stats.execution_done(batch, done - started)
            lane.stats.request_done(ok, done - arrived, started - arrived)
        return mv, outputs


def _batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1
