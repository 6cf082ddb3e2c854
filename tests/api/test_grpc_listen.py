"""Where the gRPC listener listens, what its token rules are, how many connections it takes,
and that turning it off keeps its messages (and protobuf) out of the process."""

from __future__ import annotations

import dataclasses
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from edgeagent.app import Agent
from edgeagent.config import GrpcSection, parse_config
from edgeagent.errors import ConfigError, EdgeAgentError
from tests.api.conftest import AgentThread, make_config

REPO = Path(__file__).resolve().parents[2]


def test_non_loopback_grpc_without_a_token_is_refused(tmp_path: Path) -> None:
    config = parse_config({"agent": {"state_dir": str(tmp_path)},
                           "grpc": {"listen": "0.0.0.0:8001"}})
    with pytest.raises(ConfigError, match=r"grpc\.listen.*token_file|token_file"):
        Agent(config)


@pytest.mark.parametrize(("listen", "words"), [
    ("8001", "HOST:PORT (127.0.0.1:8001)"), ("unix:", "socket path"),
    ("example.com:8001", "not an IP address")])
def test_bad_grpc_listen_is_a_config_error(listen: str, words: str) -> None:
    with pytest.raises(ConfigError, match=r"grpc\.listen") as info:
        parse_config({"grpc": {"listen": listen}})
    assert words in str(info.value)


def test_grpc_off_never_imports_its_messages(tmp_path: Path) -> None:
    """``grpc.listen = ""``: the agent serves HTTP and never loads Triton's messages, protobuf
    or hpack (nor grpcio, which it never loads at all)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"""
import asyncio, sys
from edgeagent.app import Agent
from edgeagent.config import parse_config
config = parse_config({{"agent": {{"state_dir": {str(tmp_path / "state")!r}}},
                        "http": {{"listen": "127.0.0.1:{port}"}}, "grpc": {{"listen": ""}}}})
async def main():
    agent = Agent(config)
    await agent.start()
    await agent.stop()
asyncio.run(main())
loaded = set(sys.modules) | {{m.split(".")[0] for m in sys.modules}}
print(",".join(sorted(loaded & {{"grpc", "tritonclient", "google.protobuf", "hpack"}})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=120)
    assert out.stdout.strip().splitlines()[-1:] in ([], [""]), out.stdout


def test_grpc_on_a_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "grpc.sock"
    config = make_config(tmp_path, token=False)
    config = dataclasses.replace(config, grpc=GrpcSection(listen=f"unix:{sock}"))
    running = AgentThread(config).start()
    try:
        assert sock.stat().st_mode & 0o777 == 0o660
        with tc.InferenceServerClient(f"unix:{sock}") as client:
            assert client.is_server_ready()
            assert client.get_server_metadata().name == "edgeagent"
            # No token configured: repository changes are refused outright, as over HTTP.
            with pytest.raises(InferenceServerException, match="token_file") as info:
                client.unload_model("mlp")
            assert "PERMISSION_DENIED" in str(info.value.status())
            assert client.is_model_ready("mlp")
    finally:
        running.stop()


def test_grpc_port_in_use_fails_start_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = dataclasses.replace(make_config(tmp_path),
                                     grpc=GrpcSection(listen=f"127.0.0.1:{port}"))
        with pytest.raises(EdgeAgentError, match=f"cannot listen on 127.0.0.1:{port} for gRPC"):
            AgentThread(config).start()


def test_draining_agent_answers_not_ready(tmp_path: Path) -> None:
    running = AgentThread(make_config(tmp_path, token=False)).start()
    try:
        with grpc.insecure_channel(running.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready
            running.agent._draining = True  # what stop() sets first
            assert not stub.ServerReady(service_pb2.ServerReadyRequest()).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(service_pb2.ModelInferRequest(model_name="mlp"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            running.agent._draining = False
    finally:
        running.stop()


def test_grpc_connections_over_the_cap_are_closed(tmp_path: Path) -> None:
    """``http.max_connections`` bounds the gRPC listener's connections too: one over it is
    closed at once, and a connection is taken again once one has closed."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes((0, 0, 0, 4, 0, 0, 0, 0, 0))
    with AgentThread(make_config(tmp_path, token=False, max_connections=2)).start() as running:
        host, _, port = running.grpc_url.rpartition(":")
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
        for conn in held:
            conn.sendall(preface)
            assert conn.recv(9)[3] == 4  # the server's SETTINGS: the connection is served
        with socket.create_connection((host, int(port)), timeout=10) as extra:
            try:
                extra.sendall(preface)
                answer = extra.recv(1024)
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
            assert answer == b""  # closed without a frame
        held.pop().close()
        with grpc.insecure_channel(running.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            # wait_for_ready: the closed connection may still be counted for a moment.
            assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10,
                                   wait_for_ready=True).live
        held[0].close()


def test_stopping_ends_an_open_stream_within_the_grace(tmp_path: Path) -> None:
    """A ModelStreamInfer call left open by its client does not hold the agent's stop past
    ``agent.shutdown_grace_s``: the client is told (GOAWAY), then the call is cut, and the
    client sees its stream end with an error instead of hanging."""
    with AgentThread(make_config(tmp_path, token=False)).start() as running:
        requests: queue.Queue[Any] = queue.Queue()
        x = np.ones((1, 64), np.float32)
        request = service_pb2.ModelInferRequest(
            model_name="mlp", raw_input_contents=[x.tobytes()],
            inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                                   shape=[1, 64])])
        outcome: list[Any] = []
        with grpc.insecure_channel(running.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            answers = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)
            requests.put(request)
            first = next(answers)
            assert first.error_message == ""

            def drain() -> None:
                try:
                    outcome.extend(answers)
                    outcome.append("ended")
                except grpc.RpcError as exc:
                    outcome.append(exc.code())  # type: ignore[attr-defined]

            reader = threading.Thread(target=drain)
            reader.start()
            running.stop()  # asserts the agent's threads are gone
            reader.join(30)
            requests.put(None)
            assert not reader.is_alive(), "the client's stream hung after the agent stopped"
    # The connection is cut after the grace: grpcio reports UNAVAILABLE (what it said here;
    # CANCELLED would say the same).
    assert outcome in ([grpc.StatusCode.UNAVAILABLE], [grpc.StatusCode.CANCELLED]), outcome
