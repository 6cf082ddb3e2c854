"""Inference latency under a flood of MQTT commands, as a ratio to the quiet case (issue 13).

Usage::

    python -m benchmarks.command_flood [--rate 1000] [--seconds 5] [--requests 400]

A real Mosquitto on a free loopback port and ``python -m edgeagent run`` as a subprocess
serving the MLP over HTTP, with ``[mqtt]`` pointed at the broker. The client sends sequential
JSON inferences (one keep-alive connection) and records each latency: first with the broker
quiet, then while a paho publisher sends ``ping`` commands, each with its own request id, at
``--rate`` per second (QoS 1). Printed: p50, p99 and max latency in each phase and their
ratios, and how many commands were sent and answered (results counted on
``.../cmd/+/result``). The command log is written in batches off the event loop
(``edgeagent.control.commands.CommandLog``); before that every command was written and fsynced
on the loop. The box may be shared: the ratios matter, not the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.run import _free_port
from tests import onnx_models

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PREFIX = "edgeagent"
BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                               "data": [0.5] * 64}]}).encode()


def _wait(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _latencies(client: httpx.Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = client.post("/v2/models/mlp/infer", content=BODY)
        out.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return out


def _summary(lat: list[float]) -> dict[str, float]:
    ordered = sorted(lat)
    return {"p50_ms": round(statistics.median(ordered) * 1e3, 2),
            "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1e3, 2),
            "max_ms": round(ordered[-1] * 1e3, 2)}


@contextlib.contextmanager
def _running(work: Path) -> Iterator[tuple[int, int]]:
    """Mosquitto and the agent, started in ``work``; yields (broker port, HTTP port)."""
    mport, hport = _free_port(), _free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {mport} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 0\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(work / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model = onnx_models.mlp(work / "mlp.onnx")
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{work / "state"}"\ndevice_id = "flood"\n'
        f'log_level = "warning"\n\n[http]\nlisten = "127.0.0.1:{hport}"\n\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{mport}"\n\n'
        f'[[models]]\nname = "mlp"\npath = "{model}"\n')
    with (work / "agent.log").open("wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "edgeagent", "run", "--config",
                                  str(config)], stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield mport, hport
        finally:
            agent.terminate()
            agent.wait(30)
            broker.terminate()
            broker.wait(10)


class _Flood:
    """A paho client publishing ``ping`` commands at ``rate`` per second, counting results."""

    def __init__(self, port: int, rate: int) -> None:
        self.rate, self.sent, self.answered = rate, 0, 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="flood-publisher")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._result
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{PREFIX}/flood/cmd/+/result", qos=1)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="flood")

    def _result(self, _c: Any, _u: Any, _msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.answered += 1

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while self.sent < due:
                self.client.publish(f"{PREFIX}/flood/cmd/c{self.sent}", b'{"action":"ping"}', 1)
                self.sent += 1
            time.sleep(0.001)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def close(self) -> None:
        self.client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=1000, help="commands per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the flood")
    parser.add_argument("--requests", type=int, default=400, help="inferences when quiet")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, _running(Path(tmp)) as (mport, hport), \
            httpx.Client(base_url=f"http://127.0.0.1:{hport}", timeout=60) as client:
        def ready() -> bool:
            try:
                return client.get("/v2/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, 60, "the agent")
        flood = _Flood(mport, args.rate)
        try:
            time.sleep(1.0)  # the agent's subscription, and a quiet moment
            _latencies(client, 50)  # warm-up
            quiet = _latencies(client, args.requests)
            flood.start()
            time.sleep(0.3)  # the flood under way
            loaded: list[float] = []
            end = time.monotonic() + args.seconds
            while time.monotonic() < end or not loaded:
                loaded += _latencies(client, 1)
            flood.stop()
            # Every command is answered, if late (bounded: the count says how many were).
            with contextlib.suppress(SystemExit):
                _wait(lambda: flood.answered >= flood.sent, 120, "every command's result")
        finally:
            flood.stop()
            flood.close()
    q, f = _summary(quiet), _summary(loaded)
    print(json.dumps({"rate_per_s": args.rate, "commands_sent": flood.sent,
                      "commands_answered": flood.answered, "quiet": q, "flood": f,
                      "ratio_p50": round(f["p50_ms"] / q["p50_ms"], 2),
                      "ratio_p99": round(f["p99_ms"] / q["p99_ms"], 2),
                      "inferences": {"quiet": len(quiet), "flood": len(loaded)}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
