"""Commands from fleet managers: ``{prefix}/{id}/cmd/{request_id}`` -> ``.../result``.

A command is ``{"action": "ping" | "sync" | "rollback" | "reload-config", ...arguments}``
(``rollback`` takes ``"model": NAME``). Each request id is executed at most once: ids are
remembered in ``state_dir`` *before* running, so a redelivered or repeated request (QoS 1
duplicates, a retained command, a restart) is never run twice; it gets no second result.

The handler is total: any payload gets a result (``ok`` true) or a refusal (``ok`` false, with
why), and the write of the id log is batched and off the event loop (:class:`CommandLog`), so a
flood of commands neither blocks the loop nor costs one fsync per command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from edgeagent.control.rollout import load_object
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


class CommandLog:
    """The request ids already executed, kept in ``path`` across restarts.

    :meth:`record` returns once the id is on disk (written, fsynced, renamed into place), and
    the writes are *batched*: while one write runs in a worker thread, the ids recorded meanwhile
    wait for the next one, which takes them all. A flood of commands then costs a few writes,
    none of them on the event loop, and each command still runs only after its id is stored.

    Args:
        path: The JSON list of remembered ids.
        keep: How many ids are remembered (the oldest are forgotten first).
    """

    def __init__(self, path: Path, keep: int = REMEMBERED_IDS) -> None:
        self.path = path
        self._ids: deque[str] = deque(maxlen=keep)
        self._ids.extend(_read_ids(path)[-keep:])
        self._set = set(self._ids)
        self._recorded = 0  # ids recorded so far (a generation counter)
        self._durable = 0  # ... of which on disk
        self._lock = asyncio.Lock()
        self.writes = 0
        """Writes so far (each one an fsync)."""

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._set

    def add(self, request_id: str) -> int:
        """Remember ``request_id`` at once (in memory); the generation to wait for."""
        if len(self._ids) == self._ids.maxlen:
            self._set.discard(self._ids[0])
        self._ids.append(request_id)
        self._set.add(request_id)
        self._recorded += 1
        return self._recorded

    async def durable(self, generation: int) -> None:
        """Return once every id up to ``generation`` is on disk.

        Raises:
            OSError: the write failed (the caller refuses the command).
        """
        async with self._lock:  # one write at a time; those waiting share the next
            if self._durable >= generation:
                return
            upto, ids = self._recorded, list(self._ids)
            await asyncio.get_running_loop().run_in_executor(
                None, write_json_atomic, self.path, ids)
            self.writes += 1
            self._durable = upto

    async def record(self, request_id: str) -> None:
        """Remember ``request_id`` and return once it is on disk."""
        await self.durable(self.add(request_id))


def _read_ids(path: Path) -> list[str]:
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, ValueError):
        return []
    return [i for i in doc if isinstance(i, str)] if isinstance(doc, list) else []


class CommandHandler:
    """Validates, deduplicates and runs commands: total, whatever the payload.

    Args:
        actions: The action name -> its implementation.
        state_file: Where executed request ids are remembered.
    """

    def __init__(self, actions: Mapping[str, Action], state_file: Path) -> None:
        self.actions = dict(actions)
        self.state_file = state_file
        self.log = CommandLog(state_file)

    async def handle(self, request_id: str, payload: bytes) -> dict[str, Any] | None:
        """Run one command; the result document, or None for a repeated request id.

        Never raises (but for cancellation): a refusal, a failed action and a bug in an action
        all end in a result with ``ok`` false; a bug is logged once, with the request id.
        """
        if request_id in self.log:
            log.info("command %s already executed; ignoring the repeat", request_id)
            return None
        result: dict[str, Any] = {"request_id": request_id}
        try:
            if not NAME_RE.match(request_id):
                raise CommandError("a request id uses letters, digits, '_', '.', ':', '-' only")
            generation = self.log.add(request_id)  # at once: a concurrent repeat is seen
            doc = parse_command(payload, self.actions)
            result["action"] = doc["action"]
            try:
                await self.log.durable(generation)  # stored before it runs
            except OSError as exc:
                raise CommandError(f"cannot record the request id ({exc.strerror}); "
                                   "not run") from exc
            output = await self.actions[doc["action"]](doc)
            json.dumps(output)  # an answer that cannot be sent is a bug, caught below
            result.update(ok=True, result=output)
        except EdgeAgentError as exc:
            result.update(ok=False, error=str(exc))
        except Exception as exc:  # a bug: answered, logged once
            tag = secrets.token_hex(6)
            log.error("command %s (%s) failed: %s: %s", request_id, tag, type(exc).__name__,
                      exc, exc_info=exc)
            result.update(ok=False, error=f"internal error ({tag}): {type(exc).__name__}; "
                                          "the agent's log has the details")
        log.info("command %s %s: %s", request_id, result.get("action", "?"),
                 "ok" if result["ok"] else result["error"])
        return {"ts": time.time(), **result}


def parse_command(payload: bytes, actions: Mapping[str, Action]) -> dict[str, Any]:
    """Parse and check a command document.

    orjson bounds what it parses (1,024 levels of nesting; integers beyond 64 bits are refused
    or read as floats), so no payload can make the parser recurse without end or spend
    quadratic time on a long integer.

    Raises:
        CommandError: too large, not JSON, not an object, an action that is not a known name.
    """
    doc = load_object(payload, MAX_COMMAND_BYTES, None, CommandError)
    action = doc.get("action")
    if not isinstance(action, str) or action not in actions:
        shown = repr(action) if isinstance(action, str | None) else type(action).__name__
        raise CommandError(f"unknown action {shown[:80]} (known: {', '.join(sorted(actions))})")
    return doc


def model_argument(doc: Mapping[str, Any]) -> str:
    """The ``model`` argument of a command.

    Raises:
        CommandError: missing or not a model name.
    """
    name = doc.get("model")
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = repr(name)[:80] if isinstance(name, str | None) else type(name).__name__
        raise CommandError(f"{doc.get('action')}: expected \"model\": NAME, got {shown}")
    return name
