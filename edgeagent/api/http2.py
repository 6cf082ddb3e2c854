"""gRPC's HTTP/2 transport, server side, on an asyncio protocol (cleartext h2c with prior
knowledge: what every gRPC client speaks to an ``insecure`` channel).

Why the agent has its own (docs/decisions.md, "gRPC on the agent's own HTTP/2"): grpcio's
Python server tops out below the agent's HTTP path on the same box (a servicer that answers
``ModelInfer`` with a prepared message and does nothing else: 2,102 calls/s at concurrency 1,
4,975 at 4, against 3,151 and 5,979 for the HTTP path running the model for real), and its
core costs 15 MiB of resident code; the pure-Python ``h2`` state machine was measured at
3,401 and 5,684 on the same prepared answer. This module does what a gRPC server needs of
HTTP/2 (RFC 9113) and nothing else, on one event loop thread, with header blocks decoded by
``hpack`` (the HPACK library of the ``h2`` project):

- frames of every type parsed and checked (sizes, stream ids and states, flags, padding);
  a peer that breaks the protocol gets GOAWAY with the error and the connection is closed;
  a stream that breaks it gets RST_STREAM;
- requests checked as RFC 9113 8 has them (field names lowercase tokens; no CR, LF or NUL in
  values, whose edge whitespace is stripped; :method, :scheme and :path once each, before
  other fields, and no other pseudo-headers; no connection-specific fields; ``te`` only
  ``trailers``; DATA adding up to a content-length; no pseudo-headers in trailers): a
  malformed one is reset with PROTOCOL_ERROR before any method sees it;
- flow control both ways: the windows the peer gives are kept (DATA split to them and to its
  SETTINGS_MAX_FRAME_SIZE, the rest waits for WINDOW_UPDATE), the windows given to the peer
  are re-opened as data is taken (for a stream, as its messages are read);
- gRPC over it: length-prefixed messages (``identity``, ``gzip`` and ``deflate``), status
  and message in trailers (a trailers-only answer for an error before any message),
  ``grpc-timeout`` deadlines, metadata (``-bin`` keys base64-decoded);
- bounds: frame size, header list size, streams per connection, message size, connections,
  seconds for the preface and for a unary request to arrive; output that the peer does not
  read stops the reading of its input.

No server push, no priorities (PRIORITY is parsed, checked and ignored), no TLS (the listener is
loopback or a Unix socket; a remote one needs the token, as HTTP does).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.hpack import decode_integer, encode_integer

from edgeagent.errors import EdgeAgentError
from edgeagent.fsutil import unix_socket

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
_SELF_DEPENDENT = 0x100
"""Not a wire flag: marks a HEADERS frame whose priority names its own stream."""

# Error codes (section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

# Settings (section 6.5.2).
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535

#: What this server allows its peers (sent in its SETTINGS).
MAX_FRAME = 1 << 20
"""Largest frame accepted: a CNN frame (600 KB) arrives in one DATA frame when the client
sends frames that large."""
STREAM_WINDOW = 4 << 20
"""Bytes a client may send on a stream before the server re-opens the window."""
CONNECTION_WINDOW = 16 << 20
MAX_STREAMS = 128
"""Streams open at once on one connection (more are refused with REFUSED_STREAM)."""
MAX_HEADER_LIST = 16 << 10
"""Bytes of decoded headers a request may carry (gRPC's own default is 8 KiB)."""
MAX_HEADER_BLOCK = 64 << 10
"""Bytes of encoded header block (HEADERS and its CONTINUATIONs) accepted."""
MAX_CONTINUATIONS = 32
"""CONTINUATION frames one header block may take (64 KiB in 16 KiB frames is 4; more, empty
ones above all, is the "CONTINUATION flood" of 2024: loop time for a block that never ends)."""
MAX_DETAILS = 4096
"""Characters of an error's text sent in ``grpc-message``."""
MAX_SETTINGS = 32
"""Entries one SETTINGS frame may carry (a client sends a handful; a 1 MiB frame of them would
be ~175,000 for the loop to walk)."""
RESETS_KEPT = 256
"""Stream ids this side reset that a connection remembers (late DATA on them is dropped)."""
MAX_RESETS = 1000
RESET_WINDOW_S = 10.0
"""Calls a client may cancel (RST_STREAM on a call still running) per window on one connection;
more is the "rapid reset" attack (CVE-2023-44487: open, cancel, repeat, each costing the server
a call) and gets GOAWAY ENHANCE_YOUR_CALM."""
OUTPUT_HIGH_WATER = 8 << 20
"""Bytes queued to a peer that is not reading past which its input is no longer read."""

ACCEPT_ENCODING = b"identity,deflate,gzip"


class StatusCode(enum.IntEnum):
    """gRPC status codes (``grpc/status.h``)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """Ends a call with a status other than OK (raised by a method, or by :meth:`Call.abort`)."""

    def __init__(self, code: StatusCode, details: str = "") -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


Unary = Callable[[bytes, "Call"], Awaitable[bytes]]
"""A unary method: the request message's bytes and the call, to the response's bytes."""
Streaming = Callable[["Call"], Awaitable[None]]
"""A bidirectional streaming method: reads with :meth:`Call.read`, writes with
:meth:`Call.write`; returning ends the call with OK."""


@dataclass(frozen=True)
class Method:
    """One served method: ``unary`` or ``streaming`` (bidirectional) is set."""

    unary: Unary | None = None
    streaming: Streaming | None = None


# ---- HPACK, encoding side -----------------------------------------------------------------
# Responses use literal fields without indexing only: no dynamic table on this side, so the
# peer's SETTINGS_HEADER_TABLE_SIZE never matters and the constant blocks are made once.


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return (b"\x00" + encode_integer(len(name), 7) + name
            + encode_integer(len(value), 7) + value)


_STATUS_200 = b"\x88"  # indexed field 8 of the static table: ":status: 200"
_RESPONSE_HEADERS = (_STATUS_200 + _literal(b"content-type", b"application/grpc")
                     + _literal(b"grpc-accept-encoding", ACCEPT_ENCODING))
_OK_TRAILERS = _literal(b"grpc-status", b"0")

_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def _percent_encode(text: str) -> bytes:
    """``grpc-message``'s encoding: UTF-8, bytes outside printable ASCII (and ``%``) as %XX."""
    raw = text[:MAX_DETAILS].encode("utf-8", "replace")
    if all(b in _UNRESERVED for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _UNRESERVED else b"%%%02X" % b for b in raw)


def _status_block(code: StatusCode, details: str) -> bytes:
    block = _literal(b"grpc-status", str(int(code)).encode())
    if details:
        block += _literal(b"grpc-message", _percent_encode(details))
    return block


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((ftype, flags))
            + stream_id.to_bytes(4, "big") + payload)


_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_RESERVED = frozenset((b"content-type", b"te", b"grpc-timeout", b"grpc-encoding",
                       b"grpc-accept-encoding", b"host"))
#: Fields that HTTP/2 forbids (RFC 9113 8.2.2): a request carrying one is malformed.
_CONNECTION_FIELDS = frozenset((b"connection", b"proxy-connection", b"keep-alive",
                                b"transfer-encoding", b"upgrade"))
#: A field name as RFC 9113 8.2.1 allows it: a token (RFC 9110 5.1), in lowercase.
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\0\r\n]")


def parse_timeout(value: bytes) -> float:
    """``grpc-timeout`` (e.g. ``100m``) in seconds.

    Raises:
        ValueError: not of the form ``<1-8 digits><H|M|S|m|u|n>``.
    """
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        raise ValueError(f"bad grpc-timeout {value.decode('latin-1')!r}")
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


# ---- streams and calls ----------------------------------------------------------------


class Call:
    """One call as a method sees it: its metadata, and for a streaming method its messages."""

    __slots__ = ("_stream", "metadata")

    def __init__(self, stream: _Stream, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._stream = stream
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The request's custom metadata (names lower case; ``-bin`` values as bytes)."""
        return self.metadata

    async def abort(self, code: StatusCode, details: str) -> None:
        """End the call with ``code``; never returns."""
        raise RpcError(code, details)

    async def read(self) -> bytes | None:
        """The next request message of a streaming call; None once the client has sent all."""
        return await self._stream.read()

    async def write(self, message: bytes) -> None:
        """Send one response message of a streaming call (waits while the peer's window or the
        socket's buffer is full)."""
        await self._stream.write(message)


class _Stream:
    __slots__ = (
        "buffer",
        "call",
        "conn",
        "deadline",
        "done",
        "drained",
        "encoding",
        "expected",
        "headers_sent",
        "id",
        "inbox",
        "limit",
        "message",
        "method",
        "pending",
        "queued",
        "receiving",
        "recv_window",
        "send_window",
        "task",
        "timer",
        "trailers",
        "waiting",
    )

    def __init__(self, conn: GrpcConnection, stream_id: int, method: Method,
                 request: _Request) -> None:
        self.id = stream_id
        self.conn = conn
        self.method = method
        self.call = Call(self, request.metadata)
        self.encoding = request.encoding
        self.send_window = conn.peer_initial_window
        self.recv_window = STREAM_WINDOW
        self.queued = 0  # bytes (on the wire) of whole messages not read by the method yet
        self.buffer = bytearray()
        self.message: tuple[bytes, bool] | None = None
        """A unary call's one message, and whether it is compressed."""
        self.inbox: list[tuple[bytes, int, bool] | None] = []
        """A streaming call's messages, their size on the wire and whether compressed; None at
        the end."""
        self.waiting: asyncio.Future[None] | None = None
        self.receiving = True
        self.headers_sent = False
        self.pending = memoryview(b"")
        self.trailers: bytes | None = None
        self.drained: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = False
        self.done = False
        self.limit = conn.server.max_message_bytes
        self.expected = request.content_length
        """Bytes of DATA still due by the request's content-length (None: it declared none)."""

    # -- input --

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes of DATA: complete messages go to the method (copied once, out of the frame
        when a message is whole in it)."""
        buffer = self.buffer
        if buffer:
            buffer += data
            view = memoryview(buffer)
        else:
            view = data if isinstance(data, memoryview) else memoryview(data)
        pos, end = 0, len(view)
        try:
            while end - pos >= 5:
                flag = view[pos]
                length = int.from_bytes(view[pos + 1:pos + 5], "big")
                if flag > 1:
                    raise RpcError(StatusCode.INTERNAL,
                                   f"a message's compressed flag is {flag}; it must be 0 or 1")
                if length > self.limit:
                    raise RpcError(StatusCode.RESOURCE_EXHAUSTED,
                                   f"the request message is {length} bytes, more than the "
                                   f"{self.limit} allowed (http.max_request_bytes)")
                if end - pos - 5 < length:
                    break
                message = bytes(view[pos + 5:pos + 5 + length])
                pos += 5 + length
                if flag and self.encoding == b"identity":
                    raise RpcError(StatusCode.INTERNAL,
                                   "a compressed message on a call without grpc-encoding")
                self._deliver(message, 5 + length, bool(flag))
            rest = None if buffer else bytes(view[pos:])
        finally:
            if buffer:
                view.release()
        if buffer:
            del buffer[:pos]
        elif rest:
            buffer += rest

    async def inflate(self, data: bytes) -> bytes:
        """A compressed message, inflated in a worker thread (up to the message limit: a
        small message may inflate to it, which is not work for the event loop)."""
        return await self.conn.loop.run_in_executor(None, self._decompress, data)

    def _decompress(self, data: bytes) -> bytes:
        wbits = 31 if self.encoding == b"gzip" else 15
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, self.limit + 1)
        except zlib.error as exc:
            raise RpcError(StatusCode.INTERNAL,
                           f"the message is not valid {self.encoding.decode()} data: {exc}"
                           ) from None
        if len(out) > self.limit:
            raise RpcError(StatusCode.RESOURCE_EXHAUSTED,
                           f"the request message inflates to more than the {self.limit} bytes "
                           "allowed (http.max_request_bytes)")
        if not inflater.eof:
            raise RpcError(StatusCode.INTERNAL,
                           f"the message is truncated {self.encoding.decode()} data")
        return out

    def _deliver(self, message: bytes, wire: int, compressed: bool) -> None:
        if self.method.unary is not None:
            if self.message is not None:
                raise RpcError(StatusCode.INTERNAL, "a unary call sent more than one message")
            self.message = (message, compressed)
            return
        self.inbox.append((message, wire, compressed))
        self.queued += wire
        self._wake()

    def _wake(self) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(None)

    def end_of_input(self) -> None:
        """The client's END_STREAM."""
        self.receiving = False
        if self.buffer:
            raise RpcError(StatusCode.INTERNAL, "the request ends inside a message")
        if self.method.unary is not None:
            if self.message is None:
                raise RpcError(StatusCode.INTERNAL, "the request has no message")
            self.conn.start_unary(self)
        else:
            self.inbox.append(None)
            self._wake()

    async def read(self) -> bytes | None:
        while not self.inbox:
            if self.done:
                return None
            self.waiting = self.conn.loop.create_future()
            await self.waiting
            self.waiting = None
        entry = self.inbox.pop(0)
        if entry is None:
            return None
        message, wire, compressed = entry
        self.queued -= wire
        self.conn.reopen(self)
        return await self.inflate(message) if compressed else message

    # -- output --

    async def write(self, message: bytes) -> None:
        if self.done:
            raise asyncio.CancelledError
        self.conn.send_message(self, message)
        while self.pending and not self.done:
            self.drained = self.conn.loop.create_future()
            await self.drained
            self.drained = None
        while self.conn.paused and not self.done:
            await self.conn.writable()


# ---- the connection ---------------------------------------------------------------------


def _unpadded(view: memoryview) -> memoryview:
    if not view or view[0] >= len(view):
        raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
    return view[1:len(view) - view[0]]


def _check_size_updates(block: bytes) -> None:
    """At most two dynamic table size updates, at the start of a block (RFC 7541 4.2): hpack
    takes any number (~90 ms of the loop for 64 KiB of them).

    Raises:
        HPACKError: an update's integer is not one (hpack's own bound on its length).
    """
    view, pos = memoryview(block), 0
    for _ in range(2):
        if pos >= len(view) or view[pos] & 0xE0 != 0x20:
            return
        pos += decode_integer(view[pos:], 5)[1]
    if pos < len(view) and view[pos] & 0xE0 == 0x20:
        raise _ConnectionError(COMPRESSION_ERROR,
                               "more than two dynamic table size updates in a header block")


def _settings_payload(values: dict[int, int]) -> bytes:
    return b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in values.items())


_SERVER_PREFACE = (
    _frame(SETTINGS, 0, 0, _settings_payload({
        SETTINGS_MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SETTINGS_MAX_FRAME_SIZE: MAX_FRAME,
        SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        SETTINGS_ENABLE_PUSH: 0,
    }))
    + _frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big")))
_SETTINGS_ACK = _frame(SETTINGS, ACK, 0)


class _Request:
    """What a header block says (pseudo-headers, gRPC's own, and the custom metadata), and
    why it is malformed (RFC 9113 8.1.1: answered with RST_STREAM PROTOCOL_ERROR), if it is."""

    __slots__ = ("_scheme", "content_length", "content_type", "encoding", "malformed", "metadata",
                 "method", "path", "pseudo", "timeout")

    def __init__(self, headers: Iterable[Any]) -> None:
        self.method: bytes | None = None
        self.path: bytes | None = None
        self.content_type: bytes | None = None
        self.timeout: bytes | None = None
        self.content_length: int | None = None
        self.encoding = b"identity"
        self.malformed: str | None = None
        self.pseudo = False  # any pseudo-header (a trailer block must have none)
        self._scheme: bytes | None = None
        regular = False
        metadata: list[tuple[str, str | bytes]] = []
        for name, raw_value in headers:
            if _BAD_VALUE.search(raw_value) is not None:
                self._bad(f"the value of {name[:40]!r} has a CR, LF or NUL")
            # RFC 9113 8.2.1 calls edge whitespace malformed, but clients send it (perf_analyzer
            # puts the space after "-H name:" in front of the value); RFC 9110 5.5 strips it.
            value = raw_value.strip(b" \t")
            if name[:1] == b":":
                if regular:
                    self._bad(f"pseudo-header {name[:40]!r} after a regular field")
                self._pseudo_header(name, value)
            else:
                regular = True
                self._field(name, value, metadata)
        if self.pseudo and (self.method is None or self.path is None or self._scheme is None):
            self._bad("a request needs :method, :scheme and :path")
        self.metadata = tuple(metadata)

    def _pseudo_header(self, name: bytes, value: bytes) -> None:
        self.pseudo = True
        if name == b":method":
            if self.method is not None:
                self._bad("two :method fields")
            self.method = value
        elif name == b":path":
            if self.path is not None or not value:
                self._bad("two :path fields, or an empty one")
            self.path = value
        elif name == b":scheme":
            if self._scheme is not None:
                self._bad("two :scheme fields")
            self._scheme = value
        elif name != b":authority":
            self._bad(f"pseudo-header {name[:40]!r} is not one of a request's")

    def _field(self, name: bytes, value: bytes, metadata: list[tuple[str, str | bytes]]) -> None:
        if _FIELD_NAME.fullmatch(name) is None:
            self._bad(f"field name {name[:40]!r} is not a lowercase token")
        elif name in _CONNECTION_FIELDS or (name == b"te" and value != b"trailers"):
            self._bad(f"connection-specific field {name[:40]!r}")
        elif name == b"content-type":
            self.content_type = value
        elif name == b"content-length":
            if not value.isdigit() or len(value) > 19:
                self._bad("content-length is not a number")
            else:
                self.content_length = int(value)
        elif name == b"grpc-timeout":
            self.timeout = value
        elif name == b"grpc-encoding":
            self.encoding = value
        elif name not in _RESERVED:
            key = name.decode("latin-1")
            if key.endswith("-bin"):
                try:
                    metadata.append((key, base64.b64decode(value + b"==")))
                except ValueError:
                    metadata.append((key, b""))
            else:
                metadata.append((key, value.decode("latin-1")))

    def _bad(self, why: str) -> None:
        if self.malformed is None:
            self.malformed = why


class GrpcConnection(asyncio.Protocol):
    """One client connection: frames in, calls dispatched to the server's methods."""

    def __init__(self, server: GrpcHttp2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.inbuf = bytearray()
        self.preface = False
        self.decoder = Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._seen: dict[bytes, _Request] = {}
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0
        self.continuing: tuple[int, int, bytearray, int] | None = None
        """The header block being received: its stream, first frame's flags, the bytes so far
        and how many CONTINUATION frames brought them."""
        self._reset_ids: dict[int, None] = {}
        """Streams this side reset lately (the newest :data:`RESETS_KEPT`, in order): DATA the
        client had in flight for them is dropped, where DATA on other closed streams is its
        error."""
        self.send_window = DEFAULT_WINDOW
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.recv_unacked = 0  # bytes received and not re-opened yet (of CONNECTION_WINDOW)
        self.going_away = False
        self.closed = False
        self.paused = False
        self._writable: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._resets = 0
        self._resets_since = self.loop.time()

    # -- transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, so no isinstance).
        self.transport = stream = cast("asyncio.Transport", transport)
        stream.set_write_buffer_limits(high=OUTPUT_HIGH_WATER)
        if not self.server.admit(self):
            self.closed = True
            stream.abort()
            return
        self._timer = self.loop.call_later(self.server.header_timeout_s, self._preface_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for stream in list(self.streams.values()):
            self._drop(stream)
        self.server.forget(self)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        # The peer is not reading what it asked for: stop reading what it sends.
        self.paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def writable(self) -> None:
        if self.paused and not self.closed:
            if self._writable is None or self._writable.done():
                self._writable = self.loop.create_future()
            await self._writable

    def _preface_late(self) -> None:
        self._timer = None
        if not self.preface and not self.closed:
            assert self.transport is not None
            self.closed = True
            self.transport.abort()

    def data_received(self, data: bytes) -> None:  # noqa: PLR0912 - the frame loop
        if self.closed:
            return
        buf = self.inbuf
        buf += data
        if not self.preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    self._bad_preface()
                return
            if buf[:len(PREFACE)] != PREFACE:
                self._bad_preface()
                return
            del buf[:len(PREFACE)]
            self.preface = True
            # Only now: a client that is not HTTP/2 gets nothing but the 400 of _bad_preface.
            self._write(_SERVER_PREFACE)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        pos, end = 0, len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= 9:
                length = int.from_bytes(view[pos:pos + 3], "big")
                if length > MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR,
                                           f"a frame of {length} bytes (at most {MAX_FRAME})")
                start = pos + 9
                if end - start < length:
                    break
                ftype, flags = view[pos + 3], view[pos + 4]
                stream_id = int.from_bytes(view[pos + 5:pos + 9], "big") & MAX_WINDOW
                pos = start + length
                if ftype == DATA:
                    self._data(flags, stream_id, view[start:pos])
                else:
                    self._control(ftype, flags, stream_id, bytes(view[start:pos]))
                if self.closed:
                    return
        except _ConnectionError as exc:
            self._fail(exc.code, str(exc))
            return
        finally:
            view.release()
        del buf[:pos]

    def _bad_preface(self) -> None:
        assert self.transport is not None
        self.closed = True
        # Likely an HTTP/1.1 client on the gRPC port: say so in a form it can read.
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n"
                             b"content-type: text/plain\r\ncontent-length: 38\r\n\r\n"
                             b"this port speaks gRPC (HTTP/2) only.\r\n")
        self.transport.close()

    def _fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY with the reason, then close."""
        if self.closed:
            return
        log.info("gRPC connection closed: %s", message)
        assert self.transport is not None
        self.transport.write(_frame(GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big")
                                    + code.to_bytes(4, "big") + message.encode()[:256]))
        self.closed = True
        self.transport.close()
        for stream in list(self.streams.values()):
            self._drop(stream)

    # -- frames --

    def _control(  # noqa: PLR0912 - one branch per frame type
        self, ftype: int, flags: int, stream_id: int, payload: bytes
    ) -> None:
        if self.continuing is not None and ftype != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        if ftype == HEADERS:
            self._headers_frame(flags, stream_id, payload)
        elif ftype == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif ftype == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif ftype == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif ftype == PING:
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "a PING frame is 8 bytes")
            if stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if not flags & ACK:
                assert self.transport is not None
                self.transport.write(_frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            if len(payload) != 4:
                raise _ConnectionError(FRAME_SIZE_ERROR, "a RST_STREAM frame is 4 bytes")
            if stream_id == 0 or stream_id > self.last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._count_reset()
                self._drop(stream)
        elif ftype == GOAWAY:
            if stream_id or len(payload) < 8:
                raise _ConnectionError(PROTOCOL_ERROR, "a malformed GOAWAY")
            self.going_away = True
            self._close_if_idle()
        elif ftype == PRIORITY:
            if stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(stream_id, FRAME_SIZE_ERROR)
            elif int.from_bytes(payload[:4], "big") & MAX_WINDOW == stream_id:
                self._stream_error(stream_id, PROTOCOL_ERROR)  # RFC 9113 5.3.1
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client may not push")
        # Frames of unknown types are ignored (section 4.1).

    def _count_reset(self) -> None:
        now = self.loop.time()
        if now - self._resets_since > RESET_WINDOW_S:
            self._resets_since, self._resets = now, 0
        self._resets += 1
        if self._resets > MAX_RESETS:
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"more than {MAX_RESETS} calls cancelled "
                                   f"by the client within {RESET_WINDOW_S:g} s")

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "a SETTINGS payload is 6-byte entries")
        if len(payload) > 6 * MAX_SETTINGS:
            raise _ConnectionError(ENHANCE_YOUR_CALM,
                                   f"a SETTINGS frame of more than {MAX_SETTINGS} entries")
        for i in range(0, len(payload), 6):
            self._setting(int.from_bytes(payload[i:i + 2], "big"),
                          int.from_bytes(payload[i + 2:i + 6], "big"))
        assert self.transport is not None
        self.transport.write(_SETTINGS_ACK)
        self._flush_all()

    def _setting(self, key: int, value: int) -> None:
        """One entry of the peer's SETTINGS (those that matter to a server; others ignored)."""
        if key == SETTINGS_ENABLE_PUSH and value > 1:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
        if key == SETTINGS_INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window over 2^31-1")
            delta = value - self.peer_initial_window
            self.peer_initial_window = value
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "a window over 2^31-1")
        elif key == SETTINGS_MAX_FRAME_SIZE:
            if not 16384 <= value <= 16777215:
                raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
            self.peer_max_frame = value

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "a WINDOW_UPDATE frame is 4 bytes")
        increment = int.from_bytes(payload, "big") & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "the connection window over 2^31-1")
            self._flush_all()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if increment == 0:
            self._reset_stream(stream, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset_stream(stream, FLOW_CONTROL_ERROR)
            return
        self._flush(stream)

    def _headers_frame(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on a stream a client cannot open")
        block = payload
        if flags & PADDED:
            if not block or block[0] >= len(block):
                raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
            block = block[1:len(block) - block[0]]
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if int.from_bytes(block[:4], "big") & MAX_WINDOW == stream_id:
                flags |= _SELF_DEPENDENT  # a stream error (RFC 9113 5.3.1), once decoded
            block = block[5:]
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM,
                                   f"a header block over {MAX_HEADER_BLOCK} bytes")
        if not flags & END_HEADERS:
            self.continuing = (stream_id, flags, bytearray(block), 0)
            return
        self._headers(stream_id, flags, block)

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuing is None or self.continuing[0] != stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        _, first_flags, block, frames = self.continuing
        block += payload
        self.continuing = (stream_id, first_flags, block, frames + 1)
        if frames + 1 > MAX_CONTINUATIONS:  # empty ones never reach the size bound
            raise _ConnectionError(ENHANCE_YOUR_CALM, f"a header block in more than "
                                   f"{MAX_CONTINUATIONS} CONTINUATION frames")
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM,
                                   f"a header block over {MAX_HEADER_BLOCK} bytes")
        if flags & END_HEADERS:
            self.continuing = None
            self._headers(stream_id, first_flags, bytes(block))

    def _decode(self, block: bytes) -> _Request:
        """A request's header block, decoded (HPACK state kept for the next block).

        A block made only of one-byte indexed fields (what a client sends once its headers
        are in the dynamic table: every call of a channel but the first) changes no HPACK
        state, so while no other block has come since, the same bytes mean the same headers:
        those are decoded once per connection.
        """
        request = self._seen.get(block)
        if request is not None:
            return request
        try:
            _check_size_updates(block)
            request = _Request(self.decoder.decode(block, raw=True))
        except OversizedHeaderListError:
            raise _ConnectionError(ENHANCE_YOUR_CALM,
                                   f"request headers over {MAX_HEADER_LIST} bytes") from None
        except HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        if block and min(block) > 0x80 and max(block) < 0xFF:
            if len(self._seen) < 16:
                self._seen[block] = request
        else:
            self._seen.clear()  # the dynamic table may have changed: indices mean new things
        return request

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        request = self._decode(block)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: they must end the stream
            if not flags & END_STREAM or not stream.receiving:
                raise _ConnectionError(PROTOCOL_ERROR, "a second header block mid-stream")
            if request.malformed or request.pseudo or flags & _SELF_DEPENDENT:
                self._reset_stream(stream, PROTOCOL_ERROR)
                return
            self._input_ended(stream)
            return
        if stream_id <= self.last_stream:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on a closed stream")
        self.last_stream = stream_id
        if self.going_away or len(self.streams) >= MAX_STREAMS:
            self._reset(stream_id, REFUSED_STREAM)
            return
        if request.malformed or not request.pseudo or flags & _SELF_DEPENDENT:
            # Malformed (RFC 9113 8.1.1), or a block of trailers on a stream never opened.
            log.debug("gRPC stream %d reset: %s", stream_id,
                      request.malformed or "no request pseudo-headers")
            self._reset(stream_id, PROTOCOL_ERROR)
            return
        if request.method != b"POST" or request.content_type is None \
                or not request.content_type.startswith(b"application/grpc"):
            # Not a gRPC request: an HTTP answer (405 / 415), as gRPC servers give.
            status = b"405" if request.method != b"POST" else b"415"
            self._write(_frame(HEADERS, END_HEADERS | END_STREAM, stream_id,
                               _literal(b":status", status)))
            if not flags & END_STREAM:
                self._reset(stream_id, NO_ERROR)
            return
        self._open(stream_id, flags, request)

    def _open(self, stream_id: int, flags: int, request: _Request) -> None:
        assert request.path is not None
        entry = self.server.methods.get(request.path)
        if entry is None:
            self._refuse(stream_id, flags, StatusCode.UNIMPLEMENTED,
                         f"method {request.path.decode('latin-1')} is not served")
            return
        if request.encoding not in (b"identity", b"gzip", b"deflate"):
            self._refuse(stream_id, flags, StatusCode.UNIMPLEMENTED,
                         f"grpc-encoding {request.encoding.decode('latin-1')} is not "
                         f"supported (only {ACCEPT_ENCODING.decode()})")
            return
        seconds = None
        if request.timeout is not None:
            try:
                seconds = parse_timeout(request.timeout)
            except ValueError as exc:
                self._refuse(stream_id, flags, StatusCode.INTERNAL, str(exc))
                return
        stream = _Stream(self, stream_id, entry, request)
        # A request in one HEADERS frame has ended its side already: no RST after the answer.
        stream.receiving = not flags & END_STREAM
        self.streams[stream_id] = stream
        if seconds is not None:
            stream.timer = self.loop.call_later(seconds, self._expire, stream)
            stream.deadline = True
        elif entry.unary is not None:
            stream.timer = self.loop.call_later(self.server.body_timeout_s, self._late, stream)
        if entry.streaming is not None:
            stream.task = self.loop.create_task(
                self._run(stream, functools.partial(entry.streaming, stream.call)))
        if flags & END_STREAM:
            self._input_ended(stream)

    def _refuse(self, stream_id: int, flags: int, code: StatusCode, details: str) -> None:
        """A call answered at its headers (trailers-only), no stream kept for it."""
        self._write(_frame(HEADERS, END_HEADERS | END_STREAM, stream_id,
                           _RESPONSE_HEADERS + _status_block(code, details)))
        if not flags & END_STREAM:
            self._reset(stream_id, NO_ERROR)  # the client need not send the rest

    def _data(self, flags: int, stream_id: int, view: memoryview) -> None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        if self.continuing is not None:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        size = len(view)
        self.recv_unacked += size
        if self.recv_unacked > CONNECTION_WINDOW:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "DATA past the connection's window")
        if self.recv_unacked >= CONNECTION_WINDOW // 2:
            self._write(_frame(WINDOW_UPDATE, 0, 0, self.recv_unacked.to_bytes(4, "big")))
            self.recv_unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or not stream.receiving:
            self._not_receiving(stream_id, stream)
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            self._reset_stream(stream, FLOW_CONTROL_ERROR)
            return
        data = _unpadded(view) if flags & PADDED else view
        if stream.expected is not None:  # RFC 9113 8.1.1: the DATA must add up to it
            stream.expected -= len(data)
            if stream.expected < 0:
                self._reset_stream(stream, PROTOCOL_ERROR)
                return
        try:
            stream.feed(data)
            self.reopen(stream)
            if flags & END_STREAM:
                self._input_ended(stream)
        except RpcError as exc:
            if flags & END_STREAM:
                stream.receiving = False  # its side is closed: no RST after the answer
            self._answer_error(stream, exc.code, exc.details)

    def _not_receiving(self, stream_id: int, stream: _Stream | None) -> None:
        """DATA on a stream that takes none (RFC 9113 6.1)."""
        if stream_id > self.last_stream:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
        if stream is not None:  # half-closed by the client: DATA after its END_STREAM
            self._reset_stream(stream, STREAM_CLOSED)
        elif stream_id not in self._reset_ids:  # closed after the client's END_STREAM
            self._reset(stream_id, STREAM_CLOSED)
        # A stream this side reset: what the client had in flight is dropped.

    def _input_ended(self, stream: _Stream) -> None:
        """The client ended its side (END_STREAM on HEADERS, DATA or trailers)."""
        if stream.expected:  # less DATA than its content-length (RFC 9113 8.1.1)
            self._reset_stream(stream, PROTOCOL_ERROR)
            return
        try:
            stream.end_of_input()
        except RpcError as exc:
            self._answer_error(stream, exc.code, exc.details)

    def reopen(self, stream: _Stream) -> None:
        """Re-open the stream's window for what it received that is not waiting to be read
        (padding, a message being assembled, messages read), once that is half the window: a
        streaming method that reads slowly holds its client to one window of unread messages,
        and a message larger than the window still arrives."""
        if not stream.receiving or stream.done:
            return
        free = STREAM_WINDOW - stream.recv_window - stream.queued
        if free >= STREAM_WINDOW // 2:
            self._write(_frame(WINDOW_UPDATE, 0, stream.id, free.to_bytes(4, "big")))
            stream.recv_window += free

    # -- calls --

    def start_unary(self, stream: _Stream) -> None:
        assert stream.method.unary is not None
        assert stream.message is not None
        if stream.timer is not None and not stream.deadline:
            stream.timer.cancel()  # the body timer: the body is in
            stream.timer = None
        message, compressed = stream.message
        stream.message = None
        stream.task = self.loop.create_task(self._run(stream, functools.partial(
            self._unary, stream, stream.method.unary, message, compressed)))

    @staticmethod
    async def _unary(stream: _Stream, method: Unary, message: bytes, compressed: bool) -> bytes:
        return await method(await stream.inflate(message) if compressed else message,
                            stream.call)

    async def _run(self, stream: _Stream, call: Callable[[], Awaitable[bytes | None]]) -> None:
        """A method's call (started here, so a task cancelled before its first step leaves no
        coroutine unawaited) to its end: a unary one's answer, or a stream's OK; its error's
        status otherwise (anything but :class:`RpcError` is a bug, logged, INTERNAL)."""
        try:
            answer = await call()
        except RpcError as exc:
            self._answer_error(stream, exc.code, exc.details)
            return
        except asyncio.CancelledError:
            return
        except Exception as exc:
            log.exception("gRPC call failed")
            self._answer_error(stream, StatusCode.INTERNAL,
                               f"internal error: {type(exc).__name__}: {exc}")
            return
        if answer is not None:
            self._answer(stream, answer)
        elif not stream.done:
            self._end(stream, _OK_TRAILERS)

    def _expire(self, stream: _Stream) -> None:
        stream.timer = None
        self._answer_error(stream, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    def _late(self, stream: _Stream) -> None:
        stream.timer = None
        if stream.receiving:
            self._answer_error(stream, StatusCode.DEADLINE_EXCEEDED,
                               "the request did not arrive in full within "
                               f"{self.server.body_timeout_s:g} s (http.body_timeout_s)")

    # -- output --

    def _write(self, data: bytes) -> None:
        if not self.closed:
            assert self.transport is not None
            self.transport.write(data)

    def _answer(self, stream: _Stream, message: bytes) -> None:
        """A unary call's answer: headers, the message, OK; in one write when the windows
        allow (the usual case)."""
        if stream.done:
            return
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        size = len(framed)
        sid = stream.id
        if size <= stream.send_window and size <= self.send_window \
                and size <= self.peer_max_frame:
            self.send_window -= size
            self._write(b"".join((
                _frame(HEADERS, END_HEADERS, sid, _RESPONSE_HEADERS),
                size.to_bytes(3, "big"), b"\x00\x00", sid.to_bytes(4, "big"), framed,
                _frame(HEADERS, END_HEADERS | END_STREAM, sid, _OK_TRAILERS))))
            self._finish(stream)
            return
        self.send_message(stream, message, framed)
        self._end(stream, _OK_TRAILERS)

    def send_message(self, stream: _Stream, message: bytes, framed: bytes | None = None) -> None:
        if stream.done:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self._write(_frame(HEADERS, END_HEADERS, stream.id, _RESPONSE_HEADERS))
        if framed is None:
            framed = b"\x00" + len(message).to_bytes(4, "big") + message
        if stream.pending:
            stream.pending = memoryview(bytes(stream.pending) + framed)
        else:
            stream.pending = memoryview(framed)
        self._flush(stream)

    def _end(self, stream: _Stream, trailers: bytes) -> None:
        """Trailers after what is pending (the call is over for its method)."""
        if stream.done:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self._write(_frame(HEADERS, END_HEADERS | END_STREAM, stream.id,
                               _RESPONSE_HEADERS + trailers))
            self._finish(stream)
            return
        stream.trailers = trailers
        self._flush(stream)

    def _answer_error(self, stream: _Stream, code: StatusCode, details: str) -> None:
        if stream.done:
            return
        stream.pending = memoryview(b"")  # an error replaces what was not sent yet
        self._end(stream, _status_block(code, details))

    def _flush(self, stream: _Stream) -> None:
        sid = stream.id
        while stream.pending and not stream.done:
            size = min(len(stream.pending), stream.send_window, self.send_window,
                       self.peer_max_frame)
            if size <= 0:
                return
            chunk = stream.pending[:size]
            stream.pending = stream.pending[size:]
            stream.send_window -= size
            self.send_window -= size
            self._write(_frame(DATA, 0, sid, bytes(chunk)))
        if stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)
        if stream.trailers is not None and not stream.pending and not stream.done:
            self._write(_frame(HEADERS, END_HEADERS | END_STREAM, sid, stream.trailers))
            self._finish(stream)

    def _flush_all(self) -> None:
        for stream in list(self.streams.values()):
            if self.send_window <= 0:
                return
            if stream.pending or stream.trailers is not None:
                self._flush(stream)

    def _finish(self, stream: _Stream) -> None:
        """This side's END_STREAM is sent: the stream is closed (the client is told to stop
        sending if it has not finished)."""
        if stream.receiving:
            stream.receiving = False
            self._reset(stream.id, NO_ERROR)
        self._drop(stream)

    def _stream_error(self, stream_id: int, code: int) -> None:
        """RST_STREAM with ``code``, and the stream (if open) dropped."""
        stream = self.streams.get(stream_id)
        if stream is None:
            self._reset(stream_id, code)
        else:
            self._reset_stream(stream, code)

    def _reset_stream(self, stream: _Stream, code: int) -> None:
        stream.receiving = False
        self._reset(stream.id, code)
        self._drop(stream)

    def _reset(self, stream_id: int, code: int) -> None:
        self._write(_frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))
        kept = self._reset_ids
        kept[stream_id] = None
        if len(kept) > RESETS_KEPT:
            del kept[next(iter(kept))]

    def _drop(self, stream: _Stream) -> None:
        if stream.done:
            return
        stream.done = True
        self.streams.pop(stream.id, None)
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.task is not None and not stream.task.done() \
                and stream.task is not asyncio.current_task():
            stream.task.cancel()
        stream._wake()
        if stream.drained is not None and not stream.drained.done():
            stream.drained.set_result(None)
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.going_away and not self.streams and not self.closed:
            assert self.transport is not None
            self.closed = True
            self.transport.close()

    # -- shutdown --

    def go_away(self) -> None:
        """No new streams (GOAWAY NO_ERROR); close once those open have ended."""
        if self.closed or self.going_away:
            return
        self.going_away = True
        self._write(_frame(GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big")
                           + NO_ERROR.to_bytes(4, "big")))
        self._close_if_idle()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()



class GrpcHttp2Server:
    """A listener serving ``methods`` (``/package.Service/Method`` paths, as bytes)."""

    def __init__(self, methods: dict[bytes, Method], *, max_message_bytes: int,
                 max_connections: int, header_timeout_s: float, body_timeout_s: float) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.connections: set[GrpcConnection] = set()
        self._server: asyncio.Server | None = None
        self._uds: Path | None = None
        self.refused = 0
        self._refused_logged = -60.0

    def parties(self) -> int:
        """Clients that may be sending: each connection, or each call open on it if more."""
        return sum(max(1, len(c.streams)) for c in self.connections)

    def admit(self, conn: GrpcConnection) -> bool:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            now = asyncio.get_running_loop().time()
            if now - self._refused_logged >= 60:
                self._refused_logged = now
                log.warning("gRPC: refusing connections: %d are open (http.max_connections, "
                            "below the open-file limit); %d refused so far",
                            len(self.connections), self.refused)
            return False
        self.connections.add(conn)
        return True

    def forget(self, conn: GrpcConnection) -> None:
        self.connections.discard(conn)

    async def start(self, listen: str) -> None:
        """Listen on ``HOST:PORT`` or ``unix:PATH``.

        Raises:
            EdgeAgentError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        try:
            if listen.startswith("unix:"):
                self._uds = Path(listen[5:])
                with unix_socket(self._uds):  # the owner and the agent's group only
                    self._server = await loop.create_unix_server(
                        lambda: GrpcConnection(self), str(self._uds))
            else:
                host, _, port = listen.rpartition(":")
                self._server = await loop.create_server(
                    lambda: GrpcConnection(self), host.strip("[]"), int(port))
        except OSError as exc:
            raise EdgeAgentError(f"cannot listen on {listen} for gRPC (in use, or not "
                                 f"permitted): {exc.strerror or exc}") from exc

    async def stop(self, grace_s: float) -> None:
        """Stop accepting connections and streams; those open get ``grace_s`` to end."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while any(c.streams for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        await self._server.wait_closed()
        self._server = None
        if self._uds is not None and self._uds.is_socket():
            self._uds.unlink()
