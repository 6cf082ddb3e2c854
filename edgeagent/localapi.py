"""Reaching the running agent from the same box: the commands ``edgeagent status``, ``pull``,
``rollback`` and ``models`` use it.

The local admin channel (DESIGN 3.3) is a Unix socket, ``admin.sock``, in the agent's runtime
directory (``$RUNTIME_DIRECTORY`` under systemd: ``/run/edgeagent``), else in ``state_dir``. Its
file permissions are the authorisation: the agent's user and group may use it (mode 0660, so an
operator in the service's group, or root, runs the commands with no token). Where that socket
cannot be reached, the commands fall back to the HTTP listener with ``http.token_file``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

import httpx

from edgeagent.config import AgentConfig, read_token

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


def agent_running(config: AgentConfig, env: Mapping[str, str] | None = None) -> bool:
    """Whether the agent answers on its admin channel or its HTTP listener."""
    try:
        with local_client(config, timeout=5, env=env) as client:
            client.get("/v2/health/live")
    except httpx.HTTPError:
        return False
    return True
