"""``/metrics`` as an operator's Prometheus sees it: names, labels, exposition, collectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from edgeagent import __version__
from edgeagent.api.metrics import AgentCollector, SystemCollector
from edgeagent.telemetry.system import SystemSampler
from tests.api.conftest import AgentThread

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a text exposition, keyed by name and label set."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


def _x(rows: int = 1) -> dict[str, object]:
    data = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    return {"name": "input", "datatype": "FP32", "shape": [rows, 64],
            "data": data.ravel().tolist()}


def _infer(c: httpx.Client, model: str = "mlp", body: dict[str, object] | None = None,
           ) -> httpx.Response:
    return c.post(f"/v2/models/{model}/infer", json=body or {"inputs": [_x()]})


def test_names_and_labels(agent: AgentThread) -> None:
    with httpx.Client(base_url=agent.url, headers=agent.headers) as c:
        before = samples(c.get("/metrics").text)
        assert _infer(c).status_code == 200
        bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],
                           "data": [1, 2, 3]}]}
        assert _infer(c, body=bad).status_code == 400
        r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(r.text)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return got[key] - before.get(key, 0.0)

    mv = {"model": "mlp", "version": "1"}
    assert delta("edgeagent_inference_requests_total", **mv, outcome="success") == 1
    assert delta("edgeagent_inference_requests_total", **mv, outcome="failure") == 1
    assert delta("edgeagent_model_executions_total", **mv) == 1
    assert delta("edgeagent_inference_latency_seconds_count", **mv) == 1
    assert ("edgeagent_inference_latency_seconds_bucket",
            frozenset({**mv, "le": "+Inf"}.items())) in got
    assert ("edgeagent_inference_queue_seconds_sum", frozenset(mv.items())) in got
    assert ("edgeagent_inference_batch_size_bucket", frozenset({**mv, "le": "1"}.items())) in got
    assert value(got, "edgeagent_inference_rejected_total", **mv) == 0
    assert value(got, "edgeagent_inference_in_flight", **mv) == 0
    assert value(got, "edgeagent_inference_queue_depth", **mv) == 0
    assert value(got, "edgeagent_model_ready", **mv) == 1
    assert value(got, "edgeagent_model_info", **mv, format="onnx", precision="fp32",
                 variant="", provider="CPUExecutionProvider") == 1
    assert value(got, "edgeagent_model_provider_fallback", **mv,
                 provider="CPUExecutionProvider") == 0
    assert value(got, "edgeagent_model_loaded_timestamp_seconds", **mv) > 0
    # Every per-model series has a version label.
    per_model = [(n, dict(labels)) for n, labels in got if dict(labels).get("model")]
    assert per_model and all("version" in labels for _, labels in per_model)
    builds = [dict(labels) for n, labels in got if n == "edgeagent_build_info"]
    assert len(builds) == 1 and builds[0]["version"] == __version__
    assert builds[0]["onnxruntime_build"] in ("cpu", "gpu", "both")
    (device,) = [dict(labels) for n, labels in got if n == "edgeagent_device_info"]
    assert device["device_id"] == "api-test" and device["profile"]
    # No broker configured: the spool still holds telemetry, and says so.
    assert ("edgeagent_spool_messages", frozenset()) in got
    assert ("edgeagent_spool_dropped_total", frozenset()) in got
    assert not any(n.startswith("edgeagent_broker_") for n, _ in got)
    # System figures of this (Linux) box, as gauges.
    for name in ("edgeagent_system_memory_total_bytes", "edgeagent_system_disk_free_bytes"):
        assert value(got, name) > 0
    assert {dict(labels)["period"] for n, labels in got
            if n == "edgeagent_system_load_average"} == {"1m", "5m", "15m"}
    assert value(got, "process_resident_memory_bytes") > 0


def test_openmetrics_and_gzip(agent: AgentThread) -> None:
    with httpx.Client(base_url=agent.url, headers=agent.headers) as c:
        assert _infer(c).status_code == 200
        r = c.get("/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
            "Accept-Encoding": "gzip"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.headers["content-encoding"] == "gzip"
        raw = c.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"
    assert r.text.endswith("# EOF\n")
    families = {f.name: f for f in parse_om(r.text)}
    assert families["edgeagent_inference_requests"].type == "counter"
    assert families["edgeagent_model"].type == "info"
    assert families["edgeagent_build"].type == "info"
    assert families["edgeagent_inference_latency_seconds"].type == "histogram"
    # httpx undid the gzip; what came over the wire is smaller than the text it carries.
    assert int(raw.headers["content-length"]) < len(raw.text)
    assert raw.text.startswith("# HELP")


class _FakeNvmlSampler(SystemSampler):
    """A live sampler whose NVML answer is fixed (no NVIDIA GPU on the test box)."""

    def _nvml_gpus(self) -> list[dict[str, Any]] | None:
        return [{"index": 0, "load_percent": 12, "memory_used_mb": 512.0,
                 "memory_total_mb": 8192.0, "temperature_c": 51, "power_mw": 35000}]


def test_system_figures_as_gauges_from_a_fake_jetson_tree(tmp_path: Path) -> None:
    def put(rel: str, text: str) -> None:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    put("proc/stat", "cpu  100 0 100 800 0 0 0 0 0 0\n")
    put("proc/meminfo", "MemTotal: 8000000 kB\nMemAvailable: 2000000 kB\n")
    put("proc/loadavg", "0.50 0.40 0.30 1/100 42\n")
    put("sys/class/thermal/thermal_zone0/type", "CPU-therm\n")
    put("sys/class/thermal/thermal_zone0/temp", "45500\n")
    put("sys/devices/platform/gpu.0/load", "375\n")
    hw = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    put(f"{hw}/in1_label", "VDD_IN\n")
    put(f"{hw}/in1_input", "5000\n")
    put(f"{hw}/curr1_input", "1200\n")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SystemCollector(_FakeNvmlSampler(tmp_path, disk_path=tmp_path)))
    generate_latest(registry)  # the first scrape: CPU use is measured from here on
    put("proc/stat", "cpu  200 0 200 900 0 0 0 0 0 0\n")
    got = samples(generate_latest(registry).decode())
    assert value(got, "edgeagent_system_cpu_percent") == 66.7
    assert value(got, "edgeagent_system_memory_total_bytes") == 8000000 * 1024
    assert value(got, "edgeagent_system_load_average", period="5m") == 0.4
    assert value(got, "edgeagent_system_temperature_celsius", zone="CPU-therm") == 45.5
    assert value(got, "edgeagent_system_power_milliwatts", rail="VDD_IN") == 6000.0
    assert value(got, "edgeagent_gpu_load_percent", gpu="integrated") == 37.5
    assert value(got, "edgeagent_gpu_load_percent", gpu="0") == 12
    assert value(got, "edgeagent_gpu_memory_used_bytes", gpu="0") == 512 * 2**20
    assert value(got, "edgeagent_gpu_temperature_celsius", gpu="0") == 51
    assert value(got, "edgeagent_gpu_power_milliwatts", gpu="0") == 35000
    assert value(got, "edgeagent_system_disk_total_bytes") > 0


def test_a_box_without_those_figures_leaves_them_out(tmp_path: Path) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SystemCollector(SystemSampler(tmp_path / "empty", disk_path=tmp_path,
                                                    nvml=False)))
    names = {n for n, _ in samples(generate_latest(registry).decode())}
    assert names == {"edgeagent_system_disk_total_bytes", "edgeagent_system_disk_free_bytes"}


@pytest.mark.parametrize(("hub", "mqtt", "want"), [
    ({"configured": True, "state": "unreachable", "last_sync": 1700000000.0},
     {"configured": True, "connected": True, "connects": 3,
      "spool": {"depth": 5, "bytes": 640, "dropped": 2, "next_seq": 9}},
     {("edgeagent_hub_up", ()): 0.0, ("edgeagent_hub_sync_state", (("state", "unreachable"),)): 1,
      **{("edgeagent_hub_sync_state", (("state", s),)): 0
         for s in ("idle", "ok", "expired", "refused")},
      ("edgeagent_hub_last_sync_timestamp_seconds", ()): 1700000000.0,
      ("edgeagent_broker_connected", ()): 1, ("edgeagent_broker_connects_total", ()): 3,
      ("edgeagent_spool_messages", ()): 5, ("edgeagent_spool_bytes", ()): 640,
      ("edgeagent_spool_dropped_total", ()): 2}),
    ({"configured": False}, {"configured": False}, {}),
])
def test_hub_broker_and_spool_series(hub: dict[str, Any], mqtt: dict[str, Any],
                                     want: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                                     ) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(lambda: {"device_id": "d", "profile": {"name": "p"},
                                              "hub": hub, "mqtt": mqtt}))
    got = {k: v for k, v in samples(generate_latest(registry).decode()).items()
           if k[0] not in ("edgeagent_build_info", "edgeagent_device_info")}
    assert got == {(n, frozenset(labels)): v for (n, labels), v in want.items()}
