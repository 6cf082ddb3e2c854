"""The real agent (``python -m edgeagent run``) as a subprocess with ``[mqtt]`` (and ``[hub]``)
configured, for the tests that SIGKILL it or run it end to end with the fleet CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.service.agentproc import AgentProcess, free_port, wait_ready_http


def start_agent(work: Path, device_id: str, broker_url: str, *, mqtt: str = "",
                hub: str = "", models: str = "", tags: tuple[str, ...] = ()) -> tuple[
                    AgentProcess, int]:
    """Write a config under ``work`` and start the agent; return it and its HTTP port once
    it answers ready. ``mqtt``/``hub``/``models`` are extra TOML lines of those sections."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{work / "state"}"\ndevice_id = "{device_id}"\n'
        f"tags = {json.dumps(list(tags))}\n"
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        '[grpc]\nlisten = ""\n'  # off: tests run side by side, never on the default port
        f'[mqtt]\nurl = "{broker_url}"\n{mqtt}\n'
        + (f"[hub]\n{hub}\n" if hub else "") + models)
    proc = AgentProcess(config, {}, work / "agent.log")
    try:
        wait_ready_http(port, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, port


def mqtt_status(port: int) -> dict[str, Any]:
    """The ``mqtt`` part of the agent's status (spool depth and dropped, connection)."""
    doc: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/v1/agent/status",
                                    timeout=10).json()["mqtt"]
    return doc
