"""The one place that maps edgeagent errors to HTTP statuses and ``{"error": "..."}`` bodies.

The request-level errors below exist only at the HTTP edge (a body too large, a bad token);
they are :class:`~edgeagent.errors.EdgeAgentError` subclasses like every other error, so the
hierarchy stays one.
"""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

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
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


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
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


def unexpected_response(exc: Exception) -> JSONResponse:
    """A bug, not a bad request: 500 in the protocol's shape (the caller logs the traceback)."""
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"},
                        status_code=500)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for anything else (Starlette logs the traceback)."""
    return unexpected_response(exc)
