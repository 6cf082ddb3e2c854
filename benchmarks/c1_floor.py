"""Where the CNN's concurrency-1 time goes, against in-process onnxruntime: the floor under the
agent's c1 ratios.

Usage::

    python -m benchmarks.c1_floor [--rounds R] [--seconds S]

One agent serves the benchmark CNN; in alternating short segments (the order rotates each round,
so the box's drift falls on every series alike) it measures, per request:

- ``in-process``: ``session.run`` in this process with the main benchmark's session options
  (onnxruntime's defaults, so its intra-op threads spin between parallel sections): the
  baseline of every c1 ratio;
- ``in-process, agent's options``: the same model loaded by the agent's own onnxruntime
  backend (spinning off, so that a run in a worker never takes the cores the event loop needs);
- for each transport (``shm-http``, ``shm-grpc``, ``grpc``, ``binary``): the client's wall time
  per request, and the agent's ``compute_infer`` per request (its statistics: the request's
  time holding the model, which is validation and the run).

From those: the cost of not spinning (agent's options / in-process), the run's cost inside the
agent against the same options in-process, and the fixed cost per request around the run (client,
sockets, protocol, scheduler: wall - compute_infer). Their product is the transport's ratio to
in-process; the last column is the ratio it would have with nothing at all around the run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.models import cnn
from benchmarks.run import (
    MODELS,
    THREADS,
    _input,
    _session,
    agent,
    shared_memory,
    thin_grpc,
    thin_http,
)
from benchmarks.thin import ThinClient
from edgeagent.device.plan import PlannedProvider, ProviderPlan
from edgeagent.runtime.base import LoadedModel
from edgeagent.runtime.onnx_backend import OnnxBackend

TRANSPORTS = ("shm-http", "shm-grpc", "grpc", "binary")


def agent_options_model(path: Path) -> LoadedModel:
    """The model as the agent's onnxruntime backend loads it on the CPU, in this process."""
    plan = ProviderPlan("onnx", "fp32", (PlannedProvider("CPUExecutionProvider"),),
                        threads=THREADS)
    return OnnxBackend().load(path, plan)


def compute_infer(port: int) -> tuple[int, int]:
    """The CNN's ``compute_infer`` (count, ns) from the agent's statistics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/v2/models/cnn/stats")
        stats = json.loads(conn.getresponse().read())["model_stats"][0]
    finally:
        conn.close()
    infer = stats["inference_stats"]["compute_infer"]
    return int(infer["count"]), int(infer["ns"])


def client(transport: str, port: int, grpc_port: int) -> ThinClient:
    if transport in ("grpc", "shm-grpc"):
        return thin_grpc(grpc_port, "cnn", transport)[0]
    return thin_http(port, "cnn", transport)[0]


def segment(call: Callable[[], object], seconds: float) -> tuple[int, float]:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        n += 1
    return n, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.c1_floor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=0.6, help="seconds per segment")
    args = parser.parse_args(argv)
    name, _, out = MODELS["cnn"]
    x = _input("cnn")
    with tempfile.TemporaryDirectory(prefix="edgeagent-floor-") as tmp:
        work = Path(tmp)
        path = cnn(work / "cnn.onnx")
        model = agent_options_model(path)
        calls: dict[str, Callable[[], object]] = {
            "in-process": functools.partial(_session(path).run, [out], {name: x}),
            "in-process, agent's options": functools.partial(
                model.run, model.validate({name: x}), [out])}
        wall: dict[str, list[float]] = {key: [0, 0.0] for key in (*calls, *TRANSPORTS)}
        compute: dict[str, list[int]] = {t: [0, 0] for t in TRANSPORTS}
        with agent(work, {"cnn": path}, max_batch_size=0) as running, \
                contextlib.ExitStack() as stack:
            stack.enter_context(shared_memory(running.port, "cnn"))
            # One client connection at a time, as an app would hold: the agent's idle rule
            # (runs on the loop with one client) applies as in the main benchmark's c1 cases.
            order = [*calls, *TRANSPORTS]
            for key in order:  # warm up every series
                if key in calls:
                    segment(calls[key], 0.3)
            for i in range(args.rounds):
                shift = i % len(order)
                for key in order[shift:] + order[:shift]:
                    if key in calls:
                        n, t = segment(calls[key], args.seconds)
                    else:
                        conn = client(key, running.port, running.grpc_port)
                        try:
                            for _ in range(3):
                                conn.call()
                            before = compute_infer(running.port)
                            n, t = segment(conn.call, args.seconds)
                            after = compute_infer(running.port)
                        finally:
                            conn.close()
                        compute[key][0] += after[0] - before[0]
                        compute[key][1] += after[1] - before[1]
                    wall[key][0] += n
                    wall[key][1] += t
    per = {key: t / n * 1e6 for key, (n, t) in wall.items()}
    base, own = per["in-process"], per["in-process, agent's options"]
    print(f"in-process (spinning)          {base:8.0f} us/run")
    print(f"in-process, agent's options    {own:8.0f} us/run   not spinning: {base / own:.3f}x")
    print()
    print("transport   wall us  compute_infer us  around it us   run factor  around factor"
          "   ratio  ratio with nothing around the run")
    for transport in TRANSPORTS:
        n, ns = compute[transport]
        run_us = ns / max(1, n) / 1e3
        w = per[transport]
        print(f"{transport:10} {w:8.0f} {run_us:17.0f} {w - run_us:13.0f} {own / run_us:12.3f}"
              f" {run_us / w:14.3f} {base / w:7.3f} {base / run_us:12.3f}")
    print("\nratio = in-process's rate over the transport's (the main benchmark's paired ratio)"
          "\n      = not spinning x run factor (agent's options in-process / compute_infer) x "
          "around factor (compute_infer / wall)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
