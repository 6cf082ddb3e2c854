"""The gRPC transport (:mod:`edgeagent.api.http2`) under hostile and unusual HTTP/2 input.

A raw HTTP/2 client on a loopback socket drives the agent from outside: frames are built by
hand (the 9-byte header and the payload), header blocks are encoded and decoded with
``hpack``. Each test checks what comes back (frame types, error codes, ``grpc-status`` and
``grpc-message``), and the ``raw`` fixture checks afterwards that the agent still answers a
fresh grpcio ``ServerLive``.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import socket
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import grpc
import httpx
import numpy as np
import pytest
from hpack import Decoder, Encoder
from tritonclient.grpc import service_pb2, service_pb2_grpc

from edgeagent.api import http2
from edgeagent.api.http2 import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    STREAM_CLOSED,
    WINDOW_UPDATE,
)
from tests.api.conftest import AgentThread, make_config

TIMEOUT = 10.0
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
LIMIT = 8 << 20  # http.max_request_bytes: more than a stream's window (http2.STREAM_WINDOW)
X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
REQUEST = service_pb2.ModelInferRequest(
    model_name="mlp", raw_input_contents=[X.tobytes()],
    inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                           shape=[1, 64])],
).SerializeToString()


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: length (3 bytes), type, flags, stream id (4 bytes), payload."""
    return (len(payload).to_bytes(3, "big") + bytes((ftype, flags))
            + stream_id.to_bytes(4, "big") + payload)


def message(payload: bytes, flag: int = 0, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message (``length`` overrides the declared length)."""
    declared = len(payload) if length is None else length
    return bytes((flag,)) + declared.to_bytes(4, "big") + payload


def metadata(running: AgentThread) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {running.token}")]


def assert_serves(running: AgentThread) -> None:
    """A fresh grpcio connection gets an answer to ``ServerLive``."""
    with grpc.insecure_channel(running.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=metadata(running),
                               timeout=TIMEOUT).live


@dataclass
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)  # a HEADERS frame's, decoded


@dataclass
class Answer:
    """What came back on one stream: its header blocks, its DATA, a RST_STREAM's code."""

    blocks: list[dict[str, str]]
    data: bytes
    reset: int | None = None

    @property
    def status(self) -> int:
        return int(self.blocks[-1]["grpc-status"])

    @property
    def details(self) -> str:
        return unquote(self.blocks[-1].get("grpc-message", ""))

    def messages(self) -> list[bytes]:
        out, pos = [], 0
        while pos < len(self.data):
            assert self.data[pos] == 0, "the server never compresses"
            length = int.from_bytes(self.data[pos + 1:pos + 5], "big")
            out.append(self.data[pos + 5:pos + 5 + length])
            pos += 5 + length
        assert pos == len(self.data)
        return out


class Raw:
    """A hand-driven HTTP/2 client connection to the agent's gRPC port."""

    def __init__(self, running: AgentThread, *, preface: bool = True,
                 settings: dict[int, int] | None = None) -> None:
        host, _, port = running.grpc_url.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        self.token = running.token
        self.encoder, self.decoder = Encoder(), Decoder()
        self.buf = bytearray()
        self.log: list[Frame] = []  # every frame read
        if preface:
            entries = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big")
                               for k, v in (settings or {}).items())
            self.send(PREFACE + frame(SETTINGS, 0, 0, entries))

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, *data: bytes) -> None:
        # The server may close (and reset) before it has read all of a hostile input.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(b"".join(data))

    def headers(self, stream_id: int, flags: int = END_HEADERS, *, path: str = INFER,
                method: str = "POST", content_type: str = "application/grpc",
                extra: tuple[tuple[str, str], ...] = (),
                fields: list[tuple[str, str]] | None = None) -> bytes:
        """A HEADERS frame of a gRPC request with the token (encoded now: send it next);
        ``fields`` in place of the usual ones (and ``extra`` after them)."""
        if fields is None:
            fields = self.fields(method=method, path=path, content_type=content_type)
        return frame(HEADERS, flags, stream_id, self.encoder.encode([*fields, *extra]))

    def fields(self, *, method: str = "POST", path: str = INFER,
               content_type: str = "application/grpc") -> list[tuple[str, str]]:
        """The fields of a gRPC request, as grpcio sends them, with the token."""
        return [(":method", method), (":scheme", "http"), (":path", path),
                (":authority", "127.0.0.1"), ("content-type", content_type),
                ("te", "trailers"), ("authorization", f"Bearer {self.token}")]

    def recv(self) -> bytes:
        try:
            return self.sock.recv(1 << 16)
        except ConnectionResetError:
            return b""

    def read(self) -> Frame | None:
        """The next frame; None once the server has closed the connection."""
        while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
            chunk = self.recv()
            if not chunk:
                assert not self.buf, f"the connection closed inside a frame: {self.buf!r}"
                return None
            self.buf += chunk
        length = int.from_bytes(self.buf[:3], "big")
        got = Frame(self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big"),
                    bytes(self.buf[9:9 + length]))
        del self.buf[:9 + length]
        if got.type == HEADERS:
            assert got.flags & END_HEADERS, "the server's header blocks fit in one frame"
            got.headers = {k.decode(): v.decode()
                           for k, v in self.decoder.decode(got.payload, raw=True)}
        self.log.append(got)
        return got

    def rest(self) -> bytes:
        """Every byte until the server closes the connection."""
        out = bytes(self.buf)
        while chunk := self.recv():
            out += chunk
        return out

    def answer(self, stream_id: int) -> Answer:
        """Frames of ``stream_id`` until its END_STREAM or RST_STREAM (others are skipped)."""
        blocks: list[dict[str, str]] = []
        data = bytearray()
        while (got := self.read()) is not None:
            if got.stream != stream_id:
                continue
            if got.type == HEADERS:
                blocks.append(got.headers)
                if got.flags & END_STREAM:
                    return Answer(blocks, bytes(data))
            elif got.type == DATA:
                data += got.payload
            elif got.type == RST_STREAM:
                return Answer(blocks, bytes(data), int.from_bytes(got.payload, "big"))
        raise AssertionError(f"the connection closed before stream {stream_id} ended")

    def call(self, stream_id: int, body: bytes = message(REQUEST), **headers: Any) -> Answer:
        """A unary call: HEADERS, one DATA frame with END_STREAM, the answer."""
        self.send(self.headers(stream_id, **headers), frame(DATA, END_STREAM, stream_id, body))
        return self.answer(stream_id)

    def goaway(self) -> tuple[int, bytes]:
        """The GOAWAY's error code and debug data (the connection must close after it)."""
        while (got := self.read()) is not None:
            if got.type == GOAWAY:
                assert got.stream == 0
                assert self.read() is None, "frames after GOAWAY"
                return int.from_bytes(got.payload[4:8], "big"), got.payload[8:]
        raise AssertionError("the connection closed without GOAWAY")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    """This module's agent, in place of conftest's (one agent runs at a time: stopping one
    checks that no agent threads are left): a 0.5 s preface timeout, and messages of up to
    :data:`LIMIT` bytes."""
    config = make_config(tmp_path_factory.mktemp("agent"), header_timeout_s=0.5,
                         max_request_bytes=LIMIT, max_tensor_elements=2_000_000)
    with AgentThread(config).start() as running:
        yield running


@pytest.fixture(scope="module")
def expected(agent: AgentThread) -> bytes:
    """The mlp's answer to :data:`REQUEST`, as grpcio's own client gets it."""
    with grpc.insecure_channel(agent.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(service_pb2.ModelInferRequest.FromString(REQUEST),
                                   metadata=metadata(agent), timeout=TIMEOUT)
    return bytes(response.raw_output_contents[0])




@pytest.fixture
def raw(agent: AgentThread) -> Iterator[Raw]:
    """A raw connection (preface and empty SETTINGS sent); the agent must serve afterwards."""
    with Raw(agent) as connection:
        yield connection
    assert_serves(agent)


def assert_infer_ok(answer: Answer, expected: bytes) -> None:
    assert answer.reset is None
    assert len(answer.blocks) == 2  # headers, then trailers
    assert answer.blocks[0][":status"] == "200"
    assert answer.blocks[0]["content-type"] == "application/grpc"
    assert answer.status == 0
    [data] = answer.messages()
    response = service_pb2.ModelInferResponse.FromString(data)
    assert (response.model_name, response.model_version) == ("mlp", "1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("logits", "FP32", [1, 10])]
    assert response.raw_output_contents[0] == expected


def assert_error(answer: Answer, code: int, words: str) -> None:
    """A trailers-only answer with ``code``."""
    assert len(answer.blocks) == 1
    assert answer.blocks[0][":status"] == "200"
    assert answer.data == b""
    assert answer.status == code
    assert words in answer.details


# ---- valid calls ----------------------------------------------------------------------------


def test_unary_call(raw: Raw, expected: bytes) -> None:
    assert_infer_ok(raw.call(1), expected)
    assert_infer_ok(raw.call(3), expected)  # and again on the same connection


def test_ping_is_answered_with_the_same_bytes(raw: Raw) -> None:
    raw.send(frame(PING, 0, 0, b"8 bytes!"))
    while (got := raw.read()) is not None and got.type != PING:
        pass
    assert got is not None and (got.flags, got.stream, got.payload) == (ACK, 0, b"8 bytes!")


@pytest.mark.parametrize("pad", [0, 7, 255])
def test_padded_data(raw: Raw, expected: bytes, pad: int) -> None:
    body = bytes((pad,)) + message(REQUEST) + b"\0" * pad
    raw.send(raw.headers(1), frame(DATA, PADDED | END_STREAM, 1, body))
    assert_infer_ok(raw.answer(1), expected)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_message(raw: Raw, expected: bytes, encoding: str) -> None:
    packed = gzip.compress(REQUEST) if encoding == "gzip" else zlib.compress(REQUEST)
    answer = raw.call(1, message(packed, flag=1), extra=(("grpc-encoding", encoding),))
    assert_infer_ok(answer, expected)
    assert answer.blocks[0]["grpc-accept-encoding"] == "identity,deflate,gzip"
    # A streaming call's compressed messages (inflated off the event loop, as a unary call's).
    answer = raw.call(3, message(packed, flag=1), path=STREAM_INFER,
                      extra=(("grpc-encoding", encoding),))
    [first] = answer.messages()
    response = service_pb2.ModelStreamInferResponse.FromString(first)
    assert response.error_message == ""
    assert response.infer_response.raw_output_contents[0] == expected
    assert answer.status == 0
    # A bomb on a stream ends that call with RESOURCE_EXHAUSTED.
    zeros = b"\0" * (2 * LIMIT)
    bomb = gzip.compress(zeros) if encoding == "gzip" else zlib.compress(zeros)
    answer = raw.call(5, message(bomb, flag=1), path=STREAM_INFER,
                      extra=(("grpc-encoding", encoding),))
    assert answer.messages() == []
    assert answer.status == 8
    assert f"inflates to more than the {LIMIT} bytes" in answer.details


def test_grpcio_gzip_channel(agent: AgentThread, expected: bytes) -> None:
    with grpc.insecure_channel(agent.grpc_url, compression=grpc.Compression.Gzip) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(service_pb2.ModelInferRequest.FromString(REQUEST),
                                   metadata=metadata(agent), timeout=TIMEOUT)
        assert response.raw_output_contents[0] == expected
        # A stream's messages too (inflated off the event loop, as a unary call's).
        requests = [service_pb2.ModelInferRequest.FromString(REQUEST) for _ in range(3)]
        for i, request in enumerate(requests):
            request.id = str(i)
        answers = list(stub.ModelStreamInfer(iter(requests), metadata=metadata(agent),
                                             timeout=TIMEOUT))
    assert sorted(a.infer_response.id for a in answers) == ["0", "1", "2"]
    assert all(a.error_message == "" for a in answers)
    assert all(a.infer_response.raw_output_contents[0] == expected for a in answers)


def test_answer_follows_a_16_byte_stream_window(agent: AgentThread, expected: bytes) -> None:
    with Raw(agent, settings={SETTINGS_INITIAL_WINDOW_SIZE: 16}) as conn:
        conn.send(conn.headers(1), frame(DATA, END_STREAM, 1, message(REQUEST)))
        window, pieces, blocks, data = 16, [], [], bytearray()
        while (got := conn.read()) is not None:
            if got.stream != 1:
                continue
            if got.type == DATA:
                window -= len(got.payload)
                assert window >= 0, "DATA past the stream's window"
                pieces.append(len(got.payload))
                data += got.payload
                conn.send(frame(WINDOW_UPDATE, 0, 1, len(got.payload).to_bytes(4, "big")))
                window += len(got.payload)
            elif got.type == HEADERS:
                blocks.append(got.headers)
                if got.flags & END_STREAM:
                    break
        assert len(pieces) > 3 and max(pieces) == 16
        assert_infer_ok(Answer(blocks, bytes(data)), expected)  # trailers after all data
    assert_serves(agent)


def test_large_streaming_message_reopens_the_window(agent: AgentThread) -> None:
    """A ModelStreamInfer message larger than the stream window (4 MiB) still arrives."""
    batch = np.ones((20480, 64), np.float32)  # 5 MiB
    request = service_pb2.ModelInferRequest(
        model_name="mlp", raw_input_contents=[batch.tobytes()],
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                               shape=list(batch.shape))])
    assert len(request.SerializeToString()) > http2.STREAM_WINDOW
    with grpc.insecure_channel(agent.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        [answer] = list(stub.ModelStreamInfer(iter([request]), metadata=metadata(agent),
                                              timeout=5))
    assert answer.error_message == ""
    assert list(answer.infer_response.outputs[0].shape) == [20480, 10]


# ---- not HTTP/2, or too slow ----------------------------------------------------------------


@pytest.mark.parametrize("sent", [
    b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",  # 24 bytes, not the preface
    b"hello\r\n",  # shorter than the preface and no start of it: answered at once
])
def test_not_http2_gets_a_400_and_is_closed(agent: AgentThread, sent: bytes) -> None:
    with Raw(agent, preface=False) as conn:
        conn.send(sent)
        answer = conn.rest()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-length: 38" in head and body == b"this port speaks gRPC (HTTP/2) only.\r\n"
    assert_serves(agent)


def test_http1_client_reads_the_400(agent: AgentThread) -> None:
    response = httpx.get(f"http://{agent.grpc_url}/v2/health/live", timeout=TIMEOUT)
    assert response.status_code == 400
    assert "gRPC (HTTP/2) only" in response.text
    assert_serves(agent)


@pytest.mark.parametrize("sent", [b"", PREFACE[:10]])
def test_no_preface_is_disconnected(agent: AgentThread, sent: bytes) -> None:
    with Raw(agent, preface=False) as conn:
        conn.send(sent)
        assert conn.rest() == b""  # closed (within TIMEOUT), and nothing said before it
    assert_serves(agent)


# ---- connection errors ----------------------------------------------------------------------


def _block(conn: Raw) -> bytes:
    return conn.headers(1)[9:]


CONNECTION_ERRORS: list[tuple[str, Callable[[Raw], list[bytes]], int]] = [
    ("frame over MAX_FRAME", lambda c: [(http2.MAX_FRAME + 1).to_bytes(3, "big")
                                        + b"\0\0\0\0\0\1"], FRAME_SIZE_ERROR),
    ("not HPACK", lambda c: [frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f")],
     COMPRESSION_ERROR),
    # RFC 7541 4.2 allows two; hpack would spend ~90 ms of the loop on 64 KiB of them.
    ("three table size updates", lambda c: [frame(HEADERS, END_HEADERS, 1, b"\x20" * 3)],
     COMPRESSION_ERROR),
    ("a size update of 60,000 bytes", lambda c: [frame(HEADERS, END_HEADERS, 1,
                                                       b"\x3f" + b"\x80" * 60000 + b"\x01")],
     COMPRESSION_ERROR),
    ("a table size update at the end of a block", lambda c: [
        frame(HEADERS, END_HEADERS, 1, _block(c) + b"\x20")], COMPRESSION_ERROR),
    ("a table size update over SETTINGS_HEADER_TABLE_SIZE", lambda c: [  # 4,097 bytes
        frame(HEADERS, END_HEADERS, 1, b"\x3f\xe2\x1f" + _block(c))], COMPRESSION_ERROR),
    ("header list over 16 KiB", lambda c: [c.headers(1, extra=(("x-big", "a" * 20000),))],
     ENHANCE_YOUR_CALM),
    ("HEADERS frame over 64 KiB", lambda c: [  # table size updates: slow to decode
        frame(HEADERS, END_HEADERS, 1, b"\x20" * http2.MAX_HEADER_BLOCK + _block(c))],
     ENHANCE_YOUR_CALM),
    ("header block over 64 KiB", lambda c: [frame(HEADERS, 0, 1, b"\0" * 16384)] + [
        frame(CONTINUATION, 0, 1, b"\0" * 16384)] * 4, ENHANCE_YOUR_CALM),
    ("33 CONTINUATION frames, empty (the CONTINUATION flood)", lambda c: [
        frame(HEADERS, 0, 1, _block(c))] + [frame(CONTINUATION, 0, 1)] * 33, ENHANCE_YOUR_CALM),
    ("PING inside a header block", lambda c: [frame(HEADERS, 0, 1, _block(c)),
                                             frame(PING, 0, 0, b"\0" * 8)], PROTOCOL_ERROR),
    ("DATA inside a header block", lambda c: [
        c.headers(1, path=STREAM_INFER), frame(HEADERS, 0, 3, _block(c)),
        frame(DATA, 0, 1, message(b""))], PROTOCOL_ERROR),
    ("CONTINUATION without HEADERS", lambda c: [frame(CONTINUATION, END_HEADERS, 1, _block(c))],
     PROTOCOL_ERROR),
    ("DATA on an idle stream", lambda c: [frame(DATA, 0, 1, message(REQUEST))], PROTOCOL_ERROR),
    ("HEADERS on an even stream", lambda c: [c.headers(2)], PROTOCOL_ERROR),
    ("HEADERS on stream 0", lambda c: [c.headers(0)], PROTOCOL_ERROR),
    ("a lower stream id", lambda c: [c.headers(5), c.headers(3)], PROTOCOL_ERROR),
    ("RST_STREAM on an idle stream", lambda c: [frame(RST_STREAM, 0, 1, b"\0\0\0\x08")],
     PROTOCOL_ERROR),
    ("PUSH_PROMISE", lambda c: [frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2")],
     PROTOCOL_ERROR),
    ("WINDOW_UPDATE of 0", lambda c: [frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0")], PROTOCOL_ERROR),
    ("connection window past 2^31-1", lambda c: [
        frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big"))], FLOW_CONTROL_ERROR),
    ("initial window past 2^31-1", lambda c: [
        frame(SETTINGS, 0, 0, b"\0\4" + (2**31).to_bytes(4, "big"))], FLOW_CONTROL_ERROR),
    ("SETTINGS of 7 bytes", lambda c: [frame(SETTINGS, 0, 0, b"\0" * 7)], FRAME_SIZE_ERROR),
    ("SETTINGS of 33 entries", lambda c: [frame(SETTINGS, 0, 0, b"\0\3\0\0\0\1" * 33)],
     ENHANCE_YOUR_CALM),
    # Rapid reset (CVE-2023-44487): open a call, cancel it, again and again.
    ("1001 calls opened and cancelled", lambda c: [
        c.headers(sid) + frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big"))
        for sid in range(1, 2 * 1001 + 1, 2)], ENHANCE_YOUR_CALM),
    ("PING of 7 bytes", lambda c: [frame(PING, 0, 0, b"\0" * 7)], FRAME_SIZE_ERROR),
    ("PING of 9 bytes", lambda c: [frame(PING, 0, 0, b"\0" * 9)], FRAME_SIZE_ERROR),
    ("padding as long as the frame", lambda c: [
        c.headers(1), frame(DATA, PADDED, 1, b"\5abcd")], PROTOCOL_ERROR),
    ("PADDED DATA of 0 bytes", lambda c: [c.headers(1), frame(DATA, PADDED, 1)], PROTOCOL_ERROR),
]


@pytest.mark.parametrize(("sent", "code"), [case[1:] for case in CONNECTION_ERRORS],
                         ids=[case[0] for case in CONNECTION_ERRORS])
def test_connection_error_gets_goaway(raw: Raw, sent: Callable[[Raw], list[bytes]],
                                      code: int) -> None:
    raw.send(*sent(raw))
    got, debug = raw.goaway()
    assert got == code, debug
    assert debug  # the reason, for the peer's logs


# ---- streams --------------------------------------------------------------------------------


def test_streams_over_the_limit_are_refused(raw: Raw, expected: bytes) -> None:
    last = 2 * http2.MAX_STREAMS - 1
    raw.send(*(raw.headers(sid) for sid in range(1, last + 1, 2)))  # opened, never finished
    raw.send(raw.headers(last + 2))
    assert raw.answer(last + 2) == Answer([], b"", REFUSED_STREAM)
    raw.send(frame(RST_STREAM, 0, 1, CANCEL.to_bytes(4, "big")))  # frees one
    assert_infer_ok(raw.call(last + 4), expected)


def test_client_reset_mid_body(raw: Raw, expected: bytes) -> None:
    raw.send(raw.headers(1), frame(DATA, 0, 1, message(REQUEST)[:50]),
             frame(RST_STREAM, 0, 1, CANCEL.to_bytes(4, "big")))
    assert_infer_ok(raw.call(3), expected)
    assert [f for f in raw.log if f.stream == 1] == []  # nothing sent on the reset stream


@pytest.mark.parametrize("length", [LIMIT + 1, 2**32 - 1])
def test_message_over_the_limit(raw: Raw, expected: bytes, length: int) -> None:
    raw.send(raw.headers(1), frame(DATA, 0, 1, message(b"", length=length)))
    answer = raw.answer(1)
    assert_error(answer, 8, f"is {length} bytes, more than the {LIMIT} allowed "
                            "(http.max_request_bytes)")
    assert raw.answer(1).reset == NO_ERROR  # the client is told to stop sending
    assert_infer_ok(raw.call(3), expected)


@pytest.mark.parametrize(("body", "code", "words", "extra"), [
    (message(REQUEST, flag=2), 13, "compressed flag is 2", ()),
    (message(REQUEST)[:-3], 13, "ends inside a message", ()),
    (None, 13, "has no message", ()),  # END_STREAM on the HEADERS
    (b"", 13, "has no message", ()),  # on an empty DATA frame
    (message(REQUEST) * 2, 13, "more than one message", ()),
    (message(gzip.compress(REQUEST), flag=1), 13, "without grpc-encoding", ()),
    (message(b"not gzip", flag=1), 13, "not valid gzip data", (("grpc-encoding", "gzip"),)),
    (message(gzip.compress(REQUEST)[:-10], flag=1), 13, "truncated gzip",
     (("grpc-encoding", "gzip"),)),
    (message(gzip.compress(b"\0" * (2 * LIMIT)), flag=1), 8,
     f"inflates to more than the {LIMIT} bytes", (("grpc-encoding", "gzip"),)),
    (message(REQUEST), 12, "grpc-encoding br is not supported", (("grpc-encoding", "br"),)),
    (message(REQUEST), 13, "bad grpc-timeout", (("grpc-timeout", "abc"),)),
    (message(REQUEST), 13, "bad grpc-timeout", (("grpc-timeout", "123456789S"),)),
])
def test_bad_request_gets_a_status(raw: Raw, expected: bytes, body: bytes | None, code: int,
                                   words: str, extra: tuple[tuple[str, str], ...]) -> None:
    if body is None:
        raw.send(raw.headers(1, END_HEADERS | END_STREAM, extra=extra))
        answer = raw.answer(1)
    else:
        answer = raw.call(1, body, extra=extra)
    assert_error(answer, code, words)
    assert_infer_ok(raw.call(3), expected)  # the connection goes on
    if not extra or "gzip" in extra[0]:
        # Found in the message, after the client ended its side: the stream is closed, so no
        # RST_STREAM follows the answer (RFC 9113 5.1). Errors in the headers are answered
        # (and the stream reset) before the DATA arrives.
        assert [f for f in raw.log if f.stream == 1 and f.type == RST_STREAM] == []


def test_unknown_method_is_unimplemented(raw: Raw) -> None:
    answer = raw.call(1, path="/inference.GRPCInferenceService/Nope")
    assert_error(answer, 12, "/inference.GRPCInferenceService/Nope is not served")
    assert answer.blocks[0]["content-type"] == "application/grpc"


def test_stream_deadline(raw: Raw) -> None:
    raw.send(raw.headers(1, path=STREAM_INFER, extra=(("grpc-timeout", "200m"),)))
    assert_error(raw.answer(1), 4, "deadline exceeded")
    assert raw.answer(1).reset == NO_ERROR


@pytest.mark.parametrize(("method", "content_type", "status"), [
    ("GET", "application/grpc", "405"), ("PUT", "application/grpc", "405"),
    ("POST", "text/plain", "415")])
def test_not_a_grpc_request_gets_an_http_status(raw: Raw, expected: bytes, method: str,
                                                content_type: str, status: str) -> None:
    raw.send(raw.headers(1, method=method, content_type=content_type))
    answer = raw.answer(1)
    assert [list(b) for b in answer.blocks] == [[":status"]]
    assert answer.blocks[0][":status"] == status
    assert raw.answer(1).reset == NO_ERROR
    assert_infer_ok(raw.call(3), expected)


# ---- malformed requests (RFC 9113 8.1.1): RST_STREAM PROTOCOL_ERROR, the connection goes on ----


def _usual(raw: Raw, *, drop: str = "", replace: tuple[str, str] | None = None,
           first: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """The usual request fields, less ``drop``, one of them replaced, or one put first."""
    fields = raw.fields()
    if replace is not None:
        fields = [replace if k == replace[0] else (k, v) for k, v in fields]
    return ([first] if first else []) + [(k, v) for k, v in fields if k != drop]


MALFORMED: list[tuple[str, Callable[[Raw], dict[str, Any]]]] = [
    ("an uppercase field name", lambda r: {"extra": (("X-Upper", "1"),)}),
    ("a field name with a space", lambda r: {"extra": (("x y", "1"),)}),
    ("a field name with a colon inside", lambda r: {"extra": (("x:y", "1"),)}),
    ("an empty field name", lambda r: {"extra": (("", "1"),)}),
    ("a value with CR LF", lambda r: {"extra": (("x-a", "b\r\nx-c: d"),)}),
    ("a value with NUL", lambda r: {"extra": (("x-a", "b\0c"),)}),
    ("a pseudo-header after a regular field", lambda r: {"extra": ((":authority", "x"),)}),
    ("an unknown pseudo-header", lambda r: {"fields": _usual(r, first=(":foo", "x"))}),
    ("a response pseudo-header", lambda r: {"fields": _usual(r, first=(":status", "200"))}),
    ("two :path fields", lambda r: {"fields": _usual(r, first=(":path", INFER))}),
    ("two :method fields", lambda r: {"fields": _usual(r, first=(":method", "POST"))}),
    ("two :scheme fields", lambda r: {"fields": _usual(r, first=(":scheme", "http"))}),
    ("an empty :path", lambda r: {"fields": _usual(r, replace=(":path", ""))}),
    ("no :path", lambda r: {"fields": _usual(r, drop=":path")}),
    ("no :method", lambda r: {"fields": _usual(r, drop=":method")}),
    ("no :scheme", lambda r: {"fields": _usual(r, drop=":scheme")}),
    ("no pseudo-headers at all", lambda r: {"fields": [("content-type", "application/grpc")]}),
    ("connection: keep-alive", lambda r: {"extra": (("connection", "keep-alive"),)}),
    ("transfer-encoding", lambda r: {"extra": (("transfer-encoding", "chunked"),)}),
    ("upgrade", lambda r: {"extra": (("upgrade", "h2c"),)}),
    ("keep-alive", lambda r: {"extra": (("keep-alive", "timeout=5"),)}),
    ("proxy-connection", lambda r: {"extra": (("proxy-connection", "close"),)}),
    ("te other than trailers", lambda r: {"fields": _usual(r, replace=("te", "gzip"))}),
    ("content-length not a number", lambda r: {"extra": (("content-length", "-1"),)}),
]


@pytest.mark.parametrize("headers", [case[1] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_malformed_request_is_reset(raw: Raw, expected: bytes,
                                    headers: Callable[[Raw], dict[str, Any]]) -> None:
    raw.send(raw.headers(1, **headers(raw)), frame(DATA, END_STREAM, 1, message(REQUEST)))
    assert raw.answer(1) == Answer([], b"", PROTOCOL_ERROR)
    assert_infer_ok(raw.call(3), expected)  # the HPACK state is in step: the connection goes on
    assert [f.type for f in raw.log if f.stream == 1] == [RST_STREAM]  # nothing after the reset


@pytest.mark.parametrize(("declared", "frames"), [
    (10, [message(REQUEST)]),  # more DATA than declared
    (len(message(REQUEST)) + 1, [message(REQUEST)]),  # less, then END_STREAM
    (len(message(REQUEST)), [message(REQUEST)[:20], message(REQUEST)[20:], b"x"]),
])
def test_content_length_must_match_the_data(raw: Raw, expected: bytes, declared: int,
                                            frames: list[bytes]) -> None:
    raw.send(raw.headers(1, extra=(("content-length", str(declared)),)),
             *(frame(DATA, END_STREAM if i == len(frames) - 1 else 0, 1, data)
               for i, data in enumerate(frames)))
    assert raw.answer(1) == Answer([], b"", PROTOCOL_ERROR)
    assert_infer_ok(raw.call(3), expected)


def test_edge_whitespace_of_a_value_is_stripped(raw: Raw, expected: bytes) -> None:
    # perf_analyzer sends "-H 'authorization: Bearer ...'" as " Bearer ...".
    fields = _usual(raw, replace=("authorization", f" Bearer {raw.token}\t"))
    raw.send(raw.headers(1, fields=fields, extra=(("te", "trailers "),)),
             frame(DATA, END_STREAM, 1, message(REQUEST)))
    assert_infer_ok(raw.answer(1), expected)


def test_header_block_in_many_continuations(raw: Raw, expected: bytes) -> None:
    """A block cut into the most CONTINUATION frames allowed is served."""
    block = raw.headers(1)[9:]
    cuts = [round(i * len(block) / (http2.MAX_CONTINUATIONS + 1))
            for i in range(http2.MAX_CONTINUATIONS + 2)]
    pieces = [block[a:b] for a, b in itertools.pairwise(cuts)]
    raw.send(frame(HEADERS, 0, 1, pieces[0]),
             *(frame(CONTINUATION, END_HEADERS if i == len(pieces) - 1 else 0, 1, p)
               for i, p in enumerate(pieces) if i),
             frame(DATA, END_STREAM, 1, message(REQUEST)))
    assert_infer_ok(raw.answer(1), expected)


@pytest.mark.parametrize("cuts", [[1], [3, 100], [5], [6, 7, 8], [200]])
def test_message_in_pieces(raw: Raw, expected: bytes, cuts: list[int]) -> None:
    """A message split over DATA frames (as grpcio sends a large one: ~130-200 KB each) is put
    together, wherever the cuts fall (inside the 5-byte prefix too)."""
    body = message(REQUEST)
    edges = [0, *cuts, len(body)]
    raw.send(raw.headers(1), *(frame(DATA, END_STREAM if b == len(body) else 0, 1, body[a:b])
                               for a, b in itertools.pairwise(edges)))
    assert_infer_ok(raw.answer(1), expected)


def test_stream_messages_across_frames(raw: Raw, expected: bytes) -> None:
    """Three stream messages in frames cut across them: the first ends where a frame ends
    (its buffer is taken over), the second shares a frame with the start of the third."""
    one = message(REQUEST)
    wire = one * 3
    cuts = [0, 40, len(one), 2 * len(one) + 10, len(wire)]
    raw.send(raw.headers(1, path=STREAM_INFER), *(frame(DATA, 0, 1, wire[a:b])
                                                  for a, b in itertools.pairwise(cuts)))
    raw.send(frame(DATA, END_STREAM, 1, b""))
    answer = raw.answer(1)
    assert answer.status == 0
    replies = [service_pb2.ModelStreamInferResponse.FromString(m) for m in answer.messages()]
    assert len(replies) == 3
    for reply in replies:
        assert reply.error_message == ""
        assert reply.infer_response.raw_output_contents[0] == expected


def test_content_length_that_matches_is_served(raw: Raw, expected: bytes) -> None:
    body = message(REQUEST)
    raw.send(raw.headers(1, extra=(("content-length", str(len(body))),)),
             frame(DATA, 0, 1, body[:30]), frame(DATA, END_STREAM, 1, body[30:]))
    assert_infer_ok(raw.answer(1), expected)


def test_content_length_on_headers_that_end_the_stream(raw: Raw, expected: bytes) -> None:
    raw.send(raw.headers(1, END_HEADERS | END_STREAM, extra=(("content-length", "5"),)))
    assert raw.answer(1) == Answer([], b"", PROTOCOL_ERROR)
    assert_infer_ok(raw.call(3), expected)


def test_trailers_with_a_pseudo_header_are_malformed(raw: Raw, expected: bytes) -> None:
    raw.send(raw.headers(1), frame(DATA, 0, 1, message(REQUEST)),
             frame(HEADERS, END_HEADERS | END_STREAM, 1,
                   raw.encoder.encode([(":path", INFER), ("x-trailer", "1")])))
    assert raw.answer(1) == Answer([], b"", PROTOCOL_ERROR)
    assert_infer_ok(raw.call(3), expected)


def test_trailers_end_a_call(raw: Raw, expected: bytes) -> None:
    raw.send(raw.headers(1), frame(DATA, 0, 1, message(REQUEST)),
             frame(HEADERS, END_HEADERS | END_STREAM, 1, raw.encoder.encode([("x-t", "1")])))
    assert_infer_ok(raw.answer(1), expected)


def test_headers_depending_on_their_own_stream(raw: Raw, expected: bytes) -> None:
    block = raw.headers(1)[9:]  # encoded now: the server must decode it to stay in step
    raw.send(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, (1).to_bytes(4, "big") + b"\x10"
                   + block), frame(DATA, END_STREAM, 1, message(REQUEST)))
    assert raw.answer(1) == Answer([], b"", PROTOCOL_ERROR)
    assert_infer_ok(raw.call(3), expected)


def test_priority_depending_on_its_own_stream(raw: Raw, expected: bytes) -> None:
    raw.send(raw.headers(1), frame(PRIORITY, 0, 1, (1).to_bytes(4, "big") + b"\x10"),
             frame(DATA, END_STREAM, 1, message(REQUEST)))
    assert raw.answer(1) == Answer([], b"", PROTOCOL_ERROR)
    assert_infer_ok(raw.call(3), expected)
    assert [f.type for f in raw.log if f.stream == 1] == [RST_STREAM]


def test_priority_frames_are_otherwise_ignored(raw: Raw, expected: bytes) -> None:
    raw.send(frame(PRIORITY, 0, 1, (0).to_bytes(4, "big") + b"\x10"),
             frame(PRIORITY, 0, 7, (3).to_bytes(4, "big") + b"\x10"))
    assert_infer_ok(raw.call(1), expected)


def test_data_after_the_call_is_over_is_stream_closed(raw: Raw, expected: bytes) -> None:
    assert_infer_ok(raw.call(1), expected)  # the client ended its side; the server answered
    raw.send(frame(DATA, 0, 1, message(REQUEST)))  # RFC 9113 6.1: not open, not half-closed
    assert raw.answer(1) == Answer([], b"", STREAM_CLOSED)
    raw.send(frame(DATA, 0, 1, b"more"))  # once told, further DATA is dropped
    assert_infer_ok(raw.call(3), expected)
    assert [f.type for f in raw.log if f.stream == 1].count(RST_STREAM) == 1


def test_data_in_flight_on_a_reset_stream_is_dropped(raw: Raw, expected: bytes) -> None:
    raw.send(raw.headers(1, extra=(("X-Upper", "1"),)))  # malformed: reset at its headers
    assert raw.answer(1) == Answer([], b"", PROTOCOL_ERROR)
    raw.send(frame(DATA, END_STREAM, 1, message(REQUEST)))  # sent before the RST arrived
    assert_infer_ok(raw.call(3), expected)
    assert [f.type for f in raw.log if f.stream == 1] == [RST_STREAM]
