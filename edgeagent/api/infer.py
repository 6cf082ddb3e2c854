"""``POST /v2/models/{name}[/versions/{v}]/infer`` as a pure ASGI endpoint, and the fast path
that reaches it ahead of Starlette's routing.

Inference is nearly all of the API's traffic and, for small models, the HTTP stack costs far
more than the model: so requests for it skip Starlette's middleware and route matching (the
bearer token and header size are checked by :class:`~edgeagent.api.auth.RequestGuard`, which
wraps everything), the body is read straight from the ASGI ``receive`` into a buffer of its
declared length, and the response goes out as one ``http.response.start`` and one
``http.response.body`` with its Content-Length. Errors are the same
:class:`~edgeagent.errors.EdgeAgentError` classes, answered by :mod:`edgeagent.api.errors`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from edgeagent.api.codec import decode_request, encode_response, header_length
from edgeagent.api.compression import compress, decompress
from edgeagent.api.dataplane import DataPlane, raw_binary_request
from edgeagent.api.errors import (
    BadRequest,
    PayloadTooLarge,
    error_response,
)
from edgeagent.errors import EdgeAgentError, ModelNotFound

if TYPE_CHECKING:
    from edgeagent.api.services import Services

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Bodies (and outputs) above this size are decoded (encoded) in a worker thread, so one large
#: request never stalls the event loop; smaller ones are cheaper to handle inline.
OFFLOAD_BYTES = 1 << 20

#: Digits a version in a path may have: more than any version (an int64) can.
_VERSION_DIGITS = 19

#: The two infer routes, with Starlette's ``{param}`` semantics (one path segment each).
_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


async def receive_body(receive: Receive, content_length: bytes | str | None,
                       limit: int) -> bytearray:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length is checked before reading, and the body is received into a
    buffer of that size (one copy per chunk); a chunked body is checked as it arrives, so no
    more than ``limit`` bytes are ever buffered.

    Raises:
        BadRequest: a Content-Length that is not a number.
        PayloadTooLarge: the body exceeds ``limit``.
        ClientDisconnect: the client went away before the body was complete.
    """
    declared = None
    if content_length is not None:
        text = (content_length.decode("latin-1") if isinstance(content_length, bytes)
                else content_length)
        if not (text.isascii() and text.isdigit()):  # isdigit() alone takes other scripts'
            raise BadRequest(f"Content-Length must be a number of bytes, got {text[:40]!r}")
        if len(text) > 19:  # int() refuses 4,300 digits and more; this is over any limit
            raise PayloadTooLarge(f"the body is {text[:20]}... bytes, more than "
                                  f"http.max_request_bytes ({limit})")
        declared = int(text)
        if declared > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes, more than "
                                  f"http.max_request_bytes ({limit})")
    body = bytearray(declared or 0)
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        end = size + len(chunk)
        if declared is not None and end <= declared:
            body[size:end] = chunk
        else:  # chunked, or (never from a conforming server) more than declared
            if end > limit:
                raise PayloadTooLarge(f"the body exceeds http.max_request_bytes ({limit} bytes)")
            del body[size:]
            body += chunk
        size = end
        if not message.get("more_body", False):
            break
    del body[size:]  # a body shorter than declared (the server ended it): keep what came
    return body


def parse_version(name: str, raw: str | None) -> int | None:
    """The ``{version}`` of a model path, or ``None`` when the path names none.

    Raises:
        ModelNotFound: not a positive integer in ASCII digits, or one of more digits than any
            version has (no such version can exist).
    """
    if raw is None:
        return None
    # isdigit() alone takes other scripts' digits (and superscripts, which int() refuses);
    # int() refuses more than 4,300 digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > _VERSION_DIGITS:
        shown = raw if len(raw) <= 40 else f"{raw[:40]}..."
        raise ModelNotFound(f"model {name!r} has no version {shown!r} "
                            "(versions are positive integers)")
    return int(raw)


class InferEndpoint:
    """The infer endpoint, as an ASGI app.

    Called with the path's name and version by :func:`infer_fast_path`; also mounted as
    Starlette's infer routes (there it reads ``scope["path_params"]``), which only ever answer
    the methods other than POST, with 405.
    """

    def __init__(self, services: Services) -> None:
        self.s = services
        self.plane = DataPlane(services)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        await self.handle(scope, receive, send, params["name"], params.get("version"))

    async def handle(self, scope: Scope, receive: Receive, send: Send, name: str,
                     version: str | None) -> None:
        """Answer one inference request; every error gets its status from one place."""
        try:
            headers, body = await self._infer(scope, receive, name, version)
        except ClientDisconnect:
            return  # nobody to answer
        except EdgeAgentError as exc:
            await error_response(exc)(scope, receive, send)
            return
        # Anything else is a bug: the transport's boundary (api.errors.ErrorBoundary) answers
        # 500 and logs it once, with the request id.
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _infer(self, scope: Scope, receive: Receive, name: str,
                     raw_version: str | None) -> tuple[list[tuple[bytes, bytes]], bytes]:
        version = parse_version(name, raw_version)
        self.plane.admit(name, version)  # unknown or not ready: refuse before reading the body
        http = self.s.config.http
        content_length = binary_header = content_encoding = accept_encoding = None
        for key, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if key == b"content-length" and content_length is None:
                content_length = value
            elif key == b"inference-header-content-length" and binary_header is None:
                binary_header = value.decode("latin-1")
            elif key == b"content-encoding" and content_encoding is None:
                content_encoding = value.decode("latin-1")
            elif key == b"accept-encoding" and accept_encoding is None:
                accept_encoding = value.decode("latin-1")
        body: bytes | bytearray = await receive_body(receive, content_length,
                                                     http.max_request_bytes)
        if content_encoding is not None:
            body = await offload(len(body), decompress, body, content_encoding,
                                  http.max_request_bytes)
        size = header_length(binary_header, len(body))
        if size == 0:  # Triton's raw binary request: the whole body is the one input
            req = raw_binary_request(self.s.manager.get(name, version), body,
                                     http.max_tensor_elements)
        else:
            req = await offload(len(body), functools.partial(
                decode_request, max_bytes_elements=http.max_bytes_elements),
                body, size, http.max_tensor_elements)
        mv, outputs = await self.plane.infer(name, version, req.call())
        out_size = sum(a.nbytes for a in outputs.values())
        enc = await offload(out_size, encode_response, name, mv.version, req, outputs)
        payload, encoding = enc.body, None
        if accept_encoding is not None:
            payload, encoding = await offload(len(payload), compress, payload, accept_encoding)
        headers = [(b"content-length", str(len(payload)).encode()),
                   (b"content-type", enc.media_type.encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in enc.headers.items()]
        if encoding is not None:
            headers.append((b"content-encoding", encoding.encode()))
        return headers, payload


async def offload(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when ``size`` bytes make it worth the hand-off."""
    call = functools.partial(fn, *args)
    return call() if size <= OFFLOAD_BYTES else await run_in_threadpool(call)


def infer_fast_path(app: ASGIApp, endpoint: InferEndpoint) -> ASGIApp:
    """``app``, with inference requests (POST to an infer path) handed to ``endpoint`` first."""
    match = _INFER_PATH.fullmatch

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            found = match(scope["path"])
            if found is not None:
                await endpoint.handle(scope, receive, send, found["name"], found["version"])
                return
        await app(scope, receive, send)

    return dispatch
