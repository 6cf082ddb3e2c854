"""One caller, CNN with binary tensors: the agent over loopback TCP against a Unix socket, with a
client as thin as a client can be (one blocking socket, the request pre-encoded, the response
read by its Content-Length, no HTTP library).

Usage::

    python -m benchmarks.c1_listen [--requests N] [--rounds R]

It answers two questions the main benchmark leaves open: how much of the c1 gap to in-process
is the client's (its CPU here against geventhttpclient's, before the main benchmark took
the same client), and whether local apps gain anything
from ``http.listen = "unix:..."``. Each round starts one agent per listen kind, alternating, and
prints requests per second and the client's CPU per request; the in-process baseline is the
same model in the same process, as in ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.models import cnn
from benchmarks.run import (
    THREADS,
    ThinConnection,
    _free_port,
    _input,
    request_body,
    write_config,
)


@contextlib.contextmanager
def _agent(work: Path, model: Path, listen: str) -> Iterator[Callable[[], socket.socket]]:
    """An agent serving the CNN on ``listen`` ("tcp" or "unix"); yields a connect function."""
    port = _free_port()
    config = write_config(work, {"cnn": model}, port, max_batch_size=0)
    path = work / "api.sock"
    if listen == "unix":
        config.write_text(config.read_text().replace(f'listen = "127.0.0.1:{port}"',
                                                     f'listen = "unix:{path}"'))

    def connect() -> socket.socket:
        if listen == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            return s
        return socket.create_connection(("127.0.0.1", port))

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAGENT_")}
    proc = subprocess.Popen([sys.executable, "-m", "edgeagent", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                connect().close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the agent did not start") from None
                time.sleep(0.05)
        yield connect
    finally:
        proc.terminate()
        proc.wait(30)


def _measure(connect: Callable[[], socket.socket], requests: int) -> tuple[float, float]:
    """Requests per second and client CPU microseconds per request, after a warm-up."""
    body, headers = request_body("cnn", "binary")
    conn = ThinConnection(connect, "/v2/models/cnn/infer", body, headers)
    one = conn.call
    with contextlib.closing(conn):
        for _ in range(max(20, requests // 10)):
            one()
        cpu, start = os.times(), time.perf_counter()
        for _ in range(requests):
            one()
        elapsed, after = time.perf_counter() - start, os.times()
    used = after.user + after.system - cpu.user - cpu.system
    return requests / elapsed, used / requests * 1e6


def _in_process(model: Path, seconds: float = 4.0) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: _input("cnn")}
    for _ in range(10):
        session.run(None, feed)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feed)
        n += 1
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600, help="measured requests per case")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeagent-c1-") as tmp:
        work = Path(tmp)
        model = cnn(work / "cnn.onnx")
        baseline = _in_process(model)
        print(f"in-process   {baseline:7.1f}/s")
        for _ in range(args.rounds):
            for listen in ("tcp", "unix"):
                with _agent(work, model, listen) as connect:
                    rate, client_us = _measure(connect, args.requests)
                print(f"agent {listen:5}  {rate:7.1f}/s  {rate / baseline:.2f}x in-process  "
                      f"client {client_us:.0f} us/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
