"""``GET /metrics``: what an operator's Prometheus scrapes, read from the agent's own sources.

Every figure is read when scraped, from the component that owns it: per-model and per-version
request figures from :class:`~edgeagent.runtime.stats.ModelStats` (the same numbers as Triton's
statistics extension and the MQTT telemetry), what serves from the model manager, hub and
broker state and the spool from the agent's status, system figures from a
:class:`~edgeagent.telemetry.system.SystemSampler` (the MQTT telemetry's readers). The
collectors sit on a private registry (with a ProcessCollector) so that several agents in one
process, as in tests, never collide in the global registry.

Naming (documented in docs/api.md): every per-model series carries ``model`` and ``version``;
request outcomes are one counter, ``edgeagent_inference_requests_total{outcome="success"|
"failure"}``, so ``sum without (outcome)`` is the request rate and a ratio of the two the error
rate. Counters are kept per version, so a rollout shows both versions side by side; gauges
(queue depth, in flight, ready) carry the version active now.

The exposition is prometheus-client's own: ``choose_encoder`` picks OpenMetrics or the text
format from ``Accept``, and the body is gzipped when ``Accept-Encoding`` allows it.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import platform
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from edgeagent import __version__
from edgeagent.fsutil import unix_socket
from edgeagent.runtime.manager import ModelManager
from edgeagent.runtime.scheduler import InferenceScheduler
from edgeagent.runtime.stats import Histogram

if TYPE_CHECKING:
    import uvicorn

    from edgeagent.api.services import Services
    from edgeagent.telemetry.system import SystemSampler

__all__ = ["AgentCollector", "MetricsListener", "ModelCollector", "SystemCollector",
           "build_registry", "exposition", "metrics_app"]

log = logging.getLogger(__name__)

#: Upper bounds of the batch-size histogram (powers of two up to typical max_batch_size).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: The hub sync states (``SyncStatus.state``), one gauge each (1 for the current one).
HUB_STATES = ("idle", "ok", "unreachable", "expired", "refused")
#: Labels of ``edgeagent_model_info``.
MODEL_INFO_LABELS = ("model", "version", "format", "precision", "variant", "provider")


def _histogram(h: Histogram) -> tuple[list[tuple[str, float]], float]:
    return [(b, float(n)) for b, n in h.cumulative()], h.total


def _batch_buckets(sizes: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    cumulative = [(str(bound), float(sum(n for k, n in sizes.items() if k <= bound)))
                  for bound in BATCH_BUCKETS]
    cumulative.append(("+Inf", float(sum(sizes.values()))))
    return cumulative, float(sum(k * n for k, n in sizes.items()))


class ModelCollector(Collector):
    """Per-model and per-version request, latency, queue, batch and serving figures."""

    def __init__(self, scheduler: InferenceScheduler, manager: ModelManager) -> None:
        self._scheduler = scheduler
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        mv_labels = ["model", "version"]
        requests = CounterMetricFamily(
            "edgeagent_inference_requests", "Inference requests by outcome (success, failure)",
            labels=[*mv_labels, "outcome"])
        rejected = CounterMetricFamily(
            "edgeagent_inference_rejected", "Requests refused because the model's queue was full",
            labels=mv_labels)
        executions = CounterMetricFamily(
            "edgeagent_model_executions", "Runs of the model (a batch counts once)",
            labels=mv_labels)
        latency = HistogramMetricFamily(
            "edgeagent_inference_latency_seconds",
            "Latency of successful requests, from arrival to result", labels=mv_labels)
        queue = HistogramMetricFamily(
            "edgeagent_inference_queue_seconds", "Time successful requests waited before running",
            labels=mv_labels)
        batches = HistogramMetricFamily(
            "edgeagent_inference_batch_size", "Batch size of each model run", labels=mv_labels)
        in_flight = GaugeMetricFamily(
            "edgeagent_inference_in_flight", "Requests running now (version: the active one)",
            labels=mv_labels)
        depth = GaugeMetricFamily(
            "edgeagent_inference_queue_depth", "Requests waiting now (version: the active one)",
            labels=mv_labels)
        ready = GaugeMetricFamily(
            "edgeagent_model_ready", "1 when the model is loaded and serving", labels=mv_labels)
        info = InfoMetricFamily(
            "edgeagent_model", "What serves each model: version, format, precision, variant, "
            "execution provider in use", labels=["model"])
        fallback = GaugeMetricFamily(
            "edgeagent_model_provider_fallback",
            "1 when the active version runs on a later provider of its plan than the first "
            "(a TensorRT -> CPU fallback, say)", labels=[*mv_labels, "provider"])
        loaded = GaugeMetricFamily(
            "edgeagent_model_loaded_timestamp_seconds", "When the active version was activated",
            labels=mv_labels)
        stats = self._scheduler.all_stats()
        status = {m["name"]: m for m in self._manager.status()}
        for name in sorted(set(stats) | set(status)):
            entry = status.get(name, {})
            active = "" if entry.get("version") is None else str(entry["version"])
            ready.add_metric([name, active], 1.0 if self._manager.ready(name) else 0.0)
            depth.add_metric([name, active], self._scheduler.queue_depth(name))
            if active:
                info.add_metric([name], {
                    "version": active, "format": str(entry.get("format") or ""),
                    "precision": str(entry.get("precision") or ""),
                    "variant": str(entry.get("variant") or ""),
                    "provider": str(entry.get("provider") or "")})
                fallback.add_metric([name, active, str(entry.get("provider") or "")],
                                    1.0 if entry.get("fallback") else 0.0)
                if entry.get("loaded_at") is not None:
                    loaded.add_metric([name, active], float(entry["loaded_at"]))
            s = stats.get(name)
            if s is None:
                continue
            with s.lock:
                in_flight.add_metric([name, active], s.in_flight)
                versions = sorted(s.versions.items())
                rows = [(str(v), vs.success, vs.failure, vs.rejected, vs.executions,
                         _histogram(vs.latency), _histogram(vs.queue_time),
                         _batch_buckets(vs.batch_sizes)) for v, vs in versions]
            for v, ok, failed, refused, runs, lat, que, bat in rows:
                requests.add_metric([name, v, "success"], ok)
                requests.add_metric([name, v, "failure"], failed)
                rejected.add_metric([name, v], refused)
                executions.add_metric([name, v], runs)
                latency.add_metric([name, v], *lat)
                queue.add_metric([name, v], *que)
                batches.add_metric([name, v], *bat)
        yield from (requests, rejected, executions, latency, queue, batches, in_flight, depth,
                    ready, info, fallback, loaded)


def _onnxruntime_build() -> tuple[str, str]:
    from edgeagent.device.facts import installed_packages
    from edgeagent.device.probe import onnxruntime_build

    packages = installed_packages()
    build = onnxruntime_build(packages)
    return build["build"], ",".join(f"{k} {v}" for k, v in build["packages"].items())


class AgentCollector(Collector):
    """The agent itself: build, device, hub sync, broker connection, telemetry spool.

    Args:
        status: The agent's status (``Agent.status``: ``hub``, ``mqtt``, device and profile).
    """

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status
        self._build = _onnxruntime_build()

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        build = InfoMetricFamily("edgeagent_build", "The agent's build and its runtimes")
        ort_build, ort_packages = self._build
        build.add_metric([], {"version": __version__, "python": platform.python_version(),
                              "onnxruntime_build": ort_build, "onnxruntime": ort_packages})
        yield build
        device = InfoMetricFamily(
            "edgeagent_device", "This box: device id (the MQTT one) and device profile")
        profile = status.get("profile") or {}
        device.add_metric([], {"device_id": str(status.get("device_id", "")),
                               "profile": str(profile.get("name", "")),
                               "arch": platform.machine()})
        yield device
        yield from self._hub(status.get("hub") or {})
        yield from self._mqtt(status.get("mqtt") or {})

    @staticmethod
    def _hub(hub: Mapping[str, Any]) -> Iterator[Metric]:
        if not hub.get("configured") or "state" not in hub:
            return
        state = GaugeMetricFamily(
            "edgeagent_hub_sync_state", "1 for the hub sync's current state", labels=["state"])
        for name in HUB_STATES:
            state.add_metric([name], 1.0 if hub["state"] == name else 0.0)
        yield state
        up = GaugeMetricFamily("edgeagent_hub_up", "1 when the last hub sync succeeded")
        up.add_metric([], 1.0 if hub["state"] == "ok" else 0.0)
        yield up
        if hub.get("last_sync") is not None:
            last = GaugeMetricFamily("edgeagent_hub_last_sync_timestamp_seconds",
                                     "When the hub was last synced successfully")
            last.add_metric([], float(hub["last_sync"]))
            yield last

    @staticmethod
    def _mqtt(mqtt: Mapping[str, Any]) -> Iterator[Metric]:
        spool = mqtt.get("spool")
        if isinstance(spool, Mapping):
            for name, key, doc, family in (
                    ("edgeagent_spool_messages", "depth", "Telemetry messages waiting for the "
                     "broker", GaugeMetricFamily),
                    ("edgeagent_spool_bytes", "bytes", "Bytes of telemetry waiting for the broker",
                     GaugeMetricFamily),
                    ("edgeagent_spool_dropped", "dropped", "Telemetry messages the spool bound "
                     "forced out, ever", CounterMetricFamily)):
                metric = family(name, doc)
                metric.add_metric([], float(spool.get(key, 0)))
                yield metric
        if mqtt.get("configured") and "connected" in mqtt:
            connected = GaugeMetricFamily("edgeagent_broker_connected",
                                          "1 while connected to the MQTT broker")
            connected.add_metric([], 1.0 if mqtt["connected"] else 0.0)
            yield connected
            connects = CounterMetricFamily("edgeagent_broker_connects",
                                           "Successful connections to the broker")
            connects.add_metric([], float(mqtt.get("connects", 0)))
            yield connects


class SystemCollector(Collector):
    """CPU, memory, disk, temperatures, power rails and GPUs, as gauges (what the MQTT
    telemetry's ``system`` part holds). A figure the box does not have is left out."""

    def __init__(self, sampler: SystemSampler) -> None:
        self._sampler = sampler

    def collect(self) -> Iterator[Metric]:
        s = self._sampler.sample()

        def gauge(name: str, doc: str, value: float | None,
                  labels: Mapping[str, str] | None = None) -> GaugeMetricFamily | None:
            if value is None:
                return None
            g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
            g.add_metric(list((labels or {}).values()), float(value))
            return g

        memory, disk = s.get("memory") or {}, s.get("disk") or {}
        mb = 2 ** 20
        singles = [
            gauge("edgeagent_system_cpu_percent", "CPU use since the previous scrape",
                  s.get("cpu_percent")),
            gauge("edgeagent_system_memory_total_bytes", "Memory of the box",
                  memory["total_mb"] * mb if "total_mb" in memory else None),
            gauge("edgeagent_system_memory_available_bytes", "Memory available",
                  memory["available_mb"] * mb if "available_mb" in memory else None),
            gauge("edgeagent_system_disk_total_bytes", "Size of the state directory's file system",
                  disk["total_mb"] * mb if "total_mb" in disk else None),
            gauge("edgeagent_system_disk_free_bytes", "Free space for the state directory",
                  disk["free_mb"] * mb if "free_mb" in disk else None),
        ]
        yield from (g for g in singles if g is not None)
        load = s.get("load")
        if load:
            g = GaugeMetricFamily("edgeagent_system_load_average", "Load average",
                                  labels=["period"])
            for period, value in zip(("1m", "5m", "15m"), load, strict=False):
                g.add_metric([period], value)
            yield g
        temps = s.get("temperatures_c") or {}
        if temps:
            g = GaugeMetricFamily("edgeagent_system_temperature_celsius",
                                  "Temperature per thermal zone", labels=["zone"])
            for zone, value in sorted(temps.items()):
                g.add_metric([zone], value)
            yield g
        power = s.get("power") or {}
        if power:
            g = GaugeMetricFamily("edgeagent_system_power_milliwatts",
                                  "Power per rail (Jetson INA3221)", labels=["rail"])
            for rail, value in sorted(power.items()):
                g.add_metric([rail], value["mw"])
            yield g
        yield from self._gpus(s)

    @staticmethod
    def _gpus(s: Mapping[str, Any]) -> Iterator[Metric]:
        load = GaugeMetricFamily("edgeagent_gpu_load_percent", "GPU load", labels=["gpu"])
        mem_used = GaugeMetricFamily("edgeagent_gpu_memory_used_bytes", "GPU memory used",
                                     labels=["gpu"])
        mem_total = GaugeMetricFamily("edgeagent_gpu_memory_total_bytes", "GPU memory",
                                      labels=["gpu"])
        temp = GaugeMetricFamily("edgeagent_gpu_temperature_celsius", "GPU temperature",
                                 labels=["gpu"])
        power = GaugeMetricFamily("edgeagent_gpu_power_milliwatts", "GPU power draw",
                                  labels=["gpu"])
        if s.get("gpu_load_percent") is not None:  # Jetson's integrated GPU
            load.add_metric(["integrated"], s["gpu_load_percent"])
        for gpu in s.get("gpus") or ():
            i = str(gpu["index"])
            load.add_metric([i], gpu["load_percent"])
            mem_used.add_metric([i], gpu["memory_used_mb"] * 2 ** 20)
            mem_total.add_metric([i], gpu["memory_total_mb"] * 2 ** 20)
            temp.add_metric([i], gpu["temperature_c"])
            power.add_metric([i], gpu["power_mw"])
        yield from (m for m in (load, mem_used, mem_total, temp, power) if m.samples)


def build_registry(scheduler: InferenceScheduler, manager: ModelManager, *,
                   status: Callable[[], dict[str, Any]] | None = None,
                   system: SystemSampler | None = None) -> CollectorRegistry:
    """A private registry: models, the agent (given ``status``), the system (given a sampler)
    and the process's CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ModelCollector(scheduler, manager))
    if status is not None:
        registry.register(AgentCollector(status))
    if system is not None:
        registry.register(SystemCollector(system))
    ProcessCollector(registry=registry)
    return registry


def registry_for(services: Services) -> CollectorRegistry:
    """The registry an agent's listeners expose (each listener has its own: the system
    sampler measures CPU use between its own scrapes)."""
    from edgeagent.telemetry.system import SystemSampler

    state_dir = Path(services.status().get("state_dir") or ".")
    return build_registry(services.scheduler, services.manager, status=services.status,
                          system=SystemSampler(services.root, disk_path=state_dir))


def exposition(registry: CollectorRegistry, accept: str,
               accept_encoding: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a scrape: OpenMetrics when ``Accept`` asks for it, the
    Prometheus text format otherwise; gzipped when ``Accept-Encoding`` allows it."""
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    headers = {"Content-Type": content_type}
    if gzip_accepted(accept_encoding):
        body = gzip.compress(body, compresslevel=6)
        headers["Content-Encoding"] = "gzip"
    headers["Vary"] = "Accept, Accept-Encoding"
    return body, headers


def metrics_response(registry: CollectorRegistry, request: Request) -> Response:
    body, headers = exposition(registry, request.headers.get("accept", ""),
                               request.headers.get("accept-encoding", ""))
    return Response(body, headers=headers)


def metrics_app(services: Services, token: str | None) -> ASGIApp:
    """The separate metrics listener's application: ``GET /metrics`` only, behind ``token``
    (``Authorization: Bearer``, as Prometheus's ``authorization`` setting sends it)."""
    from starlette.applications import Starlette

    from edgeagent.api.auth import RequestGuard

    registry = registry_for(services)

    async def metrics(request: Request) -> Response:
        return metrics_response(registry, request)

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("only GET /metrics is served here\n", status_code=404)

    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])],
                    exception_handlers={404: not_found})
    return RequestGuard(app, token=token,
                        max_header_bytes=services.config.http.max_header_bytes)


class MetricsListener:
    """The optional ``[metrics] listen`` server: a remote Prometheus scrapes it without
    reaching the inference endpoint."""

    def __init__(self, listen: str, app: ASGIApp) -> None:
        self.listen = listen
        self._app = app
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and serve.

        Raises:
            EdgeAgentError: the address is in use or not permitted.
        """
        import uvicorn

        from edgeagent.errors import EdgeAgentError

        kwargs: dict[str, Any] = {}
        path = Path(self.listen[5:]) if self.listen.startswith("unix:") else None
        if path is not None:
            kwargs["uds"] = str(path)
        else:
            host, _, port = self.listen.rpartition(":")
            kwargs.update(host=host.strip("[]"), port=int(port))
        config = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
                                server_header=False, **kwargs)
        server = uvicorn.Server(config)
        config.load()
        server.lifespan = config.lifespan_class(config)
        try:
            # The owner and the agent's group only, as the API socket.
            with unix_socket(path):
                await server.startup()
        except (SystemExit, OSError) as exc:
            raise EdgeAgentError(
                f"cannot listen on {self.listen} for metrics (in use, or not permitted)") from exc
        self._server = server
        self._task = asyncio.create_task(server.main_loop(), name="metrics-main-loop")
        log.info("metrics on %s", self.listen)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        await self._server.shutdown()
        self._server = None
