"""The HTTP/1.1 protocol the local API is served with: uvicorn's httptools one, with a bound on
how much a request head may take before it is complete.

httptools (llhttp, in C) parses markedly faster than h11, but neither it nor uvicorn's protocol
around it limits the request line and header block: a client that never ends its headers would
make the agent buffer them without end. This protocol counts the bytes received while a head is
incomplete and, past the bound, answers 431 and closes the connection. The bound is generous
(``http.max_header_bytes`` plus one socket read): complete heads over ``http.max_header_bytes``
get their 431 from :class:`~edgeagent.api.auth.RequestGuard`, with the protocol's error body;
this is the backstop that keeps memory bounded.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: What one read from a socket can hand over at most (asyncio's and uvloop's read size), so a
#: read holding the end of one head and the start of a body never trips the bound.
_READ_SIZE = 256 * 1024


def bounded_protocol(max_header_bytes: int) -> type[HttpToolsProtocol]:
    """``HttpToolsProtocol``, refusing request heads longer than ``max_header_bytes`` plus one
    socket read with 431 (the class to give ``uvicorn.Config(http=...)``)."""
    bound = max_header_bytes + _READ_SIZE
    body = json.dumps({"error": f"the request headers exceed http.max_header_bytes "
                                f"({max_header_bytes} bytes)"}).encode()
    refusal = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
               b"content-type: application/json\r\nconnection: close\r\n"
               b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True  # a connection starts with a request head
            self._head_bytes = 0

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > bound:
                    self.logger.warning("refused a request head of more than %d bytes", bound)
                    self.transport.write(refusal)
                    self.transport.close()
                    return
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True  # the next request on this connection starts with its head

    return BoundedHttpToolsProtocol
