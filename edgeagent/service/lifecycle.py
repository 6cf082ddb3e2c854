"""The daemon's life under systemd: signals, notify messages, the watchdog, reloads.

:class:`Service` drives an :class:`~edgeagent.app.Agent` (the composition root, which owns the
start-up and shutdown order of the parts) through one process lifetime:

- start the agent, then ``READY=1`` (HTTP serves, configured models loaded or failed and
  reported), then watchdog pings while healthy;
- SIGHUP: ``RELOADING=1``, read the configuration again, apply what can change live, report what
  needs a restart, ``READY=1``; a bad file is reported and the running configuration kept;
- SIGTERM / SIGINT: ``STOPPING=1``, then the agent stops (new requests refused, requests in
  flight finish within ``agent.shutdown_grace_s``), and the process exits 0.

Outside systemd the notify messages are no-ops; signals work the same on a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, TypeVar

from edgeagent.config import AgentConfig
from edgeagent.errors import ConfigError
from edgeagent.service.notify import Notifier, watchdog_timeout
from edgeagent.service.reload import ReloadPlan
from edgeagent.service.watchdog import InferenceClock, Watchdog

log = logging.getLogger(__name__)

ConfigLoader = Callable[[], AgentConfig]


class ServedModels(InferenceClock, Protocol):
    """The model manager, as the service sees it (the watchdog's clock, the status line)."""

    def status(self) -> list[dict[str, Any]]: ...


class Agent(Protocol):
    """What the service drives: the composition root (``edgeagent.app.Agent``)."""

    config: AgentConfig

    @property
    def manager(self) -> ServedModels: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def reload(self, config: AgentConfig) -> ReloadPlan: ...


T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop, as :func:`asyncio.run` does.

    The loop is uvloop's (a core dependency everywhere but Windows): its transports and
    callbacks cost the API's event loop, which bounds throughput for small models, markedly
    less CPU per request than asyncio's own.
    """
    if sys.platform == "win32":
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Service:
    """Runs one agent for the life of the process; see the module docstring."""

    def __init__(self, agent: Agent, notifier: Notifier, load_config: ConfigLoader,
                 on_config: Callable[[AgentConfig], None] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        """
        Args:
            agent: The composition root to start and stop.
            notifier: systemd's notify socket (a no-op outside systemd).
            load_config: Reads and validates the configuration again (on SIGHUP).
            on_config: Called with the configuration in force after a reload (logging).
            env: The process environment (``WATCHDOG_USEC``, ``WATCHDOG_PID``).
        """
        self.agent = agent
        self.notifier = notifier
        self._load_config = load_config
        self._on_config = on_config or (lambda _config: None)
        self._env = dict(env or {})
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.watchdog: Watchdog | None = None

    # ---- signals ----------------------------------------------------------------------

    def request_stop(self, why: str = "stop requested") -> None:
        """Begin a graceful stop (what SIGTERM and SIGINT do)."""
        if self._stop.is_set():
            log.info("%s: already stopping, waiting for requests in flight", why)
            return
        log.info("%s: stopping", why)
        self._stop.set()

    def request_reload(self) -> None:
        """Reload the configuration when the agent is next idle (what SIGHUP does)."""
        self._reload.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    @staticmethod
    def _remove_signals(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    # ---- life -------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until stopped (reloading on request), stop. Returns on a clean stop.

        Raises:
            EdgeAgentError: the agent could not start (port in use, bad token file...).
        """
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        try:
            if await self._start():
                self.notifier.ready(self._serving_status())
                timeout = watchdog_timeout(self._env, os.getpid())
                if self.notifier.enabled and timeout:
                    self.watchdog = Watchdog(self.notifier, self.agent.manager, timeout)
                    self.watchdog.start()
                await self._serve()
        finally:
            grace = self.agent.config.agent.shutdown_grace_s
            self.notifier.stopping(f"stopping: draining requests (up to {grace:g} s)")
            if self.watchdog is not None:
                await self.watchdog.stop()
            try:
                await self.agent.stop()
            finally:
                self._remove_signals(loop)
                self.notifier.close()

    async def _start(self) -> bool:
        """Start the agent unless a stop comes first; False when stopped during start-up."""
        config = self.agent.config
        self.notifier.status(f"starting: loading {len(config.models) or 'the demo'} model(s), "
                             f"then HTTP on {config.http.listen}")
        start = asyncio.ensure_future(self.agent.start())
        try:
            await _first(self._stop, _done_event(start))
        except BaseException:
            start.cancel()
            raise
        if not start.done():
            # A model load can take minutes (TensorRT engine build): do not hold up a stop.
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            return False
        try:
            start.result()
        except Exception as exc:
            self.notifier.status(f"failed to start: {exc}")
            raise
        return True

    async def _serve(self) -> None:
        while True:
            await _first(self._stop, self._reload)
            if self._stop.is_set():
                return
            self._reload.clear()
            await self.reload()

    async def reload(self) -> None:
        """Read the configuration again and apply what can change live."""
        self.notifier.reloading()
        log.info("reloading the configuration")
        try:
            config = self._load_config()
        except ConfigError as exc:
            log.error("configuration not reloaded, still running on the previous one: %s", exc)
            self.notifier.ready(f"{self._serving_status()}; reload failed, running on the "
                                f"previous configuration: {exc}")
            return
        plan = await self.agent.reload(config)
        self._on_config(plan.config)
        if plan.restart_keys:
            log.warning("changed in the configuration but applied only on restart "
                        "(systemctl restart edgeagent): %s", ", ".join(plan.restart_keys))
        log.info("configuration reloaded: %s", plan.summary())
        status = self._serving_status()
        if plan.restart_keys:
            status += f"; restart to apply: {', '.join(plan.restart_keys)}"
        self.notifier.ready(status)

    def _serving_status(self) -> str:
        models = self.agent.manager.status()
        ready = [m["name"] for m in models if m["state"] == "ready"]
        status = f"serving {len(ready)}/{len(models)} model(s) on {self.agent.config.http.listen}"
        failed = [m["name"] for m in models if m["state"] != "ready"]
        if failed:
            status += f"; not serving: {', '.join(failed)}"
        return status


def _done_event(task: asyncio.Future[None]) -> asyncio.Event:
    event = asyncio.Event()
    task.add_done_callback(lambda _t: event.set())
    return event
