"""Per-model inference statistics: one source for Triton's statistics extension, Prometheus
metrics and MQTT telemetry.

Counters follow Triton's statistics extension (counts and cumulative nanoseconds); histograms
use fixed buckets so ``/metrics`` can expose them without a second bookkeeping; a bounded window
of recent latencies gives telemetry its p50/p95/p99 per interval.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Latency buckets in seconds (upper bounds), from sub-millisecond MLPs to slow CNNs on a Pi.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


@dataclass
class Duration:
    """A Triton ``{count, ns}`` pair."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Histogram:
    """Fixed-bucket histogram of seconds (cumulative counts are computed when read)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class VersionStats:
    """Cumulative figures of one version of a model (the ``version`` label on ``/metrics``):
    during a rollout, version 1 and version 2 are counted apart."""

    success: int = 0
    failure: int = 0
    rejected: int = 0
    executions: int = 0
    latency: Histogram = field(default_factory=Histogram)
    queue_time: Histogram = field(default_factory=Histogram)
    batch_sizes: Counter[int] = field(default_factory=Counter)


#: Versions whose figures a model keeps (the oldest seen goes first): a box that took a hundred
#: releases does not expose a hundred versions' series.
MAX_VERSIONS = 4


class ModelStats:
    """Statistics of one model, updated by the scheduler from any thread.

    The Triton-shaped totals cover every version; :attr:`versions` keeps the same figures per
    version, for callers that say which version served (``version=``).
    """

    def __init__(self, name: str, window: int = 4096) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.latency = Histogram()
        self.queue_time = Histogram()
        self.batch_sizes: Counter[int] = Counter()
        self.batch_ns: Counter[int] = Counter()
        """Compute nanoseconds spent per batch size (Triton's ``batch_stats``)."""
        self.batch_input_ns: Counter[int] = Counter()
        self.batch_output_ns: Counter[int] = Counter()
        self.in_flight = 0
        self.rejected = 0
        self.versions: dict[int, VersionStats] = {}
        """Per version, for those requests whose version was given."""
        self._recent: deque[float] = deque(maxlen=window)

    def _version(self, version: int | None) -> VersionStats | None:
        if version is None:
            return None
        vs = self.versions.get(version)
        if vs is None:
            vs = self.versions[version] = VersionStats()
            while len(self.versions) > MAX_VERSIONS:
                del self.versions[next(iter(self.versions))]
        return vs

    def reject(self, version: int | None = None) -> None:
        """One request refused because the queue was full."""
        with self.lock:
            self.rejected += 1
            vs = self._version(version)
            if vs is not None:
                vs.rejected += 1

    def request_done(self, ok: bool, total_ns: int, queue_ns: int,
                     version: int | None = None) -> None:
        """One request finished (successfully or not), ``total_ns`` after it arrived, on
        ``version`` (when the caller knows it)."""
        with self.lock:
            self.last_inference_ms = int(time.time() * 1000)
            vs = self._version(version)
            if vs is not None:
                if ok:
                    vs.success += 1
                    vs.latency.observe(total_ns / 1e9)
                    vs.queue_time.observe(queue_ns / 1e9)
                else:
                    vs.failure += 1
            if ok:
                self.inference_count += 1
                self.success.add(total_ns)
                self.queue.add(queue_ns)
                self.latency.observe(total_ns / 1e9)
                self.queue_time.observe(queue_ns / 1e9)
                self._recent.append(total_ns / 1e9)
            else:
                self.fail.add(total_ns)

    def execution_done(self, batch_size: int, compute_ns: int, requests: int = 1, *,
                       input_ns: int = 0, output_ns: int = 0,
                       version: int | None = None) -> None:
        """One run of the model (possibly several requests batched together), on ``version``
        (when the caller knows it).

        As Triton counts them, each of ``compute_input``, ``compute_infer`` and
        ``compute_output`` counts every request of the run (Triton's tools check that the
        three counts agree); ``input_ns`` is the batch's assembly, ``output_ns`` its split.
        """
        with self.lock:
            vs = self._version(version)
            if vs is not None:
                vs.executions += 1
                vs.batch_sizes[batch_size] += 1
            self.execution_count += 1
            self.compute_input.add(input_ns, requests)
            self.compute_infer.add(compute_ns, requests)
            self.compute_output.add(output_ns, requests)
            self.batch_sizes[batch_size] += 1
            self.batch_ns[batch_size] += compute_ns
            self.batch_input_ns[batch_size] += input_ns
            self.batch_output_ns[batch_size] += output_ns

    def take_window(self) -> dict[str, float]:
        """Latency percentiles (ms) of the requests since the last call; resets the window."""
        with self.lock:
            samples = np.fromiter(self._recent, dtype=np.float64)
            self._recent.clear()
        if samples.size == 0:
            return {"count": 0}
        p50, p95, p99 = np.percentile(samples, [50, 95, 99]) * 1000
        return {"count": int(samples.size), "p50_ms": float(p50), "p95_ms": float(p95),
                "p99_ms": float(p99)}

    def triton(self, version: str) -> dict[str, Any]:
        """This model's entry in Triton's statistics extension."""
        with self.lock:
            return {
                "name": self.name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_dict(),
                    "fail": self.fail.to_dict(),
                    "queue": self.queue.to_dict(),
                    "compute_input": self.compute_input.to_dict(),
                    "compute_infer": self.compute_infer.to_dict(),
                    "compute_output": self.compute_output.to_dict(),
                },
                "batch_stats": [
                    {"batch_size": size,
                     "compute_input": {"count": n, "ns": self.batch_input_ns[size]},
                     "compute_infer": {"count": n, "ns": self.batch_ns[size]},
                     "compute_output": {"count": n, "ns": self.batch_output_ns[size]}}
                    for size, n in sorted(self.batch_sizes.items())
                ],
            }
