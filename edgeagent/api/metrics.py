"""``GET /metrics``: Prometheus text exposition of the per-model statistics and the process.

The collector reads :class:`~edgeagent.runtime.stats.ModelStats` when scraped, so Prometheus,
Triton's statistics extension and MQTT telemetry all show the same numbers from one source.
It is registered on a private registry (with a ProcessCollector for CPU and memory) so that
several agents in one process, as in tests, never collide in the global registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.scheduler import InferenceScheduler

__all__ = ["CONTENT_TYPE_LATEST", "ModelCollector", "build_registry"]

#: Upper bounds of the batch-size histogram (powers of two up to typical max_batch_size).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ModelCollector(Collector):
    """Per-model request, failure, latency, queue, batch and load figures, read when scraped."""

    def __init__(self, scheduler: InferenceScheduler, manager: ModelManager) -> None:
        self._scheduler = scheduler
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        label = ["model"]
        requests = CounterMetricFamily("edgeagent_inference_requests",
                                       "Inference requests that succeeded", labels=label)
        failures = CounterMetricFamily("edgeagent_inference_failures",
                                       "Inference requests that failed", labels=label)
        rejected = CounterMetricFamily("edgeagent_inference_rejected",
                                       "Requests refused because the model's queue was full",
                                       labels=label)
        executions = CounterMetricFamily("edgeagent_model_executions",
                                         "Runs of the model (a batch counts once)", labels=label)
        latency = HistogramMetricFamily("edgeagent_inference_latency_seconds",
                                        "Request latency from arrival to result", labels=label)
        queue = HistogramMetricFamily("edgeagent_inference_queue_seconds",
                                      "Time requests waited before running", labels=label)
        batches = HistogramMetricFamily("edgeagent_inference_batch_size",
                                        "Batch size of each model run", labels=label)
        in_flight = GaugeMetricFamily("edgeagent_inference_in_flight",
                                      "Requests running now", labels=label)
        depth = GaugeMetricFamily("edgeagent_inference_queue_depth",
                                  "Requests waiting now", labels=label)
        ready = GaugeMetricFamily("edgeagent_model_ready",
                                  "1 when the model is loaded and serving", labels=label)
        stats = self._scheduler.all_stats()
        for name in sorted(set(stats) | set(self._manager.names())):
            labels = [name]
            ready.add_metric(labels, 1.0 if self._manager.ready(name) else 0.0)
            depth.add_metric(labels, self._scheduler.queue_depth(name))
            s = stats.get(name)
            if s is None:
                continue
            with s.lock:
                requests.add_metric(labels, s.success.count)
                failures.add_metric(labels, s.fail.count)
                rejected.add_metric(labels, s.rejected)
                executions.add_metric(labels, s.execution_count)
                in_flight.add_metric(labels, s.in_flight)
                latency.add_metric(labels, s.latency.cumulative(), s.latency.total)
                queue.add_metric(labels, s.queue_time.cumulative(), s.queue_time.total)
                sizes = dict(s.batch_sizes)
            cumulative = [(str(bound), sum(n for k, n in sizes.items() if k <= bound))
                          for bound in BATCH_BUCKETS]
            cumulative.append(("+Inf", sum(sizes.values())))
            batches.add_metric(labels, cumulative, float(sum(k * n for k, n in sizes.items())))
        yield from (requests, failures, rejected, executions, latency, queue, batches,
                    in_flight, depth, ready)


def build_registry(scheduler: InferenceScheduler, manager: ModelManager) -> CollectorRegistry:
    """A private registry with the model collector and the process's CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ModelCollector(scheduler, manager))
    ProcessCollector(registry=registry)
    return registry
