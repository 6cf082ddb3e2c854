"""The shipped Grafana dashboards: what make.py writes, valid PromQL, and every metric (and
label) a panel queries exists in a running agent's /metrics."""

from __future__ import annotations

import json
import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest

from edgeagent.config import parse_config
from edgeagent.telemetry.system import SystemSampler
from tests.agentthread import AgentThread, free_port
from tests.device.trees import BOARDS, write
from tests.mqtt.conftest import MOSQUITTO, AmqttBroker, Broker, wait_for

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = REPO / "dashboards"
#: Labels Prometheus adds at scrape time: not in /metrics.
SCRAPE_LABELS = {"instance", "job"}
#: Grafana's variables, as a scrape would see them substituted.
SUBSTITUTE = {"$__rate_interval": "1m", "${datasource}": "prom", "$instance": "box-1",
              "$model": ".+"}


def _exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield f"{dashboard['uid']} / {panel['title']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"]
            inner = q[len("label_values("):-1].rsplit(",", 1)[0]
            yield f"{dashboard['uid']} / variable {var['name']}", inner


def _selectors(node: Any) -> Iterator[promql_parser.VectorSelector]:
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    elif isinstance(node, promql_parser.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from _selectors(arg)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _selectors(node.lhs)
        yield from _selectors(node.rhs)
    elif isinstance(node, (promql_parser.AggregateExpr, promql_parser.ParenExpr,
                           promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        yield from _selectors(node.expr)


def _queried() -> dict[str, set[str]]:
    """Metric name -> label names the dashboards match on (scrape labels left out)."""
    out: dict[str, set[str]] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for where, template in _exprs(dashboard):
            expr = template
            for key, value in SUBSTITUTE.items():
                expr = expr.replace(key, value)
            try:
                ast = promql_parser.parse(expr)
            except Exception as exc:
                raise AssertionError(f"{where}: not valid PromQL: {expr}: {exc}") from None
            selectors = list(_selectors(ast))
            assert selectors, f"{where}: queries no metric: {expr}"
            for sel in selectors:
                assert sel.name.startswith(("edgeagent_", "process_")), (
                    f"{where}: {sel.name} is not the agent's (a dashboard needs only the agent)")
                labels = {m.name for m in sel.matchers.matchers} - SCRAPE_LABELS
                out.setdefault(sel.name, set()).update(labels)
    return out


def test_dashboards_are_what_make_py_writes() -> None:
    rendered = runpy.run_path(str(DASHBOARDS / "make.py"))["render"]()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    for name, text in rendered.items():
        assert (DASHBOARDS / name).read_text() == text, (
            f"dashboards/{name} is out of step: run python dashboards/make.py")


def test_dashboards_are_valid_grafana_json() -> None:
    for path in DASHBOARDS.glob("*.json"):
        dashboard = json.loads(path.read_text())
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        names = {v["name"] for v in dashboard["templating"]["list"]}
        assert {"datasource", "instance", "model"} <= names
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{path.name}: {panel['title']} is too wide"
    assert _queried()  # every expression parses and names the agent's metrics


class _FakeNvml(SystemSampler):
    """NVML's answer fixed: the test box has no NVIDIA GPU, the dashboards have GPU panels."""

    def _nvml_gpus(self) -> list[dict[str, Any]] | None:
        return [{"index": 0, "load_percent": 40, "memory_used_mb": 900.0,
                 "memory_total_mb": 8192.0, "temperature_c": 60, "power_mw": 52000}]


def test_every_metric_a_panel_queries_exists(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent with a hub (the demo), a broker, a Jetson-like tree for temperatures, power
    and GPU load, and NVML's figures: every series any panel queries is in its /metrics,
    with the labels the panel matches on."""
    root = BOARDS["x86-cpu"].build(tmp_path / "root")
    write(root, "proc/stat", "cpu  100 0 100 800 0 0 0 0 0 0\n")
    write(root, "proc/loadavg", "0.50 0.40 0.30 1/100 42\n")
    write(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(root, "sys/class/thermal/thermal_zone0/temp", "48000\n")
    write(root, "sys/devices/platform/gpu.0/load", "250\n")
    hw = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    write(root, f"{hw}/in1_label", "VDD_IN\n")
    write(root, f"{hw}/in1_input", "5000\n")
    write(root, f"{hw}/curr1_input", "1200\n")
    monkeypatch.setattr("edgeagent.telemetry.system.SystemSampler._nvml_gpus",
                        _FakeNvml._nvml_gpus)
    broker = (Broker(tmp_path / "broker") if MOSQUITTO else AmqttBroker(tmp_path / "broker"))
    broker.start()
    data = {"agent": {"state_dir": str(tmp_path / "state"), "device_id": "dash-1"},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "mqtt": {"url": broker.url, "telemetry_interval_s": 3600}}
    agent = AgentThread(parse_config(data), root=root).start()  # embedded defaults + demo hub
    try:
        with httpx.Client(base_url=agent.url, timeout=30) as c:
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                "data": [1, 2, 3, 4]}]}
            assert c.post("/v2/models/demo/infer", json=body).status_code == 200
            body["inputs"][0]["shape"] = [1, 3]  # type: ignore[index]
            body["inputs"][0]["data"] = [1, 2, 3]  # type: ignore[index]
            assert c.post("/v2/models/demo/infer", json=body).status_code == 400
            c.get("/metrics")  # CPU use is measured from the first scrape on
            write(root, "proc/stat", "cpu  200 0 200 900 0 0 0 0 0 0\n")

            def connected() -> str | None:
                scraped = c.get("/metrics").text
                return scraped if "edgeagent_broker_connected 1.0" in scraped else None

            text = wait_for(connected, what="the broker connection on /metrics")
    finally:
        agent.stop()
        broker.stop()
    from prometheus_client.parser import text_string_to_metric_families

    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    queried = _queried()
    missing = sorted(set(queried) - set(exposed))
    assert missing == [], f"panels query metrics the agent does not expose: {missing}"
    for name, labels in queried.items():
        assert labels <= exposed[name], f"{name}: panels match on {labels - exposed[name]}"
