"""The HTTP/1.1 protocol the local API is served with: uvicorn's httptools one, with a bound on
how much a request head may take, deadlines on request heads and bodies, an idle keep-alive
timeout, and a cap on open connections.

httptools (llhttp, in C) parses markedly faster than h11, but neither it nor uvicorn's protocol
around it limits the request line and header block: a client that never ends its headers would
make the agent buffer them without end. This protocol counts the bytes received while a head is
incomplete and, past the bound, answers 431 and closes the connection. The bound is generous
(``http.max_header_bytes`` plus one socket read): complete heads over ``http.max_header_bytes``
get their 431 from :class:`~edgeagent.api.auth.RequestGuard`, with the protocol's error body;
this is the backstop that keeps memory bounded.

Every wait on the client has a deadline (uvicorn has only the keep-alive one):

- a request head must arrive in full within ``http.header_timeout_s`` of its first byte (the
  first request's, of the connection's opening);
- its body within ``http.body_timeout_s`` of the end of the head;
- an idle keep-alive connection is closed after ``http.keepalive_timeout_s``.

Past a deadline the client gets 408 (when no response has started) and the connection is
closed. One timer per connection serves both deadlines and is re-armed lazily, so a request
costs a clock read and no timer calls.

Connections beyond ``http.max_connections`` are answered 503 at once and closed: the cap sits
below the process's open-file limit (lowered at start-up if it does not), so a flood of idle
connections never leaves the agent unable to open a model file, accept its admin socket, or
answer the clients already connected. Refusals and expiries are logged, at most one line per
:data:`NOTICE_INTERVAL_S` with the count since the last line.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from asyncio import TimerHandle, Transport
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgeagent.config import HttpSection

log = logging.getLogger(__name__)

#: What one read from a socket can hand over at most (asyncio's and uvloop's read size), so a
#: read holding the end of one head and the start of a body never trips the bound.
_READ_SIZE = 256 * 1024

#: Shortest interval between two log lines about refused or expired connections.
NOTICE_INTERVAL_S = 10.0

#: Seconds a refused connection stays half-open so the client can read its 503 (closing at
#: once, with its request unread, would reset the connection and lose the answer).
_REFUSAL_LINGER_S = 2.0


def _response(status: str, message: str, *extra: bytes) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\n".encode()
            + b"content-type: application/json\r\nconnection: close\r\n" + b"".join(extra)
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def connection_cap(configured: int, nofile: int | None = None) -> int:
    """The connection cap to apply: ``configured``, lowered to stay below the open-file limit
    (``nofile``, the soft ``RLIMIT_NOFILE`` by default) with room left for everything else the
    agent opens (model files, its sockets, the spool, the hub's connections)."""
    if nofile is None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
    reserve = max(64, nofile // 8)
    return max(1, min(configured, nofile - reserve))


class _Notices:
    """Counts events and logs them at most once per :data:`NOTICE_INTERVAL_S`."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.count = 0
        self.last = 0.0

    def note(self, *args: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= NOTICE_INTERVAL_S:
            log.warning(self.text, self.count, *args)
            self.count, self.last = 0, now


@dataclass(frozen=True)
class Deadlines:
    """What the protocol enforces (from ``[http]``)."""

    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 5.0
    max_connections: int = 4096

    @classmethod
    def from_section(cls, http: HttpSection) -> Deadlines:
        return cls(http.max_header_bytes, http.header_timeout_s, http.body_timeout_s,
                   http.keepalive_timeout_s, http.max_connections)


def bounded_protocol(limits: Deadlines | HttpSection | int) -> type[HttpToolsProtocol]:
    """``HttpToolsProtocol`` with the bounds and deadlines of ``limits`` (the class to give
    ``uvicorn.Config(http=...)``); an ``int`` is ``max_header_bytes`` with default deadlines."""
    if isinstance(limits, int):
        limits = Deadlines(max_header_bytes=limits)
    elif isinstance(limits, HttpSection):
        limits = Deadlines.from_section(limits)
    d = limits
    bound = d.max_header_bytes + _READ_SIZE
    cap = connection_cap(d.max_connections)
    if cap < d.max_connections:
        log.warning("http.max_connections lowered from %d to %d to stay below the open-file "
                    "limit (raise LimitNOFILE, or ulimit -n, to allow more)",
                    d.max_connections, cap)
    too_large = _response("431 Request Header Fields Too Large",
                          f"the request headers exceed http.max_header_bytes "
                          f"({d.max_header_bytes} bytes)")
    head_late = _response("408 Request Timeout", f"the request head did not arrive within "
                          f"http.header_timeout_s ({d.header_timeout_s:g} s)")
    body_late = _response("408 Request Timeout", f"the request body did not arrive within "
                          f"http.body_timeout_s ({d.body_timeout_s:g} s)")
    full = _response("503 Service Unavailable",
                     f"too many open connections (http.max_connections is {cap}); retry later",
                     b"retry-after: 1\r\n")
    refused = _Notices(f"refused %d connection(s) in the last {NOTICE_INTERVAL_S:g} s or so: "
                       f"{cap} are open (http.max_connections, below the open-file limit)")
    expired = _Notices("closed %d connection(s) whose request %s did not arrive in time "
                       "(http.header_timeout_s / body_timeout_s)")

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = d.keepalive_timeout_s  # type: ignore[assignment]
            self._in_head = True  # a connection starts with a request head
            self._head_bytes = 0
            self._refused = False
            self._deadline: float | None = None
            self._late: bytes = head_late
            self._timer: TimerHandle | None = None

        # ---- the connection cap ----------------------------------------------------------

        def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > cap:
                self._refused = True
                refused.note()
                transport.write(full)
                if len(self.connections) > cap + 32 or not transport.can_write_eof():
                    transport.close()  # a flood: free the descriptor at once
                    return
                transport.write_eof()  # the client reads the 503, then its EOF
                self.loop.call_later(_REFUSAL_LINGER_S, transport.close)
                return
            self._set_deadline(d.header_timeout_s, head_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

        # ---- deadlines -----------------------------------------------------------------

        def _set_deadline(self, seconds: float, late: bytes) -> None:
            self._deadline, self._late = self.loop.time() + seconds, late
            if self._timer is None:
                self._timer = self.loop.call_at(self._deadline, self._check_deadline)

        def _check_deadline(self) -> None:
            self._timer = None
            deadline = self._deadline
            if deadline is None or self.transport.is_closing():
                return
            if self.loop.time() < deadline:  # moved on since the timer was armed
                self._timer = self.loop.call_at(deadline, self._check_deadline)
                return
            self._deadline = None
            expired.note("head" if self._late is head_late else "body")
            cycle = self.cycle
            if cycle is None or not cycle.response_started:
                self.transport.write(self._late)
            self.transport.close()

        # ---- parsing -------------------------------------------------------------------

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # the 503 is on its way; what the client sent is not read
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > bound:
                    self.logger.warning("refused a request head of more than %d bytes", bound)
                    self.transport.write(too_large)
                    self.transport.close()
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:  # the first head's deadline runs from the opening
                self._set_deadline(d.header_timeout_s, head_late)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            self._set_deadline(d.body_timeout_s, body_late)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._deadline = None  # the app has the whole request: no deadline on the client
            super().on_message_complete()
            self._in_head = True  # the next request on this connection starts with its head

    return BoundedHttpToolsProtocol
