"""The watchdog check: pings while healthy, none while an inference is stuck or the loop blocked."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.service.notify import Notifier
from edgeagent.service.watchdog import Watchdog, stuck_threshold
from tests.onnx_models import mlp
from tests.service.agentproc import REPO, NotifyListener, count, free_port, write_config


class FakeManager:
    """Implements the one method the watchdog reads: ``oldest_running_s``."""

    def __init__(self, oldest: float = 0.0) -> None:
        self.oldest = oldest

    def oldest_running_s(self) -> float:
        return self.oldest


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    lst = NotifyListener()
    yield lst
    lst.close()


@pytest.fixture
def notifier(listener: NotifyListener) -> Iterator[Notifier]:
    n = Notifier({"NOTIFY_SOCKET": listener.name})
    yield n
    n.close()


def test_threshold_is_at_least_30_s_and_twice_the_timeout() -> None:
    assert stuck_threshold(1.0) == 30.0
    assert stuck_threshold(30.0) == 60.0


def test_stuck_inference_withholds_pings_until_it_recovers(
        listener: NotifyListener, notifier: Notifier, caplog: pytest.LogCaptureFixture) -> None:
    manager = FakeManager()
    dog = Watchdog(notifier, manager, timeout_s=30.0)
    assert dog.tick()
    assert listener.recv(5) == "WATCHDOG=1"

    manager.oldest = 61.0  # beyond max(30, 2 x 30)
    assert not dog.tick()
    assert not dog.tick()
    status = listener.recv(5) or ""
    assert status.startswith("STATUS=unhealthy: an inference has been running for 61 s")
    assert listener.recv(0.2) is None  # no ping, and the problem reported once
    assert caplog.text.count("withholding watchdog pings") == 1

    manager.oldest = 0.0
    assert dog.tick()
    assert listener.recv(5) == "STATUS=serving"
    assert listener.recv(5) == "WATCHDOG=1"


def test_configured_threshold(notifier: Notifier) -> None:
    dog = Watchdog(notifier, FakeManager(5.0), 30.0,
                   stuck_after_s=4.0)
    assert dog.check().endswith("inference worker stuck")


def test_task_pings_repeatedly_and_stops(listener: NotifyListener, notifier: Notifier) -> None:
    async def main() -> None:
        dog = Watchdog(notifier, FakeManager(), 0.1)
        dog.start()
        for _ in range(3):
            assert await asyncio.to_thread(listener.recv, 10) == "WATCHDOG=1"
        await dog.stop()

    asyncio.run(main())


# A real agent whose event loop gets blocked once it serves: what a bug that runs blocking
# work on the loop does. The script says on the notify socket when it blocks.
_BLOCKING_AGENT = textwrap.dedent("""
    import asyncio, os, sys, time
    from edgeagent.app import Agent
    from edgeagent.config import load_config
    from edgeagent.service.lifecycle import Service
    from edgeagent.service.notify import Notifier

    class LoopBlockingAgent(Agent):
        async def start(self):
            await super().start()
            asyncio.get_running_loop().call_later(1.0, self.block)

        def block(self):
            Notifier(os.environ).send("X_TEST=blocking")
            time.sleep(600)

    config = load_config(sys.argv[1], os.environ)
    agent = LoopBlockingAgent(config, os.environ)
    asyncio.run(Service(agent, Notifier(os.environ), lambda: config, env=os.environ).run())
""")


@pytest.mark.slow
def test_blocked_event_loop_stops_pings(tmp_path: Path, listener: NotifyListener) -> None:
    config = write_config(tmp_path / "agent.toml", tmp_path / "state", free_port(),
                          {"m": mlp(tmp_path / "m.onnx")})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEAGENT_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=listener.name, WATCHDOG_USEC="1000000", PYTHONPATH=str(REPO))
    with (tmp_path / "stderr").open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_AGENT, str(config)], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        before = listener.wait_for("X_TEST=blocking")
        assert count(before, "READY=1") == 1
        assert count(before, "WATCHDOG=1") >= 1  # pings flowed while the loop ran
        # Pings are due every 0.5 s; none may come in a window of eight intervals.
        assert count(listener.collect(4.0), "WATCHDOG=1") == 0
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
