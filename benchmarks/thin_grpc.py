"""The thinnest honest gRPC client, for the benchmark's gRPC rows (as ``ThinConnection`` is for
its HTTP rows): one HTTP/2 connection with prior knowledge, one unary call at a time, the
request's frames encoded once (only the stream id changes; the header block names the
headers by index after the first call, as gRPC clients' HPACK does), the answer's frames parsed
for flow control and the call's status, every header block decoded with ``hpack`` (so any server's
answers are read right, not only the agent's).

It sends what grpcio's client sends for a unary call (``:method POST``, ``:scheme http``,
``:path``, ``:authority``, ``content-type: application/grpc``, ``te: trailers``, the message
with its 5-byte prefix) and costs a fraction of grpcio's client CPU per call (measured here:
~40 us for the MLP against ~200 us for grpcio's Python client), which on a 2-core box is CPU
taken from the server being measured.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from hpack import Decoder, Encoder

from benchmarks.thin import ThinClient

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20
BIG_WINDOW = 2**31 - 1


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((ftype, flags))
            + stream_id.to_bytes(4, "big") + payload)


class ThinGrpcConnection(ThinClient):
    """A unary gRPC method called over one connection; :meth:`send` then :meth:`receive` until
    it says the answer is complete (or :meth:`call`). The last answer's message is kept in
    :attr:`answer`."""

    def __init__(self, connect: Callable[[], socket.socket], path: str, message: bytes,
                 authority: str = "edgeagent") -> None:
        self.sock = connect()
        if self.sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # As gRPC clients do: the first call's headers go into the server's dynamic table, later
        # calls name them by index (a few bytes per call, the same bytes every time).
        encoder = Encoder()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", authority), ("content-type", "application/grpc"),
                   ("te", "trailers")]
        self.first_block = encoder.encode(headers)
        self.block = encoder.encode(headers)
        self.framed = b"\x00" + len(message).to_bytes(4, "big") + message
        self.decoder = Decoder()
        self.sent_at = 0.0
        self.answer = b""
        self.stream_id = -1
        self.send_window = 65535  # the connection's, as the server gives it
        self.initial_window = 65535  # each new stream's
        self.max_frame = 16384
        self.received = 0
        self._buf = bytearray()
        self._body = bytearray()
        self._done = False
        self._settings = False
        self._chunks: list[memoryview] = []
        self._chunks_for = 0
        # Windows this side never has to re-open during a benchmark run (2 GiB).
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, (4).to_bytes(2, "big")
                                          + BIG_WINDOW.to_bytes(4, "big"))
                          + frame(WINDOW_UPDATE, 0, 0, (BIG_WINDOW - 65535).to_bytes(4, "big")))
        while not self._settings:
            self._read()

    def send(self) -> None:
        sid = self.stream_id = self.stream_id + 2
        self._body.clear()
        self._done = False
        while self.send_window < len(self.framed):  # wait for the server's WINDOW_UPDATE
            self._read()
        if len(self.framed) > self.initial_window:
            raise SystemExit("the message is larger than the server's stream window")
        if self._chunks_for != self.max_frame:
            view = memoryview(self.framed)
            self._chunks = [view[i:i + self.max_frame]
                            for i in range(0, len(view), self.max_frame)]
            self._chunks_for = self.max_frame
        sid_bytes = sid.to_bytes(4, "big")
        block = self.first_block if sid == 1 else self.block
        parts: list[bytes | memoryview] = [
            len(block).to_bytes(3, "big") + bytes((HEADERS, END_HEADERS)) + sid_bytes, block]
        for i, chunk in enumerate(self._chunks):
            flags = END_STREAM if i == len(self._chunks) - 1 else 0
            parts += (len(chunk).to_bytes(3, "big") + bytes((DATA, flags)) + sid_bytes, chunk)
        self.send_window -= len(self.framed)
        self.sent_at = time.perf_counter()
        # Scatter-gather: the message is not copied per call.
        sent = self.sock.sendmsg(parts)
        total = sum(len(p) for p in parts)
        if sent < total:
            self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])

    def receive(self) -> bool:
        """Read what the socket has; whether the call's answer is complete."""
        self._read()
        return self._done

    def _read(self) -> None:
        more = self.sock.recv(1 << 20)
        if not more:
            raise SystemExit("the gRPC server closed the connection")
        buf = self._buf
        buf += more
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos - 9 < length:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & BIG_WINDOW
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self._frame(ftype, flags, sid, payload)
        del buf[:pos]

    def _frame(  # noqa: PLR0912 - one branch per frame type
        self, ftype: int, flags: int, sid: int, payload: bytes
    ) -> None:
        if ftype == DATA:
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if sid == self.stream_id:
                self._body += payload
        elif ftype == HEADERS:
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & PRIORITY:
                payload = payload[5:]
            headers = dict(self.decoder.decode(payload, raw=True))
            if flags & END_STREAM and sid == self.stream_id:
                self._end(headers)
        elif ftype == SETTINGS and not flags & ACK:
            for i in range(0, len(payload), 6):
                key = int.from_bytes(payload[i:i + 2], "big")
                value = int.from_bytes(payload[i + 2:i + 6], "big")
                if key == 4:
                    self.initial_window = value
                elif key == 5:
                    self.max_frame = value
            self._settings = True
            self.sock.sendall(frame(SETTINGS, ACK, 0))
        elif ftype == WINDOW_UPDATE and sid == 0:
            self.send_window += int.from_bytes(payload, "big") & BIG_WINDOW
        elif ftype == PING and not flags & ACK:
            self.sock.sendall(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM and sid == self.stream_id and not self._done:
            raise SystemExit(f"the server reset the call: {int.from_bytes(payload, 'big')}")
        elif ftype == GOAWAY:
            raise SystemExit(f"the server sent GOAWAY: {payload[8:]!r}")

    def _end(self, trailers: dict[bytes, bytes]) -> None:
        status = trailers.get(b"grpc-status")
        if status != b"0":
            raise SystemExit(f"the call failed: grpc-status {status!r}, "
                             f"{trailers.get(b'grpc-message', b'')!r}")
        if len(self._body) < 5:
            raise SystemExit("the call answered OK without a message")
        self.answer = bytes(self._body[5:])
        self._done = True
