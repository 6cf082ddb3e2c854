"""The connection cap: connections past ``http.max_connections`` get a clear 503 and a log
line, the cap stays below the open-file limit, and the unit raises that limit."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from edgeagent.api.protocol import connection_cap
from edgeagent.service.unit import render_unit
from tests.api.conftest import AgentThread, make_config
from tests.api.test_deadlines import BOUND_S, _connect, _read_until_closed, _still_serving


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    config = make_config(tmp_path_factory.mktemp("capped"), max_connections=8,
                         header_timeout_s=600.0)
    running = AgentThread(config).start()
    try:
        yield running
    finally:
        running.stop()


def test_connections_past_the_cap_get_a_clear_503(capped: AgentThread,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    held = [_connect(capped) for _ in range(8)]
    try:
        with _connect(capped) as extra:
            extra.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = _read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"max_connections" in answer
        assert b"retry-after: 1" in answer.lower()
        assert any("refused" in r.getMessage() and "max_connections" in r.getMessage()
                   for r in caplog.records)
    finally:
        for sock in held:
            sock.close()
    # The held ones gone, the agent serves again.
    deadline = time.monotonic() + BOUND_S
    while True:
        try:
            _still_serving(capped)
            break
        except (AssertionError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_cap_stays_below_the_open_file_limit() -> None:
    assert connection_cap(4096, nofile=65536) == 4096
    assert connection_cap(4096, nofile=1024) == 1024 - 128
    assert connection_cap(4096, nofile=256) == 256 - 64
    assert connection_cap(10, nofile=1024) == 10


def test_the_unit_raises_the_open_file_limit() -> None:
    # systemd's default soft limit (1,024) would lower the cap to 896; the unit raises it.
    assert "\nLimitNOFILE=65536\n" in render_unit("/usr/bin/edgeagent")
