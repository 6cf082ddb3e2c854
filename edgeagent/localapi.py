"""Reaching the running agent from the same box: the commands ``edgeagent status``, ``pull``,
``rollback`` and ``models`` use it.

The local admin channel (DESIGN 3.3) is a Unix socket, ``admin.sock``, in the agent's runtime
directory (``$RUNTIME_DIRECTORY`` under systemd: ``/run/edgeagent``), else in ``state_dir``. Its
file permissions are the authorisation: the agent's user and group may use it (mode 0660, so an
operator in the service's group, or root, runs the commands with no token). Where that socket
cannot be reached, the commands fall back to the HTTP listener with ``http.token_file``.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edgeagent.config import AgentConfig, read_token
from edgeagent.errors import EdgeAgentError

if TYPE_CHECKING:
    import httpx

ADMIN_SOCKET = "admin.sock"


def admin_socket_path(config: AgentConfig, env: Mapping[str, str]) -> Path:
    """Where the admin channel's socket is (the same answer for the agent and the commands)."""
    runtime = env.get("RUNTIME_DIRECTORY", "")
    if runtime:
        return Path(runtime.split(":")[0]) / ADMIN_SOCKET
    return config.state_path(env).resolve() / ADMIN_SOCKET


def _socket_answers(path: Path) -> bool:
    """A socket is there and something accepts on it (not a leftover of a killed run)."""
    if not path.exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def local_client(config: AgentConfig, timeout: float,
                 env: Mapping[str, str] | None = None) -> httpx.Client:
    """An httpx client for the agent that ``config`` describes: over the admin channel when it
    answers, else over the HTTP listener (a wildcard address reached on loopback), with the
    bearer token of ``http.token_file`` when one is set.

    Raises:
        ConfigError: the token file cannot be read, or the configuration could not be served
            as it stands (see :func:`~edgeagent.config.read_token`).
    """
    import httpx  # the operator's commands only: the agent itself never needs the client

    env = os.environ if env is None else env
    admin = admin_socket_path(config, env)
    if _socket_answers(admin):
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(admin)),
                            base_url="http://edgeagent", timeout=timeout)
    token = read_token(config)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    listen = config.http.listen
    if listen.startswith("unix:"):
        transport, base = httpx.HTTPTransport(uds=listen[5:]), "http://edgeagent"
    else:
        host, _, port = listen.rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]") else host  # noqa: S104
        transport, base = httpx.HTTPTransport(), f"http://{host}:{port}"
    return httpx.Client(transport=transport, base_url=base, headers=headers, timeout=timeout)


#: Held (flock, exclusive) by a running agent for as long as it runs: the commands tell a busy
#: agent from a stopped one by it, never by how fast the agent answers.
RUN_LOCK = ".agent.lock"


def agent_running(config: AgentConfig, env: Mapping[str, str] | None = None) -> bool:
    """Whether an agent runs on this state directory (it holds the run lock), however busy."""
    env = os.environ if env is None else env
    path = config.state_path(env).resolve() / RUN_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def hold_run_lock(state_dir: Path) -> int:
    """Take the run lock for the agent's life (the returned fd keeps it).

    Raises:
        EdgeAgentError: another agent runs on the same state directory.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EdgeAgentError(f"another agent already runs on {state_dir} (it holds "
                             f"{state_dir / RUN_LOCK}); stop it first") from None
    return fd
