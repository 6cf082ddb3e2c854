"""The fleet controller as a real process (``edgeagent fleet serve``) on a real Mosquitto, the
simulated devices of ``benchmarks/fleetsim.py`` in a thread of their own, and throw-away
PostgreSQL databases where a server answers on 127.0.0.1:5432."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.fleetsim import FleetSim
from tests.mqtt.conftest import MOSQUITTO, Broker, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.skip("needs mosquitto (MQTT 5 shared subscriptions): apt install mosquitto")
    b = Broker(tmp_path / "broker", "max_queued_messages 1000\n")
    b.start()
    yield b
    b.stop(signal.SIGKILL)


class Controller:
    """One ``edgeagent fleet serve`` process with its fleet.toml in a temp dir."""

    def __init__(self, workdir: Path, broker_url: str, database: str = "",
                 **sections: dict[str, Any]) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = {"broker": {"url": broker_url}, "database": {"state_dir": str(self.dir)},
                "api": {"listen": f"127.0.0.1:{self.port}"},
                "inventory": {"offline_after_s": 60.0},
                "rollouts": {"tick_s": 0.2, "min_devices": 2, "wave_timeout_s": 30.0}}
        if database:
            conf["database"]["url"] = database
        for name, values in sections.items():
            conf.setdefault(name, {}).update(values)
        lines = []
        for name, values in conf.items():
            lines.append(f"[{name}]")
            for k, v in values.items():
                lines.append(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str)
                             else f"{k} = {str(v).lower() if isinstance(v, bool) else v}")
        self.config = self.dir / "fleet.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "controller.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Controller:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent", "fleet", "serve", "--config",
                 str(self.config), "--log-level", "debug"], stdout=log,
                stderr=subprocess.STDOUT, cwd=ROOT)

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the controller exited: {self.log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/v1/fleet/health", timeout=1).json()[
                    "broker_connected"] is True
            except httpx.HTTPError:
                return False

        wait_for(healthy, 30, "the controller to serve")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def token(self) -> str:
        return (self.dir / "api-token").read_text().strip()

    def api(self, method: str, path: str, body: dict[str, Any] | None = None,
            token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        r = httpx.request(method, f"{self.url}{path}", json=body, headers=headers, timeout=30)
        return r.status_code, r.json()

    def get(self, path: str) -> Any:
        status, body = self.api("GET", path)
        assert status == 200, body
        return body

    def cli(self, *args: str, timeout: float = 120) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-m", "edgeagent", "fleet", *args, "--config",
                               str(self.config)], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, check=False)
        return proc.returncode, proc.stdout + proc.stderr

    def inventory(self) -> int:
        return int(self.get("/v1/fleet/status")["inventory"]["devices"])


@pytest.fixture
def controllers(tmp_path: Path) -> Iterator[Callable[..., Controller]]:
    made: list[Controller] = []

    def make(broker: Broker, name: str = "fleet", **kw: Any) -> Controller:
        c = Controller(tmp_path / name, broker.url, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop(signal.SIGKILL)


class SimThread:
    """A FleetSim on an event loop in its own thread (the tests themselves are sync)."""

    def __init__(self, broker: Broker, n: int, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sim: FleetSim = self.run(self._make(broker.url, n, kw))
        self.run(self.sim.start())

    @staticmethod
    async def _make(url: str, n: int, kw: dict[str, Any]) -> FleetSim:
        return FleetSim(url, n, **kw)

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        fut: Future[Any] = Future()

        def do() -> None:
            try:
                fut.set_result(fn())
            except Exception as exc:  # handed to the test thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(do)
        return fut.result(30)

    def versions(self, model: str = "mlp") -> dict[str, int]:
        return self.call(lambda: {d.device_id: d.running.get(model)
                                  for d in self.sim.devices})

    def close(self) -> None:
        self.run(self.sim.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sims() -> Iterator[Callable[..., SimThread]]:
    made: list[SimThread] = []

    def make(broker: Broker, n: int, **kw: Any) -> SimThread:
        s = SimThread(broker, n, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _postgres_admin() -> str | None:
    """A URL of the local PostgreSQL's maintenance database, or None with no server."""
    url = os.environ.get("EDGEAGENT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        import psycopg
    except ImportError:
        return None
    try:
        with psycopg.connect(url, connect_timeout=3):
            return url
    except psycopg.Error:
        return None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away database on the machine's PostgreSQL, dropped afterwards."""
    admin = _postgres_admin()
    if admin is None:
        pytest.skip("no PostgreSQL answers on 127.0.0.1:5432 as user postgres (or psycopg "
                    "is missing); set EDGEAGENT_TEST_POSTGRES to an admin URL")
    import psycopg

    name = f"edgeagent_fleet_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def until(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    return wait_for(predicate, timeout, what)


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)



