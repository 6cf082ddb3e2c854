"""Request admission, as ASGI middleware in front of every route: header size, bearer token.

Header fields larger in all than ``http.max_header_bytes`` are refused with 431 (this is the
limit: uvicorn's httptools protocol applies none of its own). With ``http.token_file`` configured,
every request needs ``Authorization: Bearer <token>`` (compared in constant time). Changing
which models are loaded always needs the token: with none configured, the repository
load/unload endpoints are refused outright.
"""

from __future__ import annotations

import hmac
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from edgeagent.api.errors import Forbidden, HeadersTooLarge, Unauthorized, error_response

#: Endpoints that change what the agent serves: always behind the token (or the admin channel).
_REPOSITORY_CHANGE = re.compile(
    r"^(/v2/repository/models/[^/]+/(load|unload)|/v1/agent/models/[^/]+/(pull|rollback|tune))$")


class RequestGuard:
    """Refuse oversized headers (431), requests without the right bearer token (401), and
    repository changes when no token is configured at all (403).

    On the local admin channel (``trusted``), the socket's file permissions are the
    authorisation: no token is asked for, the header size is still bounded.
    """

    def __init__(self, app: ASGIApp, token: str | None, max_header_bytes: int, *,
                 trusted: bool = False) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self._max_header_bytes = max_header_bytes
        self._trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self._refusal(scope)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> HeadersTooLarge | Unauthorized | Forbidden | None:
        """Why an HTTP request is refused before it reaches a route, or ``None``."""
        # One pass over the headers: this runs on every request, on the event loop.
        size, authorization = 0, None
        for key, value in scope["headers"]:
            size += len(key) + len(value) + 4  # + ": " and CRLF
            if key == b"authorization" and authorization is None:  # the first, as Starlette
                authorization = value  # (ASGI servers hand over lower-case names)
        if size > self._max_header_bytes:
            return HeadersTooLarge(f"the request headers take {size} bytes, more than "
                                   f"http.max_header_bytes ({self._max_header_bytes})")
        if self._token is None or self._trusted:
            if not self._trusted and _REPOSITORY_CHANGE.match(scope["path"]):
                return Forbidden("this changes what the agent serves: use the local admin "
                                 "channel (the edgeagent commands on the box), or configure "
                                 "http.token_file")
            return None
        scheme, _, given = (authorization or b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return Unauthorized("this endpoint needs 'Authorization: Bearer <token>' "
                                "(the token in http.token_file)")
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return Unauthorized("wrong bearer token")
        return None
