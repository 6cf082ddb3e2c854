"""The one place that maps edgeagent errors to HTTP statuses and ``{"error": "..."}`` bodies,
and the HTTP transport's boundary (:class:`ErrorBoundary`).

The request-level errors below exist only at the HTTP edge (a body too large, a bad token);
they are :class:`~edgeagent.errors.EdgeAgentError` subclasses like every other error, so the
hierarchy stays one.

Content errors are raised as those classes where the content is read (the codec, the routes)
and become 4xx here. Anything else that escapes a handler is a bug: :class:`ErrorBoundary`,
around the whole application, answers it with a 500 naming a request id and logs it exactly
once, with its traceback and the same id, so a user's report and the journal meet.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeagent.errors import (
    BackendUnavailable,
    EdgeAgentError,
    HubError,
    InferenceError,
    InferenceInputError,
    ModelError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
)

log = logging.getLogger(__name__)


class BadRequest(EdgeAgentError):
    """A request the protocol does not allow: bad JSON, a missing field, a wrong type."""


class PayloadTooLarge(BadRequest):
    """A request body (or a tensor in it) exceeds the configured limits."""


class HeadersTooLarge(EdgeAgentError):
    """The request's header fields exceed ``http.max_header_bytes``."""


class Unauthorized(EdgeAgentError):
    """The bearer token is missing or wrong."""


class Forbidden(EdgeAgentError):
    """The request is never allowed in this configuration."""


class NotReady(EdgeAgentError):
    """The agent as a whole is not ready (starting, draining, a model not loaded)."""


#: Most specific first: the first class an error is an instance of decides its status.
_STATUS: tuple[tuple[type[EdgeAgentError], int], ...] = (
    (PayloadTooLarge, 413),
    (HeadersTooLarge, 431),
    (BadRequest, 400),
    (InferenceInputError, 400),
    (Unauthorized, 401),
    (Forbidden, 403),
    (ModelNotFound, 404),
    (Overloaded, 503),
    (ModelNotReady, 503),
    (NotReady, 503),
    (HubError, 502),
    (InferenceError, 500),
    (ModelError, 500),
    (BackendUnavailable, 500),
)


def status_of(exc: EdgeAgentError) -> int:
    """The HTTP status of an edgeagent error (500 for any class not listed)."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


class SafeJSONResponse(JSONResponse):
    """A JSON response that encodes any text: request content quoted in an error message may
    hold lone surrogates, which strict UTF-8 (Starlette's ``JSONResponse``) cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(exc: EdgeAgentError) -> JSONResponse:
    """``{"error": message}`` with the error's status and the headers it implies."""
    status = status_of(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="edgeagent"'
    elif isinstance(exc, PayloadTooLarge | HeadersTooLarge):
        # The rest of the body is not read: close the connection rather than drain it.
        headers["Connection"] = "close"
    if status >= 500 and not isinstance(exc, Overloaded | ModelNotReady | NotReady):
        log.error("request failed: %s", exc)
    return SafeJSONResponse({"error": str(exc)}, status_code=status, headers=headers)


async def handle_edgeagent_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for every :class:`EdgeAgentError`."""
    assert isinstance(exc, EdgeAgentError)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such route) and 405 (wrong method), in the protocol's shape."""
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} not allowed on {request.url.path}"
    return SafeJSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


#: Where the request id of a failed request is kept in its ASGI scope.
REQUEST_ID = "edgeagent.request_id"


def _request_id(scope: Scope) -> str:
    """The request id of ``scope``, made on first use (only failed requests need one)."""
    rid = scope.get(REQUEST_ID)
    if rid is None:
        rid = scope[REQUEST_ID] = secrets.token_hex(6)
    return str(rid)


def unexpected_response(exc: Exception, request_id: str) -> JSONResponse:
    """A bug, not a bad request: 500 in the protocol's shape, naming the request id that the
    log line carries too (:class:`ErrorBoundary` writes that line)."""
    return SafeJSONResponse(
        {"error": f"internal error (request {request_id}): {type(exc).__name__}; the agent's "
                  "log has the details", "request_id": request_id},
        status_code=500, headers={"x-request-id": request_id})


#: Set in a scope whose failure is logged already.
_LOGGED = "edgeagent.error_logged"


def _log_unexpected(scope: Scope, exc: Exception) -> str:
    """Log a bug once per request, before its 500 goes out; the request id."""
    rid = _request_id(scope)
    if not scope.get(_LOGGED):
        scope[_LOGGED] = True
        log.error("request %s %s %s failed: %s: %s", rid, scope.get("method"),
                  _shown_path(scope), type(exc).__name__, exc, exc_info=exc)
    return rid


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Starlette's handler for anything else: the log line and the 500 (Starlette then
    re-raises the exception, and :class:`ErrorBoundary` keeps it from the server).

    A client gone before its body was complete (or cut off by a deadline) is no bug: nobody
    is left to answer, and nothing is logged.
    """
    if isinstance(exc, ClientDisconnect):
        return Response(status_code=400)  # never delivered: the connection is gone
    return unexpected_response(exc, _log_unexpected(request.scope, exc))


class ErrorBoundary:
    """The HTTP transport's one boundary: whatever escapes ``app`` becomes a 500 with a request
    id (unless a response was under way: then the connection is cut) and one log line.

    The exception is not re-raised: the server would log it a second time. Cancellation and
    the like (``BaseException``) pass through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            return  # the client is gone (or was cut off by a deadline): nobody to answer
        except Exception as exc:
            rid = _log_unexpected(scope, exc)
            if not started:
                await unexpected_response(exc, rid)(scope, receive, send)


def _shown_path(scope: Scope) -> str:
    path = str(scope.get("path", ""))
    return path if len(path) <= 200 else f"{path[:200]}..."
