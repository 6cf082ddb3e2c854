"""Commands from fleet managers: ``{prefix}/{id}/cmd/{request_id}`` -> ``.../result``.

A command is ``{"action": "ping" | "sync" | "rollback" | "reload-config", ...arguments}``
(``rollback`` takes ``"model": NAME``). Each request id is executed at most once: ids are
remembered in ``state_dir`` *before* running, so a redelivered or repeated request (QoS 1
duplicates, a retained command, a restart) is never run twice; it gets no second result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from edgeagent.errors import EdgeAgentError
from edgeagent.fsutil import write_json_atomic
from edgeagent.telemetry.topics import NAME_RE

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 16 * 1024
#: Request ids remembered (the oldest are forgotten first).
REMEMBERED_IDS = 1000

#: An action: the command document -> the result document. Raises EdgeAgentError to refuse.
Action = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


class CommandError(EdgeAgentError):
    """A command is malformed or names something unknown."""


class CommandHandler:
    """Validates, deduplicates and runs commands.

    Args:
        actions: The action name -> its implementation.
        state_file: Where executed request ids are remembered.
    """

    def __init__(self, actions: Mapping[str, Action], state_file: Path) -> None:
        self.actions = dict(actions)
        self.state_file = state_file
        try:
            self._seen: list[str] = list(json.loads(state_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            self._seen = []

    def _remember(self, request_id: str) -> None:
        self._seen = [*self._seen, request_id][-REMEMBERED_IDS:]
        write_json_atomic(self.state_file, self._seen)

    async def handle(self, request_id: str, payload: bytes) -> dict[str, Any] | None:
        """Run one command; the result document, or None for a repeated request id."""
        if request_id in self._seen:
            log.info("command %s already executed; ignoring the repeat", request_id)
            return None
        result: dict[str, Any] = {"request_id": request_id}
        try:
            if not NAME_RE.match(request_id):
                raise CommandError("a request id uses letters, digits, '_', '.', ':', '-' only")
            self._remember(request_id)
            doc = parse_command(payload, self.actions)
            result["action"] = doc["action"]
            result.update(ok=True, result=await self.actions[doc["action"]](doc))
        except EdgeAgentError as exc:
            result.update(ok=False, error=str(exc))
        log.info("command %s %s: %s", request_id, result.get("action", "?"),
                 "ok" if result["ok"] else result["error"])
        return {"ts": time.time(), **result}


def parse_command(payload: bytes, actions: Mapping[str, Action]) -> dict[str, Any]:
    """Parse and check a command document.

    Raises:
        CommandError: too large, not JSON, not an object, an unknown action.
    """
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CommandError("expected a JSON object")
    action = doc.get("action")
    if action not in actions:
        raise CommandError(f"unknown action {action!r} (known: {', '.join(sorted(actions))})")
    return doc


def model_argument(doc: Mapping[str, Any]) -> str:
    """The ``model`` argument of a command.

    Raises:
        CommandError: missing or not a model name.
    """
    name = doc.get("model")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CommandError(f"{doc.get('action')}: expected \"model\": NAME, got {name!r}")
    return name
