"""CUDA shared memory (Triton's extension) on a real NVIDIA GPU: a client process exports
device memory with ``tritonclient.utils.cuda_shared_memory``, registers it over HTTP and gRPC,
and gets the model's answer written back to the device.

CUDA IPC handles cannot be opened by the process that made them, so the client runs in a
child process and the agent in this one. Needs a GPU, the CUDA runtime and ``cuda-python``
(``pip install 'tritonclient[cuda]'``); skips with the reason elsewhere.
"""

from __future__ import annotations

import multiprocessing
import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeagent.device import DeviceFacts
from tests.api.conftest import AgentThread, make_config


def _client(kind: str, url: str, token: str, x: np.ndarray, out: Any) -> None:
    """In a child process: export input and output buffers, infer with both on the GPU."""
    import tritonclient.grpc as tcg
    import tritonclient.http as tch
    import tritonclient.utils.cuda_shared_memory as cudashm

    tc: Any = tch if kind == "http" else tcg
    headers = {"authorization": f"Bearer {token}"}
    client = tc.InferenceServerClient(url)
    in_h = cudashm.create_shared_memory_region("in", x.nbytes, 0)
    out_h = cudashm.create_shared_memory_region("out", x.shape[0] * 10 * 4, 0)
    try:
        cudashm.set_shared_memory_region(in_h, [x])
        client.register_cuda_shared_memory("in", cudashm.get_raw_handle(in_h), 0, x.nbytes,
                                           headers=headers)
        client.register_cuda_shared_memory("out", cudashm.get_raw_handle(out_h), 0,
                                           x.shape[0] * 10 * 4, headers=headers)
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory("in", x.nbytes)
        req = tc.InferRequestedOutput("logits")
        req.set_shared_memory("out", x.shape[0] * 10 * 4)
        client.infer("mlp", [inp], outputs=[req], headers=headers)
        status = client.get_cuda_shared_memory_status(headers=headers)
        got = cudashm.get_contents_as_numpy(out_h, np.float32, [x.shape[0], 10])
        client.unregister_cuda_shared_memory(headers=headers)
        out.put((got, len(status) if kind == "http" else len(status.regions)))
    except Exception as exc:
        out.put(exc)
    finally:
        cudashm.destroy_shared_memory_region(in_h)
        cudashm.destroy_shared_memory_region(out_h)
        client.close()


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_tensors_in_cuda_shared_memory(gpu_facts: DeviceFacts, tmp_path: Path,
                                       kind: str) -> None:
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed "
                        "(pip install 'tritonclient[cuda]')")
    running = AgentThread(make_config(tmp_path)).start()
    try:
        x = np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32)
        url = running.url.removeprefix("http://") if kind == "http" else running.grpc_url
        ctx = multiprocessing.get_context("spawn")
        answers = ctx.Queue()
        child = ctx.Process(target=_client, args=(kind, url, running.token, x, answers))
        child.start()
        try:
            result = answers.get(timeout=120)
        except queue.Empty:
            pytest.fail("the client process gave no answer")
        finally:
            child.join(60)
        if isinstance(result, Exception):
            raise result
        got, registered = result
        assert registered == 2
        model = running.agent.manager.get("mlp").model
        want = model.run(model.validate({"input": x}), None)["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        running.stop()
