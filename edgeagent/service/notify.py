"""The systemd notify protocol (sd_notify), written against ``NOTIFY_SOCKET`` directly.

A datagram of ``KEY=VALUE`` lines sent to the socket systemd names in ``NOTIFY_SOCKET``: a path
socket (``/run/systemd/notify``) or an abstract one (``@name``). Outside systemd the variable is
absent and every call does nothing, so the daemon code never asks whether it runs under systemd.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of '@' (unix(7)).
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not used for services on a box


class Notifier:
    """Sends state changes to systemd; a no-op when ``NOTIFY_SOCKET`` is unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        raw = env.get("NOTIFY_SOCKET", "")
        self._raw = raw
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%s is not a socket path or @abstract name; "
                        "not notifying systemd", raw)
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was given (the process runs under systemd's Type=notify)."""
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; True when it was sent.

        A failure is logged once and never raised: losing a status line must not stop the agent
        (systemd's watchdog will notice if pings keep failing).
        """
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd on %s: %s", self._raw, exc.strerror or exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """A one-line description of what the agent is doing (``systemctl status``)."""
        return self.send(f"STATUS={status}")

    def reloading(self, status: str = "reloading the configuration") -> bool:
        """A reload started; ``MONOTONIC_USEC`` as Type=notify-reload requires."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> bool:
        """Shutdown started."""
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_timeout(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout systemd asks this process to honour, in seconds; None if none.

    ``WATCHDOG_USEC`` is the timeout; ``WATCHDOG_PID``, when set, names the process it is meant
    for (a child that inherited the environment must not ping for its parent).
    """
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    target = env.get("WATCHDOG_PID", "")
    if target and (not target.isdigit() or int(target) != pid):
        return None
    if not raw.isdigit() or int(raw) == 0:
        log.warning("ignoring WATCHDOG_USEC=%r: expected a positive number of microseconds", raw)
        return None
    return int(raw) / 1_000_000
