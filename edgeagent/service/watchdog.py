"""The systemd watchdog: pings only while the agent is healthy, so systemd restarts a stuck one.

The ping is sent by a task on the event loop, so a blocked loop stops the pings by itself; before
each ping a health check asks the model manager how long its oldest running inference has been
running, so a wedged inference worker stops them too. Pings go out at half the timeout, as
sd_watchdog_enabled(3) recommends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from edgeagent.service.notify import Notifier

log = logging.getLogger(__name__)

#: An inference running longer than this (or twice the watchdog timeout, if larger) is stuck.
MIN_STUCK_S = 30.0


class InferenceClock(Protocol):
    """What the watchdog needs of the model manager."""

    def oldest_running_s(self) -> float:
        """Age in seconds of the longest-running inference, 0 when idle."""
        ...


def stuck_threshold(timeout_s: float) -> float:
    """How long one inference may run before the agent counts as stuck."""
    return max(MIN_STUCK_S, 2 * timeout_s)


class Watchdog:
    """Pings systemd every ``timeout_s / 2`` while :meth:`check` finds the agent healthy."""

    def __init__(self, notifier: Notifier, clock: InferenceClock, timeout_s: float,
                 stuck_after_s: float | None = None) -> None:
        self._notifier = notifier
        self._clock = clock
        self.timeout_s = timeout_s
        self.interval_s = timeout_s / 2
        self.stuck_after_s = stuck_threshold(timeout_s) if stuck_after_s is None else stuck_after_s
        self._unhealthy = ""
        self._task: asyncio.Task[None] | None = None

    def check(self) -> str:
        """Why the agent is unhealthy, or ``""`` when it is healthy."""
        age = self._clock.oldest_running_s()
        if age >= self.stuck_after_s:
            return (f"an inference has been running for {age:.0f} s "
                    f"(limit {self.stuck_after_s:.0f} s): inference worker stuck")
        return ""

    def tick(self) -> bool:
        """One round: ping if healthy, else report (once per episode); True when pinged."""
        problem = self.check()
        if problem:
            if not self._unhealthy:  # report the transition, not every round
                log.error("withholding watchdog pings, systemd will restart the agent: %s", problem)
                self._notifier.status(f"unhealthy: {problem}")
            self._unhealthy = problem
            return False
        if self._unhealthy:
            log.warning("healthy again; watchdog pings resume")
            self._notifier.status("serving")
            self._unhealthy = ""
        return self._notifier.watchdog()

    async def _run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Start pinging from a task on the running loop."""
        if self._task is None:
            log.info("systemd watchdog: timeout %.1f s, pinging every %.1f s, inference stuck "
                     "after %.0f s", self.timeout_s, self.interval_s, self.stuck_after_s)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="watchdog")

    async def stop(self) -> None:
        """Stop pinging (shutdown: systemd's stop timeout takes over)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
