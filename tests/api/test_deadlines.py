"""Deadlines, with raw sockets against a running agent: half-sent heads and bodies, trickled
heads and idle connections are closed once their (short, configured) deadline passes. No timing
is asserted beyond "closed within a generous bound"."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import AgentThread, make_config

#: Generous: the configured deadlines are 1 s; this only bounds a test that would hang.
BOUND_S = 30.0


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    config = make_config(tmp_path_factory.mktemp("deadlines"), header_timeout_s=1.0,
                         body_timeout_s=1.0, keepalive_timeout_s=1.0)
    running = AgentThread(config).start()
    try:
        yield running
    finally:
        running.stop()


def _connect(agent: AgentThread) -> socket.socket:
    host, port = agent.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=BOUND_S)


def _auth(agent: AgentThread) -> bytes:
    return f"Authorization: Bearer {agent.token}\r\n".encode()


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the agent sends until it closes the connection (a timeout fails the test)."""
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _still_serving(agent: AgentThread) -> None:
    with httpx.Client(base_url=agent.url, headers=agent.headers, timeout=BOUND_S) as c:
        r = c.post("/v2/models/mlp/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]})
        assert r.status_code == 200, r.text


def test_a_connection_that_sends_nothing_is_closed(agent: AgentThread) -> None:
    with _connect(agent) as sock:
        answer = _read_until_closed(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    _still_serving(agent)


def test_a_half_sent_head_is_closed_with_408(agent: AgentThread) -> None:
    with _connect(agent) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Half: ")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"header_timeout_s" in answer
    _still_serving(agent)


def test_a_trickled_head_is_closed(agent: AgentThread) -> None:
    # One byte at a time keeps the connection busy but never ends the head: the deadline runs
    # from the head's start, so the trickle does not extend it.
    started = time.monotonic()
    closed = False
    with _connect(agent) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.2)
        while time.monotonic() - started < BOUND_S:
            try:
                sock.sendall(b"X")
                if sock.recv(65536) == b"":
                    closed = True
                    break
                closed = True  # an answer (the 408) came
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    assert closed, "a trickled request head was held open"
    _still_serving(agent)


def test_a_half_sent_body_is_closed_with_408(agent: AgentThread) -> None:
    with _connect(agent) as sock:
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n" + _auth(agent)
                     + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     + b'{"inputs": [')
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"body_timeout_s" in answer
    _still_serving(agent)


def test_a_half_sent_body_to_a_starlette_route_is_closed(
        agent: AgentThread, caplog: pytest.LogCaptureFixture) -> None:
    with _connect(agent) as sock:
        sock.sendall(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n" + _auth(agent)
                     + b"Content-Length: 1000\r\n\r\n{")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    _still_serving(agent)
    # A client cut off is no bug: no error logged for it.
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_an_idle_keep_alive_connection_is_closed(agent: AgentThread) -> None:
    with _connect(agent) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + _auth(agent) + b"\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]  # answered, then closed when idle
    assert answer.count(b"HTTP/1.1") == 1


def test_many_half_sent_requests_are_all_closed(agent: AgentThread) -> None:
    socks = [_connect(agent) for _ in range(50)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                         b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n" + _auth(agent)
                         + b"Content-Length: 10\r\n\r\n{")
        for sock in socks:
            _read_until_closed(sock)
    finally:
        for sock in socks:
            sock.close()
    _still_serving(agent)
