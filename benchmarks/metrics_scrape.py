"""What a Prometheus scrape of ``/metrics`` costs: size as text, OpenMetrics and gzip, and the
time of one scrape next to one MLP inference on the same agent (a ratio, so shared boxes compare).

    python -m benchmarks.metrics_scrape [--versions N] [--scrapes N]

An in-process agent on a free loopback port serves the tests' MLP; ``--versions`` versions are
swapped in one after another with requests on each (every version keeps its series, as during a
long rollout), then the scrape is measured.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from edgeagent.config import parse_config
from edgeagent.runtime.manager import ModelSource
from tests import onnx_models
from tests.agentthread import AgentThread, free_port


def _median_s(fn: object, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--versions", type=int, default=5)
    ap.add_argument("--scrapes", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths = [onnx_models.mlp(d / f"v{i}.onnx", seed=i) for i in range(1, args.versions + 1)]
        config = parse_config({"agent": {"state_dir": str(d / "state"), "device_id": "bench"},
                               "http": {"listen": f"127.0.0.1:{free_port()}"},
                               "models": [{"name": "mlp", "path": str(paths[0])}]},
                              source=str(d / "agent.toml"))
        agent = AgentThread(config).start()
        try:
            x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                "data": x.ravel().tolist()}]}
            with httpx.Client(base_url=agent.url, timeout=30) as c:
                for version, path in enumerate(paths, start=1):
                    if version > 1:
                        agent.call(agent.agent.manager.load("mlp", ModelSource(path, version)))
                    for _ in range(20):
                        c.post("/v2/models/mlp/infer", json=body).raise_for_status()
                om = {"Accept": "application/openmetrics-text; version=1.0.0"}
                text = c.get("/metrics")
                gz = c.get("/metrics", headers={"Accept-Encoding": "gzip"})
                openmetrics = c.get("/metrics", headers=om)
                series = sum(1 for line in text.text.splitlines()
                             if line and not line.startswith("#"))
                scrape = _median_s(lambda: c.get("/metrics").raise_for_status(), args.scrapes)
                infer = _median_s(
                    lambda: c.post("/v2/models/mlp/infer", json=body).raise_for_status(),
                    args.scrapes)
        finally:
            agent.stop()
    print(f"{args.versions} version(s) of one model, {series} samples")
    print(f"text {len(text.content)} B, OpenMetrics {len(openmetrics.content)} B, "
          f"gzip on the wire {gz.headers['content-length']} B "
          f"({len(gz.content) / int(gz.headers['content-length']):.1f}x smaller)")
    print(f"one scrape {scrape * 1e3:.2f} ms, one MLP inference {infer * 1e3:.2f} ms "
          f"(scrape / inference {scrape / infer:.1f}x), medians of {args.scrapes}")


if __name__ == "__main__":
    main()
