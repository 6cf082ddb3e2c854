"""Triton's perf_analyzer against the benchmark agent: one C++ client for every transport, so
HTTP, gRPC, gRPC streaming and shared memory are compared with the same client cost.

    EDGEAGENT_PERF_ANALYZER=/path/to/perf_analyzer python -m benchmarks.perf_analyzer

The agent is the one ``benchmarks.run`` starts (both models by path, the x86-64-cpu profile on
2 threads, gRPC on, no batching). Each row is one ``perf_analyzer --concurrency-range N:N
--measurement-interval MS`` run; perf_analyzer needs ``libb64.so.0d`` and ``libcudart.so.12`` on
the library path (benchmarks/README.md, "perf_analyzer").
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import run
from benchmarks.models import cnn, mlp

SHAPES = {"mlp": "input:1,64", "cnn": "image:1,3,224,224"}
#: (label, perf_analyzer's -i, extra arguments)
TRANSPORTS = (
    ("http", "http", ()),
    ("grpc", "grpc", ()),
    ("grpc-stream", "grpc", ("--streaming",)),
    ("http-shm", "http", ("--shared-memory=system",)),
    ("grpc-shm", "grpc", ("--shared-memory=system",)),
)


def measure(binary: str, agent: run.RunningAgent, model: str, *,
            transport: tuple[str, str, tuple[str, ...]], concurrency: int,
            interval_ms: int) -> float:
    """Throughput (inferences/s) perf_analyzer reports for one case."""
    _, protocol, extra = transport
    url = f"127.0.0.1:{agent.port if protocol == 'http' else agent.grpc_port}"
    out = subprocess.run(
        [binary, "-m", model, "--shape", SHAPES[model], "-u", url, "-i", protocol,
         "--concurrency-range", f"{concurrency}:{concurrency}",
         "--measurement-interval", str(interval_ms),
         # A shared 2-core box drifts more than perf_analyzer's default 10 % between windows.
         "--stability-percentage", "25", "--max-trials", "20", *extra],
        capture_output=True, text=True, timeout=300, check=False)
    match = re.search(r"Throughput: ([0-9.]+) infer/sec", out.stdout)
    if out.returncode or match is None:
        raise SystemExit(f"perf_analyzer failed ({out.returncode}):\n{out.stdout[-1500:]}"
                         f"{out.stderr[-1500:]}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--perf-analyzer", default=os.environ.get("EDGEAGENT_PERF_ANALYZER"),
                        help="the perf_analyzer binary (default: $EDGEAGENT_PERF_ANALYZER)")
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    if not args.perf_analyzer:
        parser.error("give --perf-analyzer or set EDGEAGENT_PERF_ANALYZER")
    with tempfile.TemporaryDirectory(prefix="edgeagent-pa-") as tmp:
        work = Path(tmp)
        paths = {"mlp": mlp(work / "mlp.onnx"), "cnn": cnn(work / "cnn.onnx")}
        with run.agent(work, paths, 0) as agent:
            print(f"agent ready in {agent.ready_s:.2f} s, idle RSS "
                  f"{run.rss_mb(agent.process.pid):.1f} MB")
            print(f"{'model':6s} {'c':>2s} " + " ".join(f"{t[0]:>12s}" for t in TRANSPORTS))
            for model in paths:
                for concurrency in args.concurrency:
                    rates = [measure(args.perf_analyzer, agent, model, transport=t,
                                     concurrency=concurrency, interval_ms=args.interval_ms)
                             for t in TRANSPORTS]
                    print(f"{model:6s} {concurrency:2d} "
                          + " ".join(f"{r:12.1f}" for r in rates), flush=True)
            print(f"RSS after: {run.rss_mb(agent.process.pid):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
