"""Benchmark: the agent over loopback against onnxruntime in-process, same models, same run.

Usage::

    python -m benchmarks.run [--quick] [--out results.json] [--seconds S]

For a tiny MLP (float32 [N,64] -> [N,10]) and a ~0.47 GMAC CNN (float32 [N,3,224,224] ->
[N,1000]), at batch 1:

- in-process: an onnxruntime session (2 intra-op threads), concurrency 1 and 4 (threads);
- the agent, started as a subprocess (``python -m edgeagent run --config <tmp toml>``, the
  x86-64-cpu profile with 2 threads), over loopback HTTP with JSON and with binary tensors, over
  gRPC with the tensor in the message, and with the tensors in system shared memory (HTTP and
  gRPC), at concurrency 1 and 4 (and the CNN at 8); then a second agent with dynamic batching
  (max_batch_size 8, max_queue_delay_ms 2) at concurrency 1, 4 and 8, the first one kept up
  (idle) so that each batching target is also measured against it in alternating segments.

It prints throughput, p50/p99 latency and the ratio to in-process for each case (CNN c1 cases
also paired with in-process in alternating segments), the agent's time from spawn to
``/v2/health/ready`` = 200 and its idle RSS with both models loaded, checks the targets of
issues 3 and 14, and writes everything as JSON to ``--out``.

The load generator keeps its own cost low: request bodies and messages are encoded once per
case and sent over keep-alive connections by :class:`ThinConnection` (HTTP/1.1) and
:class:`~benchmarks.thin_grpc.ThinGrpcConnection` (one HTTP/2 connection), no HTTP or gRPC
library, all of a case's connections driven from one thread by a selector; responses are read
but decoded only once per case, to check them against the in-process outputs (with
tritonclient, Triton's own client). The client's CPU time per request is measured and
reported, since on a small box it competes with the agent for the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import importlib.resources
import json
import os
import platform
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import tritonclient.http as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2

from benchmarks.models import cnn, cnn_macs, mlp
from benchmarks.thin import ThinClient
from benchmarks.thin_grpc import ThinGrpcConnection

THREADS = 2
"""Intra-op threads, in-process and in the agent (this box's cores; the reference figures)."""

#: Model name -> (input name, input shape at batch 1, output name).
MODELS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "mlp": ("input", (1, 64), "logits"),
    "cnn": ("image", (1, 3, 224, 224), "logits"),
}

#: Reference figures of issue 3 (same kind of 2-core box, onnxruntime CPU, 2 threads).
REFERENCE = {
    "in-process cnn": 164.0, "in-process mlp": 75_000.0,
    "kserve cnn binary": 7.5, "kserve cnn json": 13.5, "kserve mlp c4": 985.0,
    "mlserver cnn json": 29.0, "mlserver mlp": 750.0,
    "kserve idle rss mb": 185.0, "mlserver idle rss mb": 355.0, "kserve ready s": 1.3,
}


@dataclass
class Case:
    """One measured configuration."""

    target: str
    """``in-process``, ``agent`` or ``agent+batching``."""
    model: str
    protocol: str
    """``-`` in-process, else ``json``, ``binary`` (HTTP), ``grpc`` (tensor in the message),
    ``shm-http`` or ``shm-grpc`` (tensors in system shared memory)."""
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    throughput: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ratio: float | None = None
    """Throughput over the best in-process throughput of the same model (in-process runs
    beyond the core count only oversubscribe the CPU, so the best is the fair baseline)."""
    paired_ratio: float | None = None
    """CNN rows at concurrency 1: the agent's rate over in-process c1, measured after the case
    in alternating half-second segments (8 rounds, ABBA). The box's speed drifts by 10-15 %
    over minutes (other tenants, clocks), more than the gaps the c1 targets are about; the
    targets use this ratio."""
    client_cpu_us: float | None = None
    """Client CPU time per request (microseconds): what the load generator itself costs."""
    server_cpu_us: float = 0.0
    """CPU time per inference of whatever serves it (microseconds, all threads): the agent
    process, or the in-process session. Less sensitive to other load on the box than
    throughput; the difference between the two is the serving path's cost."""
    loop_cpu_us: float | None = None
    """The agent's main thread (its event loop: HTTP, decoding, scheduling) CPU per request:
    one thread, so 1e6 / loop_cpu_us caps the agent's throughput."""
    batch_sizes: dict[str, int] = field(default_factory=dict)
    """Agent-side executions per batch size (from the statistics extension)."""
    paired_batching: float | None = None
    """``agent+batching`` rows of the batching targets: the batching agent's rate over the
    unbatched agent's, both up, in alternating half-second segments (8 rounds, ABBA); the
    targets use this ratio (the two phases run minutes apart, which the box's drift and a
    freshly started agent's first case make worth several per cent)."""

    def measured(self, latencies: list[float], elapsed: float) -> None:
        lat = np.asarray(latencies) * 1000
        self.requests = len(latencies)
        self.seconds = round(elapsed, 3)
        self.throughput = round(len(latencies) / elapsed, 1)
        self.p50_ms = round(float(np.percentile(lat, 50)), 3)
        self.p99_ms = round(float(np.percentile(lat, 99)), 3)


@dataclass
class Budget:
    """How long each case runs: a warm-up (not measured), then a fixed duration."""

    warmup_s: float
    seconds: float


# ---- in-process -----------------------------------------------------------------------


def _session(path: Path) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _closed_loop(call: Callable[[], None], concurrency: int, budget: Budget,
                 spawn: Callable[..., Any], join: Callable[[list[Any]], None],
                 ) -> tuple[list[float], float, float]:
    """Run ``call`` back to back from ``concurrency`` callers; latencies, elapsed, client CPU."""
    latencies: list[float] = []

    def caller(until: float, record: bool) -> None:
        while time.perf_counter() < until:
            start = time.perf_counter()
            call()
            if record:
                latencies.append(time.perf_counter() - start)

    join([spawn(caller, time.perf_counter() + budget.warmup_s, False) for _ in range(concurrency)])
    cpu, start = time.process_time(), time.perf_counter()
    join([spawn(caller, start + budget.seconds, True) for _ in range(concurrency)])
    return latencies, time.perf_counter() - start, time.process_time() - cpu


def _thread(fn: Callable[..., None], *args: Any) -> threading.Thread:
    t = threading.Thread(target=fn, args=args)
    t.start()
    return t


def _join_threads(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join()


def in_process(paths: dict[str, Path], budget: Budget) -> tuple[list[Case], dict[str, np.ndarray]]:
    """Batch-1 throughput of plain onnxruntime sessions; also the reference outputs."""
    cases, reference = [], {}
    for model, path in paths.items():
        session = _session(path)
        name, _, out = MODELS[model]
        x = _input(model)
        reference[model] = REFERENCE_OUTPUTS[model] = session.run([out], {name: x})[0]
        for concurrency in (1, 4):
            case = Case("in-process", model, "-", concurrency)
            lat, elapsed, cpu = _closed_loop(functools.partial(session.run, [out], {name: x}),
                                             concurrency, budget, _thread, _join_threads)
            case.measured(lat, elapsed)
            case.server_cpu_us = round(cpu / len(lat) * 1e6, 1)
            cases.append(case)
            _progress(case)
    return cases, reference


def _input(model: str) -> np.ndarray:
    return np.random.default_rng(42).random(MODELS[model][1], dtype=np.float32)


# ---- the agent --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(work: Path, paths: dict[str, Path], port: int, max_batch_size: int, *,
                 max_queue_delay_ms: float = 2.0, grpc_port: int = 0) -> Path:
    """The agent's config: both models by path, the x86-64-cpu profile pinned to 2 threads."""
    profiles_dir = work / "profiles"
    profiles_dir.mkdir(exist_ok=True)
    shipped = importlib.resources.files("edgeagent.device_profiles") / "x86-64-cpu.toml"
    text = shipped.read_text()
    if "\nthreads = " not in text:
        raise SystemExit(f"{shipped}: no top-level 'threads' key to pin")
    lines = [f"threads = {THREADS}" if ln.startswith("threads = ") else ln
             for ln in text.splitlines()]
    (profiles_dir / "x86-64-cpu.toml").write_text("\n".join(lines) + "\n")
    models = "".join(
        f'\n[[models]]\nname = "{m}"\npath = "{p}"\nmax_batch_size = {max_batch_size}\n'
        f"max_queue_delay_ms = {max_queue_delay_ms}\n"
        for m, p in paths.items())
    config = work / f"agent-b{max_batch_size}.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{work / f"state-b{max_batch_size}"}"\nprofile = "x86-64-cpu"\n'
        f'profiles_dir = "{profiles_dir}"\nlog_level = "warning"\n\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[grpc]\nlisten = "{f"127.0.0.1:{grpc_port}" if grpc_port else ""}"\n{models}')
    return config


@dataclass
class RunningAgent:
    process: subprocess.Popen[bytes]
    port: int
    grpc_port: int
    ready_s: float
    log: Path


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def agent(work: Path, paths: dict[str, Path], max_batch_size: int,
          max_queue_delay_ms: float = 2.0) -> Iterator[RunningAgent]:
    """Start the agent as a subprocess, wait until ready (timed), stop it on exit."""
    port, grpc_port = _free_port(), _free_port()
    config = write_config(work, paths, port, max_batch_size,
                          max_queue_delay_ms=max_queue_delay_ms, grpc_port=grpc_port)
    log = work / f"agent-b{max_batch_size}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
    with log.open("wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edgeagent", "run", "--config", str(config)],
                                stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            while not _ready(port):
                if proc.poll() is not None:
                    raise SystemExit(f"the agent exited with {proc.returncode}:\n"
                                     f"{log.read_text()[-3000:]}")
                if time.perf_counter() - start > 60:
                    raise SystemExit(f"the agent was not ready in 60 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.005)
            yield RunningAgent(proc, port, grpc_port, time.perf_counter() - start, log)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(True))
    return round(float(total) / 2**20, 1)


def request_body(model: str, protocol: str) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol request for the model's batch-1 input, encoded once
    (``shm-http``: the inputs and outputs in the regions of :func:`shared_memory`)."""
    name, shape, out = MODELS[model]
    x = _input(model)
    if protocol == "json":
        body = {"inputs": [{"name": name, "shape": list(shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}],
                "outputs": [{"name": out}]}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    if protocol == "shm-http":
        body = {"inputs": [{"name": name, "shape": list(shape), "datatype": "FP32",
                            "parameters": {"shared_memory_region": f"{model}-in",
                                           "shared_memory_byte_size": x.nbytes}}],
                "outputs": [{"name": out, "parameters": {
                    "shared_memory_region": f"{model}-out",
                    "shared_memory_byte_size": OUTPUT_BYTES[model]}}]}
        return json.dumps(body).encode(), {"Content-Type": "application/json"}
    header = json.dumps({
        "inputs": [{"name": name, "shape": list(shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": out, "parameters": {"binary_data": True}}],
    }).encode()
    return header + x.tobytes(), {"Content-Type": "application/octet-stream",
                                  "Inference-Header-Content-Length": str(len(header))}


#: Bytes of each model's output at batch 1 (FP32 [1, 10] and [1, 1000]).
OUTPUT_BYTES = {"mlp": 10 * 4, "cnn": 1000 * 4}


def grpc_request(model: str, shared: bool) -> Any:
    """The ``ModelInferRequest`` of the model's batch-1 input, built once: the tensor in
    ``raw_input_contents``, or (``shared``) in the regions of :func:`shared_memory`."""
    name, shape, out = MODELS[model]
    x = _input(model)
    req = service_pb2.ModelInferRequest(model_name=model)
    tensor = req.inputs.add(name=name, datatype="FP32", shape=shape)
    requested = req.outputs.add(name=out)
    if shared:
        tensor.parameters["shared_memory_region"].string_param = f"{model}-in"
        tensor.parameters["shared_memory_byte_size"].int64_param = x.nbytes
        requested.parameters["shared_memory_region"].string_param = f"{model}-out"
        requested.parameters["shared_memory_byte_size"].int64_param = OUTPUT_BYTES[model]
    else:
        req.raw_input_contents.append(x.tobytes())
    return req


@contextlib.contextmanager
def shared_memory(port: int, model: str) -> Iterator[Any]:
    """The model's input (written once) and output regions, registered with the agent; the
    output region's handle, to read answers from."""
    x = _input(model)
    tag = f"/edgeagent-bench-{os.getpid()}-{model}"
    handles = [shm.create_shared_memory_region(f"{model}-in", f"{tag}-in", x.nbytes),
               shm.create_shared_memory_region(f"{model}-out", f"{tag}-out",
                                               OUTPUT_BYTES[model])]
    try:
        shm.set_shared_memory_region(handles[0], [x])
        # A connection of its own, closed before the load: the agent sees one client then.
        with contextlib.closing(triton.InferenceServerClient(f"127.0.0.1:{port}")) as client:
            client.register_system_shared_memory(f"{model}-in", f"{tag}-in", x.nbytes)
            client.register_system_shared_memory(f"{model}-out", f"{tag}-out",
                                                 OUTPUT_BYTES[model])
        yield handles[1]
    finally:
        with contextlib.closing(triton.InferenceServerClient(f"127.0.0.1:{port}")) as client:
            client.unregister_system_shared_memory()
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


def check_outputs(port: int, model: str, reference: np.ndarray) -> None:
    """Ask once with tritonclient (JSON and binary) and compare with the in-process output."""
    name, shape, out = MODELS[model]
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        for binary in (False, True):
            inp = triton.InferInput(name, list(shape), "FP32")
            inp.set_data_from_numpy(_input(model), binary_data=binary)
            got = client.infer(model, [inp], outputs=[
                triton.InferRequestedOutput(out, binary_data=binary)]).as_numpy(out)
            if got is None or not np.allclose(got, reference, rtol=1e-5, atol=1e-5):
                raise SystemExit(f"{model}: the agent's output differs from in-process "
                                 f"(binary={binary})")
    finally:
        client.close()


def drive(running: RunningAgent, model: str, protocol: str, *, concurrency: int,
          budget: Budget, target: str, pair_with: Callable[[], None] | None = None) -> Case:
    """One case: closed-loop load over HTTP or gRPC, tensors in the request or in shared
    memory; shared memory answers are checked against the in-process output."""
    pid = running.process.pid
    with contextlib.ExitStack() as stack:
        out_region = (stack.enter_context(shared_memory(running.port, model))
                      if protocol.startswith("shm-") else None)
        if protocol in ("grpc", "shm-grpc"):
            case = drive_grpc(pid, running.grpc_port, model, protocol, concurrency=concurrency,
                              budget=budget, target=target, pair_with=pair_with)
        else:
            case = drive_http(pid, running.port, model, protocol, concurrency=concurrency,
                              budget=budget, target=target, pair_with=pair_with)
        if out_region is not None:
            shape = (1, OUTPUT_BYTES[model] // 4)
            got = shm.get_contents_as_numpy(out_region, np.float32, shape)
            if not np.allclose(got, REFERENCE_OUTPUTS[model], rtol=1e-5, atol=1e-5):
                raise SystemExit(f"{model} {protocol}: the output in shared memory differs "
                                 "from in-process")
    return case


#: In-process outputs of each model's benchmark input (set by :func:`in_process`).
REFERENCE_OUTPUTS: dict[str, np.ndarray] = {}


def drive_grpc(agent_pid: int, port: int, model: str, protocol: str, *, concurrency: int,
               budget: Budget, target: str, pair_with: Callable[[], None] | None = None,
               ) -> Case:
    """Closed-loop load from one thread, one :class:`~benchmarks.thin_grpc.ThinGrpcConnection`
    per concurrent caller (the gRPC twin of :class:`ThinConnection`), the request message
    serialised once; the last answer is decoded and checked against the in-process output."""
    connections = thin_grpc(port, model, protocol, concurrency)
    try:
        case = _measure(agent_pid, model, protocol, concurrency=concurrency, budget=budget,
                        target=target, load=lambda: _select_loop(connections, budget))
        if pair_with is not None:
            case.paired_ratio = _interleaved(connections[0].call, pair_with)
        answer = connections[0].answer
    finally:
        for conn in connections:
            conn.close()
    if protocol == "grpc":
        response = service_pb2.ModelInferResponse.FromString(answer)
        got = np.frombuffer(response.raw_output_contents[0], np.float32)
        if not np.allclose(got, REFERENCE_OUTPUTS[model].ravel(), rtol=1e-5, atol=1e-5):
            raise SystemExit(f"{model} grpc: the answer differs from in-process")
    return case


class ThinConnection(ThinClient):
    """The thinnest honest HTTP/1.1 client: one keep-alive socket, the request encoded once,
    the response's head parsed for its status and Content-Length and its body read whole (and
    dropped). About 40-70 us of CPU per request here, against 300-500 us for
    geventhttpclient: on a 2-core box the client's CPU is taken from the agent."""

    def __init__(self, connect: Callable[[], socket.socket], path: str, body: bytes,
                 headers: dict[str, str]) -> None:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.wire = (f"POST {path} HTTP/1.1\r\nHost: edgeagent\r\n{head}"
                     f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.sock = connect()
        if self.sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent_at = 0.0
        self._buf = b""
        self._length = -1  # the body's length once the head is in; -1 before

    def send(self) -> None:
        self._buf, self._length = b"", -1
        self.sent_at = time.perf_counter()
        self.sock.sendall(self.wire)

    def receive(self) -> bool:
        """Read what the socket has; whether the response is complete."""
        more = self.sock.recv(max(65536, self._length - len(self._buf)))
        if not more:
            raise SystemExit("the agent closed the connection")
        self._buf += more
        if self._length < 0:
            head, sep, rest = self._buf.partition(b"\r\n\r\n")
            if not sep:
                return False
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"the agent answered {self._buf[:300]!r}")
            self._length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                if line[:15].lower() == b"content-length:")
            self._buf = rest
        return len(self._buf) >= self._length


def thin_http(port: int, model: str, protocol: str, count: int = 1) -> list[ThinConnection]:
    """``count`` :class:`ThinConnection` to an agent's HTTP ``port``, each sending the model's
    request of ``protocol`` (encoded once for all)."""
    body, headers = request_body(model, protocol)
    connect = functools.partial(socket.create_connection, ("127.0.0.1", port), 10)
    return [ThinConnection(connect, f"/v2/models/{model}/infer", body, headers)
            for _ in range(count)]


def thin_grpc(port: int, model: str, protocol: str, count: int = 1) -> list[ThinGrpcConnection]:
    """``count`` :class:`~benchmarks.thin_grpc.ThinGrpcConnection` to an agent's gRPC ``port``,
    each calling ``ModelInfer`` with the model's request (``shm-grpc``: in shared memory),
    serialised once for all."""
    wire = grpc_request(model, shared=protocol == "shm-grpc").SerializeToString()
    connect = functools.partial(socket.create_connection, ("127.0.0.1", port), 10)
    return [ThinGrpcConnection(connect, "/inference.GRPCInferenceService/ModelInfer", wire)
            for _ in range(count)]


def _select_loop(connections: list[ThinConnection] | list[ThinGrpcConnection], budget: Budget,
                 ) -> tuple[list[float], float, float]:
    """Closed-loop load from one thread: each connection sends again as soon as its answer is
    in (a selector waits for the next answer). Latencies, elapsed, client CPU."""
    sel = selectors.DefaultSelector()
    for conn in connections:
        sel.register(conn.sock, selectors.EVENT_READ, conn)
    latencies: list[float] = []

    def drive(until: float, record: bool) -> None:
        for conn in connections:
            conn.send()
        busy = len(connections)
        while busy:
            for key, _ in sel.select():
                conn = key.data
                if not conn.receive():
                    continue
                now = time.perf_counter()
                if record:
                    latencies.append(now - conn.sent_at)
                if now < until:
                    conn.send()
                else:
                    busy -= 1

    try:
        drive(time.perf_counter() + budget.warmup_s, False)
        cpu, start = time.process_time(), time.perf_counter()
        drive(start + budget.seconds, True)
        return latencies, time.perf_counter() - start, time.process_time() - cpu
    finally:
        sel.close()


def drive_http(agent_pid: int, port: int, model: str, protocol: str, *, concurrency: int,
               budget: Budget, target: str, pair_with: Callable[[], None] | None = None,
               ) -> Case:
    """Closed-loop load from one thread, one :class:`ThinConnection` per concurrent caller."""
    connections = thin_http(port, model, protocol, concurrency)
    try:
        case = _measure(agent_pid, model, protocol, concurrency=concurrency, target=target,
                        load=lambda: _select_loop(connections, budget), budget=budget)
        if pair_with is not None:
            case.paired_ratio = _interleaved(connections[0].call, pair_with)
        return case
    finally:
        for conn in connections:
            conn.close()


def _measure(agent_pid: int, model: str, protocol: str, *, concurrency: int, budget: Budget,
             target: str, load: Callable[[], tuple[list[float], float, float]]) -> Case:
    server = psutil.Process(agent_pid)
    # The agent's CPU is read around the whole loop, warm-up included, then scaled by the
    # share of requests measured: close enough for a cost per request.
    server_cpu, loop_cpu = sum(server.cpu_times()[:2]), _thread_cpu(server, agent_pid)
    lat, elapsed, cpu = load()
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu
    loop_cpu = _thread_cpu(server, agent_pid) - loop_cpu
    case = Case(target, model, protocol, concurrency)
    case.measured(lat, elapsed)
    case.client_cpu_us = round(cpu / len(lat) * 1e6, 1)
    share = budget.seconds / (budget.seconds + budget.warmup_s)
    case.server_cpu_us = round(server_cpu * share / len(lat) * 1e6, 1)
    case.loop_cpu_us = round(loop_cpu * share / len(lat) * 1e6, 1)
    return case


def _thread_cpu(process: psutil.Process, tid: int) -> float:
    """CPU seconds of one thread (on Linux the main thread's id is the process id)."""
    for t in process.threads():
        if t.id == tid:
            return float(t.user_time + t.system_time)
    return 0.0


def agent_stats(port: int) -> dict[str, dict[str, int]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/v2/models/stats")
        stats = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {m["name"]: {str(b["batch_size"]): b["compute_infer"]["count"]
                        for b in m.get("batch_stats", [])}
            for m in stats["model_stats"]}


def _batch_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {k: n - before.get(k, 0) for k, n in after.items()}
    return {k: n for k, n in sorted(delta.items(), key=lambda kv: int(kv[0])) if n}


#: (model, protocol, concurrency) of the unbatched agent's cases, in order.
UNBATCHED = [(m, p, c) for m in ("mlp", "cnn")
             for p in ("binary", "json", "grpc", "shm-http", "shm-grpc") for c in (1, 4)]
UNBATCHED += [("cnn", "binary", 8)]
#: ... and of the batching agent's (max_batch_size 8).
BATCHED = [("mlp", "binary", 1), ("mlp", "binary", 4), ("mlp", "binary", 8), ("mlp", "json", 8),
           ("cnn", "binary", 1), ("cnn", "binary", 8), ("cnn", "json", 8)]


#: (model, concurrency, bound) of the batching targets: batching on against off, paired.
BATCHING_TARGETS = [("mlp", 1, 0.95), ("mlp", 4, 0.95), ("cnn", 1, 0.95), ("cnn", 8, 1.0)]


def through_agent(work: Path, paths: dict[str, Path], budget: Budget,
                  reference: dict[str, np.ndarray], batch_delay_ms: float,
                  ) -> tuple[list[Case], dict[str, float]]:
    cases: list[Case] = []
    facts: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        running = stack.enter_context(agent(work, paths, max_batch_size=0))
        facts["ready_s"] = round(running.ready_s, 3)
        facts["ready_rss_mb"] = rss_mb(running.process.pid)
        time.sleep(2.0)  # settle: what an idle agent holds, both models loaded and warmed up
        facts["idle_rss_mb"] = rss_mb(running.process.pid)
        for model in paths:
            check_outputs(running.port, model, reference[model])
        for model, protocol, concurrency in UNBATCHED:
            case = drive(running, model, protocol, concurrency=concurrency, budget=budget,
                         target="agent", pair_with=_baseline_call(paths, model, concurrency))
            cases.append(case)
            _progress(case)
        time.sleep(2.0)  # the load has passed
        facts["after_load_rss_mb"] = rss_mb(running.process.pid)
        # The unbatched agent stays up (idle) for the paired batching ratios below.
        batching = stack.enter_context(agent(work, paths, max_batch_size=8,
                                             max_queue_delay_ms=batch_delay_ms))
        for model in paths:
            check_outputs(batching.port, model, reference[model])
        for model, protocol, concurrency in BATCHED:
            before = agent_stats(batching.port).get(model, {})
            case = drive(batching, model, protocol, concurrency=concurrency, budget=budget,
                         target="agent+batching",
                         pair_with=_baseline_call(paths, model, concurrency))
            case.batch_sizes = _batch_delta(before, agent_stats(batching.port).get(model, {}))
            cases.append(case)
            _progress(case)
        for model, concurrency, _ in BATCHING_TARGETS:
            case = next(c for c in cases if c.target == "agent+batching" and c.model == model
                        and c.protocol == "binary" and c.concurrency == concurrency)
            case.paired_batching = _interleaved_agents(batching.port, running.port, model,
                                                       concurrency)
    return cases, facts


def _interleaved_agents(port_a: int, port_b: int, model: str, concurrency: int, *,
                        rounds: int = 8, seconds: float = 0.5) -> float:
    """Agent A's closed-loop rate over agent B's (binary tensors, ``concurrency`` thin
    connections each), in alternating segments (ABBA order): the
    :attr:`Case.paired_batching` ratio."""
    conns = {port: thin_http(port, model, "binary", concurrency) for port in (port_a, port_b)}
    segment = Budget(warmup_s=0.1, seconds=seconds)
    counts = {port: [0, 0.0] for port in conns}
    try:
        for i in range(rounds):
            for port in (port_a, port_b) if i % 2 == 0 else (port_b, port_a):
                lat, elapsed, _ = _select_loop(conns[port], segment)
                counts[port][0] += len(lat)
                counts[port][1] += elapsed
    finally:
        for group in conns.values():
            for conn in group:
                conn.close()
    (a_n, a_t), (b_n, b_t) = counts[port_a], counts[port_b]
    return round((a_n / a_t) / (b_n / b_t), 3)


@functools.cache
def _baseline_session(path: Path) -> Any:
    return _session(path)


def _baseline_call(paths: dict[str, Path], model: str,
                   concurrency: int) -> Callable[[], None] | None:
    """One in-process inference of the CNN, to pair c1 cases with (None for other cases)."""
    if model != "cnn" or concurrency != 1:
        return None
    session = _baseline_session(paths[model])
    name, _, out = MODELS[model]
    return functools.partial(session.run, [out], {name: _input(model)})


def _interleaved(agent_call: Callable[[], None], baseline: Callable[[], None], *,
                 rounds: int = 8, seconds: float = 0.5) -> float:
    """The agent's c1 rate over in-process's, in alternating short segments (ABBA order) so
    that the box's drift falls on both alike: the :attr:`Case.paired_ratio`."""
    counts = {"agent": [0, 0.0], "baseline": [0, 0.0]}
    calls = {"agent": agent_call, "baseline": baseline}
    for fn in calls.values():
        for _ in range(3):
            fn()
    for i in range(rounds):
        for key in ("agent", "baseline") if i % 2 == 0 else ("baseline", "agent"):
            fn, n, start = calls[key], 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                fn()
                n += 1
            counts[key][0] += n
            counts[key][1] += time.perf_counter() - start
    (a_n, a_t), (b_n, b_t) = counts["agent"], counts["baseline"]
    return round((a_n / a_t) / (b_n / b_t), 3)


# ---- report -----------------------------------------------------------------------------


def add_ratios(cases: list[Case]) -> None:
    best: dict[str, float] = {}
    for c in cases:
        if c.target == "in-process":
            best[c.model] = max(best.get(c.model, 0.0), c.throughput)
    for c in cases:
        if c.target != "in-process":
            c.ratio = round(c.throughput / best[c.model], 3)


def targets(cases: list[Case], facts: dict[str, float]) -> list[dict[str, Any]]:
    """The issues' targets (3 and 14), each with the figure measured here and whether it is
    met."""
    def find(model: str, protocol: str, concurrency: int, target: str = "agent") -> Case:
        return next(c for c in cases if c.target == target and c.model == model
                    and c.protocol == protocol and c.concurrency == concurrency)

    def ratio(a: Case, b: Case) -> float:
        if a.paired_ratio and b.paired_ratio:  # each against its own in-process neighbour
            return round(a.paired_ratio / b.paired_ratio, 3)
        return round(a.throughput / b.throughput, 3) if b.throughput else 0.0

    cnn_bin, cnn_json = find("cnn", "binary", 1), find("cnn", "json", 1)
    mlp_c4 = max((find("mlp", p, 4) for p in ("binary", "json")), key=lambda c: c.throughput)
    cnn_shm = max((find("cnn", p, 1) for p in ("shm-http", "shm-grpc")),
                  key=lambda c: c.throughput)

    def paired(c: Case) -> float:
        return c.paired_ratio or c.ratio or 0.0

    def batching_ratio(model: str, concurrency: int) -> float:
        on = find(model, "binary", concurrency, "agent+batching")
        return on.paired_batching or ratio(on, find(model, "binary", concurrency))

    rows = [
        ("CNN, binary, c1: >= 0.85x in-process (paired)", paired(cnn_bin), 0.85, ">="),
        ("CNN, JSON, c1: >= 2x MLServer (2 x 29/s)", cnn_json.throughput,
         2 * REFERENCE["mlserver cnn json"], ">="),
        (f"MLP, c4 ({mlp_c4.protocol}): >= 3x KServe (3 x 985/s)", mlp_c4.throughput,
         3 * REFERENCE["kserve mlp c4"], ">="),
        (f"CNN, system shared memory ({cnn_shm.protocol}), c1: >= 0.95x in-process (paired)",
         paired(cnn_shm), 0.95, ">="),
        ("CNN, gRPC, c1: >= 0.85x in-process (paired)", paired(find("cnn", "grpc", 1)), 0.85,
         ">="),
        (f"MLP, gRPC, c4: >= 1.0x HTTP ({mlp_c4.protocol}) c4",
         ratio(find("mlp", "grpc", 4), mlp_c4), 1.0, ">="),
        ("idle RSS, both models loaded, gRPC on: < 120 MB", facts["idle_rss_mb"], 120.0, "<"),
        ("time to ready: < 1 s", facts["ready_s"], 1.0, "<"),
        ("RSS after the load: < idle + 40 MB", facts["after_load_rss_mb"],
         facts["idle_rss_mb"] + 40, "<"),
        *[(f"batching on, {m} binary c{c}: >= {b}x unbatched (paired)",
           batching_ratio(m, c), b, ">=") for m, c, b in BATCHING_TARGETS],
    ]
    out = []
    for name, value, bound, op in rows:
        met = value >= bound if op == ">=" else value < bound
        out.append({"target": name, "measured": value, "bound": bound, "met": met})
    return out


def _progress(case: Case) -> None:
    print(f"  {case.target:15} {case.model:4} {case.protocol:8} c{case.concurrency}: "
          f"{case.throughput:10.1f}/s", file=sys.stderr, flush=True)


def print_report(result: dict[str, Any]) -> None:
    print(f"\nedgeagent benchmark ({result['machine']['cpus']} CPUs, onnxruntime "
          f"{result['machine']['onnxruntime']}, {THREADS} intra-op threads, "
          f"{result['budget']['seconds']} s per case)\n")
    print(f"{'target':16}{'model':6}{'proto':10}{'conc':>5}{'inf/s':>11}{'p50 ms':>9}"
          f"{'p99 ms':>9}{'x in-proc':>11}{'cpu us':>9}{'loop us':>9}{'client us':>10}  batches")
    for c in result["cases"]:
        ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        if c.get("paired_ratio") is not None:
            ratio += f"|{c['paired_ratio']:.2f}"
        if c.get("paired_batching") is not None:
            batches_paired = f" (paired with unbatched: {c['paired_batching']:.2f}x)"
        else:
            batches_paired = ""
        client = f"{c['client_cpu_us']:.0f}" if c["client_cpu_us"] is not None else "-"
        loop = f"{c['loop_cpu_us']:.0f}" if c["loop_cpu_us"] is not None else "-"
        batches = " ".join(f"{k}:{n}" for k, n in c["batch_sizes"].items())
        print(f"{c['target']:16}{c['model']:6}{c['protocol']:10}{c['concurrency']:>5}"
              f"{c['throughput']:>11.1f}{c['p50_ms']:>9.2f}{c['p99_ms']:>9.2f}{ratio:>11}"
              f"{c['server_cpu_us']:>9.0f}{loop:>9}"
              f"{client:>10}  {batches}{batches_paired}")
    a = result["agent"]
    print(f"\nagent: ready in {a['ready_s']:.3f} s; RSS {a['ready_rss_mb']} MB at ready, "
          f"{a['idle_rss_mb']} MB idle, {a['after_load_rss_mb']} MB after the load")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  [{'met ' if t['met'] else 'MISS'}] {t['target']}: measured {t['measured']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per case instead of 4")
    parser.add_argument("--seconds", type=float, help="measured seconds per case")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--batch-delay-ms", type=float, default=2.0,
                        help="max_queue_delay_ms of the batching agent (default: 2, as shipped)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (1.0 if args.quick else 4.0)
    budget = Budget(warmup_s=min(1.0, seconds / 3), seconds=seconds)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgeagent-bench-") as tmp:
        work = Path(tmp)
        paths = {"mlp": mlp(work / "mlp.onnx"), "cnn": cnn(work / "cnn.onnx")}
        print(f"models: mlp, cnn ({cnn_macs() / 1e9:.2f} GMAC/image); in-process...",
              file=sys.stderr)
        cases, reference = in_process(paths, budget)
        print("through the agent...", file=sys.stderr)
        agent_cases, facts = through_agent(work, paths, budget, reference,
                                           args.batch_delay_ms)
    cases += agent_cases
    add_ratios(cases)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": ort.__version__,
                    "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg()},
        "budget": asdict(budget),
        "batch_delay_ms": args.batch_delay_ms,
        "cases": [asdict(c) for c in cases],
        "agent": facts,
        "targets": targets(cases, facts),
        "reference": REFERENCE,
    }
    print_report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
