"""Admission and scheduling of inference requests, per model: bounded queue, concurrency limit,
priorities and deadlines, statistics. Transport-free: the HTTP and gRPC layers call
:meth:`InferenceScheduler.infer` with numpy arrays and map :class:`Overloaded` to 503 (gRPC
UNAVAILABLE).

A request's ``priority`` (Triton's convention: 1 is the highest; 0, the default, ranks after
every explicit priority) orders the model's queue; its ``timeout`` (microseconds) is a deadline
for starting: a request still queued when it passes is answered with
:class:`~edgeagent.errors.DeadlineExceeded` and never run. Neither affects a request that finds
a free slot.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeagent.config import ModelSection
from edgeagent.errors import DeadlineExceeded, ModelNotFound, ModelNotReady, Overloaded
from edgeagent.runtime.batching import (
    BatchQueue,
    Gate,
    RunInWorker,
    priority_rank,
    request_rows,
    unbatchable_reason,
)
from edgeagent.runtime.manager import ModelManager, ModelVersion
from edgeagent.runtime.stats import ModelStats

log = logging.getLogger(__name__)


#: A batching lane whose runs are predicted at least this long, with threads that fill the
#: box's cores, runs one batch at a time (:meth:`InferenceScheduler._batch_slots`).
LONG_RUN_NS = 1_000_000


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
    """The queue of one model: a semaphore for running executions, and either a count of the
    requests waiting for it (unbatched) or the batch queue (``max_batch_size`` > 0)."""

    def __init__(self, limits: ModelLimits, stats: ModelStats, run_in_worker: RunInWorker) -> None:
        self.limits = limits
        self.stats = stats
        self.running = Gate(limits.max_concurrency)
        self.waiting = 0
        self.batcher: BatchQueue | None = None
        if limits.max_batch_size > 0:
            self.batcher = BatchQueue(limits.max_batch_size, limits.max_queue_delay_ms,
                                      limits.max_queue_size, running=self.running, stats=stats,
                                      run_in_worker=run_in_worker)
        self.warned: set[tuple[int, str]] = set()
        """(version, sha256) of versions already reported as not batchable."""

    @property
    def depth(self) -> int:
        return self.waiting + (len(self.batcher) if self.batcher is not None else 0)


class InferenceScheduler:
    """Runs requests through per-model lanes; refuses with Overloaded when a queue is full."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager
        self._lanes: dict[str, _Lane] = {}
        self._active = 0  # requests inside infer() now, running or waiting (the loop's count)
        self.quiet: Callable[[], bool] = lambda: True
        """Whether no other client may have a request on its way: the agent sets it to "at
        most one client connection open" (a request still in a socket is not in the
        scheduler yet). With :attr:`_active` it decides when a request is alone."""
        self._stats: dict[str, ModelStats] = {}
        self.cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        """CPUs this process may run on (what a run's intra-op threads compete for)."""

    def configure(self, limits: Mapping[str, ModelLimits]) -> None:
        """Set (or change, on reload) the limits of each model; statistics are kept.

        Requests already queued under the old limits finish under them.
        """
        for name, lim in limits.items():
            lane = self._lanes.get(name)
            if lane is None or lane.limits != lim:
                self._lanes[name] = _Lane(lim, self.stats(name), self._manager.run_in_worker)

    def stats(self, name: str) -> ModelStats:
        return self._stats.setdefault(name, ModelStats(name))

    def all_stats(self) -> dict[str, ModelStats]:
        return dict(self._stats)

    def queue_depth(self, name: str) -> int:
        lane = self._lanes.get(name)
        return lane.depth if lane else 0

    def describe(self, name: str) -> dict[str, Any]:
        """A model's limits, queue depth and whether dynamic batching is in effect (for status).

        ``batching`` is ``off`` (max_batch_size = 0), ``on``, or ``unavailable: <why>`` when the
        active version's first dimensions are static (it is then served unbatched).
        """
        lane = self._lanes.get(name)
        lim = lane.limits if lane is not None else ModelLimits()
        batching = "off"
        if lim.max_batch_size > 0:
            try:
                why = unbatchable_reason(self._manager.get(name).model)
            except (ModelNotFound, ModelNotReady):
                why = ""  # judged when a version is active
            batching = f"unavailable: {why}" if why else "on"
        return {"max_batch_size": lim.max_batch_size, "max_queue_delay_ms": lim.max_queue_delay_ms,
                "max_queue_size": lim.max_queue_size, "max_concurrency": lim.max_concurrency,
                "queue_depth": lane.depth if lane is not None else 0, "batching": batching}

    def _lane(self, name: str) -> _Lane:
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(ModelLimits(), self.stats(name),
                                             self._manager.run_in_worker)
        return lane

    def _overloaded(self, lane: _Lane, name: str, version: int | None = None) -> Overloaded:
        lane.stats.reject(version)
        return Overloaded(
            f"model {name!r} has {lane.depth} requests queued (max_queue_size "
            f"{lane.limits.max_queue_size}); retry later",
            retry_after_s=1.0,
        )

    async def infer(self, name: str, inputs: Mapping[str, np.ndarray],
                    output_names: Sequence[str] | None = None,
                    version: int | None = None, *, priority: int = 0,
                    timeout_us: int = 0) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        """Run one request on a model's active version, within its limits.

        With ``max_batch_size`` > 0 on a batchable model busy with other requests, the request
        is validated, then queued to share a run with others that arrive while it waits (see
        :mod:`edgeagent.runtime.batching`); the outputs are the rows it would get alone. A
        request to an idle model runs at once.

        Raises:
            Overloaded: the model's queue is full.
            DeadlineExceeded: ``timeout_us`` passed while the request was queued.
            ModelNotFound, ModelNotReady, InferenceInputError, InferenceError: from the manager.
        """
        self._active += 1
        try:
            return await self._infer(name, inputs, output_names, version, priority=priority,
                                     timeout_us=timeout_us)
        finally:
            self._active -= 1

    async def _infer(self, name: str, inputs: Mapping[str, np.ndarray],
                     output_names: Sequence[str] | None, version: int | None, *,
                     priority: int, timeout_us: int,
                     ) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        mv = self._manager.get(name, version)  # unknown / not ready: fail before queueing
        lane = self._lane(name)
        batchable = lane.batcher is not None and self._batchable(lane, mv)
        if lane.batcher is not None:
            lane.running.limit = self._batch_slots(lane, mv, inputs) if batchable \
                else lane.limits.max_concurrency
        deadline = time.perf_counter_ns() + timeout_us * 1000 if timeout_us else 0
        if lane.batcher is not None and not lane.batcher and lane.running.free:
            # Idle: run at once, by itself (the direct path may run a tiny model inline).
            return await self._infer_alone(lane, name, inputs, output_names, version,
                                           priority=priority, deadline_ns=deadline,
                                           expected=mv.version)
        if lane.batcher is not None and batchable:
            mv.acquire()  # validated against this version, so run on it even if swapped meanwhile
            try:
                arrays = mv.model.validate(inputs)
                for out in output_names or ():
                    mv.model.output_spec(out)
                rows = request_rows(arrays)
                if rows:  # inputs that disagree on their first dimension run alone, below
                    if lane.batcher.full:
                        raise self._overloaded(lane, name, mv.version)
                    return mv, await lane.batcher.submit(mv, arrays, output_names, rows,
                                                         priority=priority, deadline_ns=deadline)
            finally:
                mv.release()
        return await self._infer_alone(lane, name, inputs, output_names, version,
                                       priority=priority, deadline_ns=deadline,
                                       expected=mv.version)

    def _batch_slots(self, lane: _Lane, mv: ModelVersion,
                     inputs: Mapping[str, np.ndarray]) -> int:
        """Executions a lane that batches its model allows at once: its ``max_concurrency``,
        but one while the model's runs are long (:data:`LONG_RUN_NS`) and its threads times
        that concurrency are more than the box's cores: a second run then only splits the same
        cores, where the requests that would start it join the next batch instead
        (decisions.md, "Batching that never costs")."""
        slots = lane.limits.max_concurrency
        if slots == 1 or (mv.plan.threads or self.cpus) * slots <= self.cpus:
            return slots  # concurrent runs have cores of their own
        nbytes = sum(a.nbytes for a in inputs.values() if isinstance(a, np.ndarray))
        predicted = mv.predicted_ns(nbytes)
        return 1 if predicted is not None and predicted >= LONG_RUN_NS else slots

    def _batchable(self, lane: _Lane, mv: ModelVersion) -> bool:
        why = unbatchable_reason(mv.model)
        if why and (mv.version, mv.sha256) not in lane.warned:
            lane.warned.add((mv.version, mv.sha256))
            log.warning("model %s version %d: max_batch_size is %d but %s; serving it unbatched",
                        mv.name, mv.version, lane.limits.max_batch_size, why)
        return not why

    async def _infer_alone(self, lane: _Lane, name: str, inputs: Mapping[str, np.ndarray],
                           output_names: Sequence[str] | None, version: int | None, *,
                           priority: int = 0, deadline_ns: int = 0, expected: int,
                           ) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        # ``expected``: the version active on arrival, what a failure is counted against.
        arrived = time.perf_counter_ns()
        if not lane.running.try_acquire():
            if lane.depth >= lane.limits.max_queue_size:
                raise self._overloaded(lane, name, expected)
            lane.waiting += 1
            try:
                await lane.running.acquire(priority_rank(priority), deadline_ns)
            except DeadlineExceeded:
                lane.stats.request_done(False, time.perf_counter_ns() - arrived, 0,
                                        version=expected)
                raise
            finally:
                lane.waiting -= 1
        started = time.perf_counter_ns()
        lane.stats.in_flight += 1
        ok, served = False, expected
        try:
            # Alone: no other request in the agent is running or waiting (this one counts),
            # and no other client is connected whose next request could be waiting unread.
            alone = self._active == 1 and self.quiet()
            mv, outputs = await self._manager.infer(name, inputs, output_names, version,
                                                    alone=alone)
            ok, served = True, mv.version
        finally:
            lane.running.release()
            lane.stats.in_flight -= 1
            done = time.perf_counter_ns()
            if ok:
                lane.stats.execution_done(request_rows(inputs) or 1, done - started,
                                          version=served)
            lane.stats.request_done(ok, done - arrived, started - arrived, version=served)
        return mv, outputs
