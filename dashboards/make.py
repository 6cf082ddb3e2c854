"""Write the Grafana dashboards (``edgeagent-box.json``, ``edgeagent-fleet.json``) from the
panel lists below: ``python dashboards/make.py``. A test checks the JSON files are what this
script writes, and that every metric a panel queries exists in a running agent's /metrics.

Devices are told apart by Prometheus's ``instance`` label (the scrape target); the fleet
dashboard names them with ``edgeagent_device_info{device_id, profile}`` joined on ``instance``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
BOX = 'instance="$instance"'
BOX_MODEL = 'instance="$instance", model=~"$model"'
FLEET = 'instance=~"$instance"'
FLEET_MODEL = 'instance=~"$instance", model=~"$model"'
RATE = "$__rate_interval"


def _target(expr: str, legend: str = "", *, instant: bool = False,
            ref: str = "A") -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update(instant=True, range=False, format="table")
    return t


class Layout:
    """Places panels left to right, 24 grid units wide, in rows."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "id": len(self.panels) + 1,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def add(self, title: str, targets: list[dict[str, Any]], *, kind: str = "timeseries",
            unit: str = "short", w: int = 8, h: int = 8, description: str = "",
            options: dict[str, Any] | None = None) -> None:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        for i, t in enumerate(targets):
            t["refId"] = chr(ord("A") + i)
        panel: dict[str, Any] = {
            "type": kind, "title": title, "description": description, "datasource": DS,
            "id": len(self.panels) + 1, "targets": targets,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": options or {},
        }
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def _variables(fleet: bool) -> list[dict[str, Any]]:
    def query(name: str, q: str, *, multi: bool, label: str) -> dict[str, Any]:
        return {"type": "query", "name": name, "label": label, "datasource": DS,
                "query": {"query": q, "refId": name}, "definition": q, "refresh": 2,
                "multi": multi, "includeAll": multi, "sort": 1,
                **({"allValue": ".+", "current": {"text": "All", "value": "$__all"}}
                   if multi else {})}

    scope = FLEET if fleet else BOX
    return [
        {"type": "datasource", "name": "datasource", "label": "Prometheus",
         "query": "prometheus"},
        query("instance", "label_values(edgeagent_build_info, instance)", multi=fleet,
              label="Devices" if fleet else "Device"),
        query("model", f"label_values(edgeagent_model_ready{{{scope}}}, model)", multi=True,
              label="Model"),
    ]


def _requests_rate(selector: str) -> dict[str, Any]:
    """Requests per second per model version, among the series ``selector`` picks."""
    return _target(
        f"sum by (model, version) (rate(edgeagent_inference_requests_total{{{selector}}}"
        f"[{RATE}]))", "{{model}} v{{version}}")


def _failure_share(selector: str) -> dict[str, Any]:
    """The share of failed requests per model version."""
    return _target(
        f"sum by (model, version) (rate(edgeagent_inference_requests_total{{{selector}, "
        f'outcome="failure"}}[{RATE}])) / sum by (model, version) '
        f"(rate(edgeagent_inference_requests_total{{{selector}}}[{RATE}]))",
        "{{model}} v{{version}}")


def box() -> dict[str, Any]:
    """One box: its models per version, the agent's links, the system."""
    p = Layout()
    p.row("Models (per version)")
    p.add("Requests / s", [_requests_rate(BOX_MODEL)], unit="reqps")
    p.add("Failed requests (share)", [_failure_share(BOX_MODEL)], unit="percentunit")
    p.add("Latency p50 / p95 / p99", [_target(
        f"histogram_quantile({q}, sum by (model, version, le) "
        f"(rate(edgeagent_inference_latency_seconds_bucket{{{BOX_MODEL}}}[{RATE}])))",
        f"{{{{model}}}} v{{{{version}}}} p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], unit="s")
    p.add("Queue wait p95", [_target(
        f"histogram_quantile(0.95, sum by (model, version, le) "
        f"(rate(edgeagent_inference_queue_seconds_bucket{{{BOX_MODEL}}}[{RATE}])))",
        "{{model}} v{{version}}")], unit="s")
    p.add("Refused, queue full (503) / s", [_target(
        f"sum by (model, version) (rate(edgeagent_inference_rejected_total{{{BOX_MODEL}}}"
        f"[{RATE}]))", "{{model}} v{{version}}")], unit="reqps")
    p.add("Queue depth and in flight", [
        _target(f"edgeagent_inference_queue_depth{{{BOX_MODEL}}}", "{{model}} waiting"),
        _target(f"edgeagent_inference_in_flight{{{BOX_MODEL}}}", "{{model}} running")])
    p.add("Model runs / s and mean batch size", [
        _target(f"sum by (model, version) (rate(edgeagent_model_executions_total{{{BOX_MODEL}}}"
                f"[{RATE}]))", "{{model}} v{{version}} runs/s"),
        _target(f"sum by (model, version) (rate(edgeagent_inference_batch_size_sum"
                f"{{{BOX_MODEL}}}[{RATE}])) / sum by (model, version) "
                f"(rate(edgeagent_inference_batch_size_count{{{BOX_MODEL}}}[{RATE}]))",
                "{{model}} v{{version}} rows/run")])
    p.add("What serves", [_target(f"edgeagent_model_info{{{BOX_MODEL}}}", instant=True)],
          kind="table", w=16, description="Version, format, precision, variant and the "
          "execution provider in use (a TensorRT -> CPU fallback shows here)")
    p.add("Ready / fell back", [
        _target(f"edgeagent_model_ready{{{BOX_MODEL}}}", "{{model}} ready"),
        _target(f"edgeagent_model_provider_fallback{{{BOX_MODEL}}}", "{{model}} fell back")],
        kind="stat")
    p.add("Activated", [_target(f"edgeagent_model_loaded_timestamp_seconds{{{BOX_MODEL}}} "
                                "* 1000", "{{model}} v{{version}}")],
          kind="stat", unit="dateTimeFromNow")
    p.row("Agent")
    p.add("Build and device", [
        _target(f"edgeagent_build_info{{{BOX}}}", instant=True),
        _target(f"edgeagent_device_info{{{BOX}}}", instant=True)], kind="table", w=12)
    p.add("Hub sync", [
        _target(f"edgeagent_hub_up{{{BOX}}}", "synced"),
        _target(f"time() - edgeagent_hub_last_sync_timestamp_seconds{{{BOX}}}",
                "since last sync (s)"),
        _target(f"edgeagent_hub_sync_state{{{BOX}}} == 1", "{{state}}")],
        kind="stat", w=6)
    p.add("Broker", [
        _target(f"edgeagent_broker_connected{{{BOX}}}", "connected"),
        _target(f"increase(edgeagent_broker_connects_total{{{BOX}}}[1h])",
                "connects last hour")], kind="stat", w=6)
    p.add("Telemetry spool", [
        _target(f"edgeagent_spool_messages{{{BOX}}}", "waiting"),
        _target(f"increase(edgeagent_spool_dropped_total{{{BOX}}}[1h])",
                "dropped last hour")])
    p.add("Spool size", [_target(f"edgeagent_spool_bytes{{{BOX}}}", "bytes")], unit="bytes")
    p.row("System")
    p.add("CPU", [
        _target(f"edgeagent_system_cpu_percent{{{BOX}}}", "box"),
        _target(f"rate(process_cpu_seconds_total{{{BOX}}}[{RATE}]) * 100", "agent")],
        unit="percent")
    p.add("Memory", [
        _target(f"edgeagent_system_memory_total_bytes{{{BOX}}} - "
                f"edgeagent_system_memory_available_bytes{{{BOX}}}", "box used"),
        _target(f"process_resident_memory_bytes{{{BOX}}}", "agent RSS")], unit="bytes")
    p.add("State disk free", [_target(
        f"edgeagent_system_disk_free_bytes{{{BOX}}} / edgeagent_system_disk_total_bytes"
        f"{{{BOX}}}", "free")], unit="percentunit")
    p.add("Load average", [_target(f"edgeagent_system_load_average{{{BOX}}}", "{{period}}")])
    p.add("Temperatures", [
        _target(f"edgeagent_system_temperature_celsius{{{BOX}}}", "{{zone}}"),
        _target(f"edgeagent_gpu_temperature_celsius{{{BOX}}}", "GPU {{gpu}}")],
        unit="celsius")
    p.add("Power", [
        _target(f"edgeagent_system_power_milliwatts{{{BOX}}} / 1000", "{{rail}}"),
        _target(f"edgeagent_gpu_power_milliwatts{{{BOX}}} / 1000", "GPU {{gpu}}")],
        unit="watt")
    p.add("GPU load", [_target(f"edgeagent_gpu_load_percent{{{BOX}}}", "GPU {{gpu}}")],
          unit="percent")
    p.add("GPU memory", [
        _target(f"edgeagent_gpu_memory_used_bytes{{{BOX}}}", "GPU {{gpu}} used"),
        _target(f"edgeagent_gpu_memory_total_bytes{{{BOX}}}", "GPU {{gpu}} total")],
        unit="bytes")
    return _dashboard("edgeagent-box", "edgeagent: one box", p, fleet=False)


def fleet() -> dict[str, Any]:
    """Many boxes: rollout progress by version, the worst devices, what needs attention."""
    p = Layout()
    p.row("Fleet")
    p.add("Devices reporting", [_target(f"count(edgeagent_build_info{{{FLEET}}})", "devices")],
          kind="stat", w=4)
    p.add("Models not ready", [_target(
        f"count(edgeagent_model_ready{{{FLEET_MODEL}}} == 0) or vector(0)", "not ready")],
        kind="stat", w=4)
    p.add("Running on a fallback provider", [_target(
        f"sum(edgeagent_model_provider_fallback{{{FLEET_MODEL}}}) or vector(0)", "fell back")],
        kind="stat", w=4)
    p.add("Broker disconnected", [_target(
        f"count(edgeagent_broker_connected{{{FLEET}}} == 0) or vector(0)", "devices")],
        kind="stat", w=4)
    p.add("Hub not synced", [_target(
        f"count(edgeagent_hub_up{{{FLEET}}} == 0) or vector(0)", "devices")], kind="stat", w=4)
    p.add("onnxruntime builds", [_target(
        f"count by (onnxruntime_build) (edgeagent_build_info{{{FLEET}}})",
        "{{onnxruntime_build}}")], kind="stat", w=4)
    p.add("Devices", [_target(
        f"edgeagent_device_info{{{FLEET}}} * on (instance) group_left (version, "
        f"onnxruntime_build) edgeagent_build_info{{{FLEET}}}", instant=True)],
        kind="table", w=24, description="instance (the scrape target) -> device id, profile, "
        "agent version")
    p.row("Rollout: versions side by side")
    p.add("Devices per model version", [_target(
        f"count by (model, version) (edgeagent_model_info{{{FLEET_MODEL}}})",
        "{{model}} v{{version}}")], w=8)
    p.add("Requests / s per version", [_requests_rate(FLEET_MODEL)], unit="reqps")
    p.add("Failed requests per version (share)", [_failure_share(FLEET_MODEL)],
          unit="percentunit")
    p.add("Latency p95 per version", [_target(
        f"histogram_quantile(0.95, sum by (model, version, le) "
        f"(rate(edgeagent_inference_latency_seconds_bucket{{{FLEET_MODEL}}}[{RATE}])))",
        "{{model}} v{{version}}")], unit="s")
    p.add("Providers in use", [_target(
        f"count by (model, provider, precision) (edgeagent_model_info{{{FLEET_MODEL}}})",
        "{{model}} {{precision}} on {{provider}}")])
    p.add("Refused, queue full (503) / s", [_target(
        f"sum by (model, version) (rate(edgeagent_inference_rejected_total{{{FLEET_MODEL}}}"
        f"[{RATE}]))", "{{model}} v{{version}}")], unit="reqps")
    p.row("Devices that need a look")
    p.add("Hottest", [_target(
        f"topk(10, max by (instance) (edgeagent_system_temperature_celsius{{{FLEET}}}))",
        "{{instance}}")], unit="celsius")
    p.add("Busiest CPU", [_target(
        f"topk(10, edgeagent_system_cpu_percent{{{FLEET}}})", "{{instance}}")], unit="percent")
    p.add("Least memory available", [_target(
        f"bottomk(10, edgeagent_system_memory_available_bytes{{{FLEET}}})", "{{instance}}")],
        unit="bytes")
    p.add("Least state disk free", [_target(
        f"bottomk(10, edgeagent_system_disk_free_bytes{{{FLEET}}})", "{{instance}}")],
        unit="bytes")
    p.add("Telemetry backlog", [
        _target(f"topk(10, edgeagent_spool_messages{{{FLEET}}})", "{{instance}} waiting"),
        _target(f"sum(increase(edgeagent_spool_dropped_total{{{FLEET}}}[1h]))",
                "dropped last hour, fleet")])
    p.add("Busiest GPUs", [_target(
        f"topk(10, edgeagent_gpu_load_percent{{{FLEET}}})", "{{instance}} GPU {{gpu}}")],
        unit="percent")
    return _dashboard("edgeagent-fleet", "edgeagent: fleet", p, fleet=True)


def _dashboard(uid: str, title: str, layout: Layout, *, fleet: bool) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "tags": ["edgeagent"], "editable": True,
        "schemaVersion": 39, "version": 1, "timezone": "", "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "graphTooltip": 1,
        "description": ("Devices are told apart by Prometheus's instance label; "
                        "edgeagent_device_info names them."),
        "templating": {"list": _variables(fleet)}, "annotations": {"list": []},
        "links": [], "panels": layout.panels,
    }


def render() -> dict[str, str]:
    """File name -> JSON text."""
    return {f"{d['uid']}.json": json.dumps(d, indent=2) + "\n" for d in (box(), fleet())}


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
