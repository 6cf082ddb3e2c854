"""A client for the running agent's own local API, for the commands that talk to it
(``edgeagent status``, ``pull``, ``rollback``): where it listens, and its token."""

from __future__ import annotations

from pathlib import Path

import httpx

from edgeagent.config import AgentConfig
from edgeagent.errors import ConfigError


def local_client(config: AgentConfig, timeout: float) -> httpx.Client:
    """An httpx client for the agent that ``config`` describes.

    A Unix socket listen is reached through the socket, a wildcard address on loopback; with
    ``http.token_file`` set, every request carries its bearer token.

    Raises:
        ConfigError: the token file cannot be read.
    """
    headers = {}
    if config.http.token_file:
        try:
            token = Path(config.http.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file: {exc.strerror}",
                              "http.token_file") from exc
        headers["Authorization"] = f"Bearer {token}"
    listen = config.http.listen
    if listen.startswith("unix:"):
        transport, base = httpx.HTTPTransport(uds=listen[5:]), "http://edgeagent"
    else:
        host, _, port = listen.rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]") else host  # noqa: S104
        transport, base = httpx.HTTPTransport(), f"http://{host}:{port}"
    return httpx.Client(transport=transport, base_url=base, headers=headers, timeout=timeout)
