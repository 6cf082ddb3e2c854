"""sd_notify against real datagram sockets (path and abstract), and the watchdog environment."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.service.notify import Notifier, watchdog_timeout
from tests.service.agentproc import NotifyListener


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    lst = NotifyListener()
    yield lst
    lst.close()


def test_no_socket_means_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False


def test_abstract_socket_gets_each_message(listener: NotifyListener) -> None:
    n = Notifier({"NOTIFY_SOCKET": listener.name})
    assert n.enabled
    assert n.ready("serving 1/1 model(s)")
    assert listener.recv(5) == "READY=1\nSTATUS=serving 1/1 model(s)"
    assert n.watchdog()
    assert listener.recv(5) == "WATCHDOG=1"
    assert n.stopping("draining")
    assert listener.recv(5) == "STOPPING=1\nSTATUS=draining"
    n.close()


def test_reloading_carries_monotonic_usec(listener: NotifyListener) -> None:
    n = Notifier({"NOTIFY_SOCKET": listener.name})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = (listener.recv(5) or "").splitlines()
    assert lines[0] == "RELOADING=1"
    usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= after
    n.close()


def test_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        n.status("loading")
        assert server.recv(100) == b"STATUS=loading"
        n.close()


def test_missing_socket_is_logged_not_raised(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.watchdog() is False
    assert n.watchdog() is False
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # once, not per ping
    assert "cannot notify systemd" in caplog.text
    n.close()


def test_unusable_socket_value_disables(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": "relative/notify"})
    assert not n.enabled
    assert "not a socket path" in caplog.text


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 1.0),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_timeout(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_timeout(env, 4242) == expected
