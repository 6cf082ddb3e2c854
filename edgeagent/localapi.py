"""A client for the running agent's own local API, for the commands that talk to it
(``edgeagent status``, ``pull``, ``rollback``): where it listens, and its token."""

from __future__ import annotations

import httpx

from edgeagent.config import AgentConfig, read_token


def local_client(config: AgentConfig, timeout: float) -> httpx.Client:
    """An httpx client for the agent that ``config`` describes.

    A Unix socket listen is reached through the socket, a wildcard address on loopback; with
    ``http.token_file`` set, every request carries its bearer token.

    Raises:
        ConfigError: the token file cannot be read, or the configuration could not be served
            as it stands (see :func:`~edgeagent.config.read_token`).
    """
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
