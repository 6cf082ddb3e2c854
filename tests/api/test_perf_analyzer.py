"""perf_analyzer 2.51 (Triton's load generator, from the ``tritonclient==2.51.*`` wheel),
unmodified, against a running agent over HTTP, gRPC, gRPC streaming and system shared memory.

It aborts on server statistics that Triton would not report ("Server side statistics compute
counts must be the same"), so a clean run is also a check of the statistics extension.

Where: ``$EDGEAGENT_PERF_ANALYZER``, else ``perf_analyzer`` on ``PATH``. It needs
``libb64.so.0d`` (Debian/Ubuntu: ``apt-get install libb64-0d``) and ``libcudart.so.12`` (``pip
install nvidia-cuda-runtime-cu12``, its ``nvidia/cuda_runtime/lib`` on ``LD_LIBRARY_PATH``);
without them the test skips and says which is missing. README "Benchmarks" has the steps.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import AgentThread, make_config

pytestmark = pytest.mark.slow


def _perf_analyzer() -> str:
    path = os.environ.get("EDGEAGENT_PERF_ANALYZER") or shutil.which("perf_analyzer")
    if not path:
        pytest.skip("perf_analyzer not found: set EDGEAGENT_PERF_ANALYZER or put it on PATH "
                    "(it ships in the tritonclient==2.51.* wheel, data/bin/perf_analyzer)")
    probe = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60,
                           check=False)
    if probe.returncode != 0:
        missing = re.findall(r"(\S+\.so[.\d\w]*): cannot open shared object file",
                             probe.stderr)
        pytest.skip(f"perf_analyzer does not run here: missing {', '.join(missing) or '?'} "
                    f"({probe.stderr.strip()[:200]})")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    running = AgentThread(make_config(tmp_path_factory.mktemp("perf"))).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("mode", ["http", "grpc", "grpc --streaming",
                                  "http --shared-memory=system", "grpc --shared-memory=system"])
@pytest.mark.parametrize("model", ["mlp", "multi_io"])
def test_perf_analyzer_runs_unmodified(served: AgentThread, tmp_path: Path, mode: str,
                                       model: str) -> None:
    tool = _perf_analyzer()
    protocol, *extra = mode.split()
    url = served.grpc_url if protocol == "grpc" else served.url.removeprefix("http://")
    shapes = (["--shape", "input:1,64"] if model == "mlp" else [])  # multi_io: batching on
    report = tmp_path / "report.csv"
    cmd = [tool, "-m", model, "-u", url, "-i", protocol, *extra, *shapes,
           "-H", f"authorization: Bearer {served.token}",
           "--concurrency-range", "2", "-p", "300", "--max-trials", "10", "-s", "100",
           "-f", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Server side statistics" not in out
    assert "Throughput:" in out
    server = re.search(r"Server:\s+Inference count: (\d+)", out)
    assert server is not None and int(server.group(1)) > 0, out
    assert report.read_text().startswith("Concurrency,Inferences/Second")
