"""Helpers of the service tests: a notify socket to listen on, and the agent as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket (abstract: no file left)."""

    def __init__(self) -> None:
        self.name = f"@edgeagent-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.seen: list[str] = []

    def recv(self, timeout: float) -> str | None:
        """The next message, or None when none came within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            msg = self.sock.recv(65536).decode()
        except TimeoutError:
            return None
        self.seen.append(msg)
        return msg

    def wait_for(self, field: str, timeout: float = 120.0) -> list[str]:
        """Messages up to and including the first one holding ``field`` (a line, or KEY=)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            msg = self.recv(max(left, 0.01)) if left > 0 else None
            if msg is None:
                raise AssertionError(f"no {field!r} within {timeout} s; got {got!r}")
            got.append(msg)
            if any(line == field or line.startswith(field) for line in msg.splitlines()):
                return got

    def collect(self, seconds: float) -> list[str]:
        """Every message received during a window of ``seconds``."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if msg is not None:
                got.append(msg)
        return got

    def close(self) -> None:
        self.sock.close()


def count(messages: list[str], line: str) -> int:
    return sum(m.splitlines().count(line) for m in messages)


def write_config(path: Path, state_dir: Path, port: int, models: dict[str, Path],
                 extra: str = "") -> Path:
    lines = [f'[agent]\nstate_dir = "{state_dir}"\n{extra}',
             f'[http]\nlisten = "127.0.0.1:{port}"',
             '[grpc]\nlisten = ""']  # off: tests run side by side, never on the default port
    for name, model in models.items():
        lines.append(f'[[models]]\nname = "{name}"\npath = "{model}"')
    path.write_text("\n\n".join(lines) + "\n")
    return path


class AgentProcess:
    """``python -m edgeagent run --config ...`` as a child; killed at the end if still alive."""

    def __init__(self, config: Path, env: dict[str, str], stderr: Path) -> None:
        self.stderr_path = stderr
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("EDGEAGENT_", "NOTIFY_SOCKET", "WATCHDOG_",
                                         "JOURNAL_STREAM", "INVOCATION_ID"))}
        full_env["PYTHONPATH"] = str(REPO)
        full_env.update(env)
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgeagent", "run", "--config", str(config)],
                cwd=config.parent, env=full_env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def wait_ready_http(port: int, proc: AgentProcess, timeout: float = 120.0) -> None:
    """Poll ``GET /v2/health/ready`` until 200 (for runs without a notify socket)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.proc.returncode}:\n{proc.log()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"agent not ready within {timeout} s:\n{proc.log()}")


def infer_body(rows: int = 1, value: float = 0.5, n_in: int = 64) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": [rows, n_in], "datatype": "FP32",
                        "data": [value] * (rows * n_in)}]}
