"""The web console's server side: login, the page shell, its assets, and the cookie gate in
front of the JSON API.

The console is a single page (``static/index.html`` + ``console.js`` + ``console.css``) that
reads and acts through the same ``/v1/fleet/...`` API as the ``edgeagent fleet`` commands; the
gate lets a request with a valid session cookie through to the API as if it carried the bearer
token, after the CSRF checks of :mod:`edgeagent.fleet.console.auth` for anything that changes
state. Every console response carries a strict Content-Security-Policy (scripts and styles
from this origin only, no inline script, no frames).
"""

from __future__ import annotations

import asyncio
import html
import logging
import secrets
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgeagent.fleet.console.auth import (
    COOKIE,
    Sessions,
    cookie_of,
    csrf_refusal,
    same_origin,
)

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}
ASSETS = {"console.js": "text/javascript; charset=utf-8",
          "console.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
MAX_LOGIN_BODY = 4096
WRONG_TOKEN_DELAY_S = 0.5

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgeagent fleet: sign in</title>
<link rel="icon" href="/console/static/favicon.svg">
<link rel="stylesheet" href="/console/static/console.css"></head>
<body class="login"><main class="login-box">
<h1>edgeagent fleet</h1>
<p>Paste the controller's API token (the file named by <code>api.token_file</code>, by default
<code>api-token</code> in the state directory).</p>
{message}
<form method="post" action="/console/login">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form></main></body></html>
"""


def _asset(name: str) -> bytes:
    return resources.files("edgeagent.fleet.console").joinpath("static").joinpath(name).read_bytes()


def _secured(response: Response) -> Response:
    for k, v in SECURITY_HEADERS.items():
        response.headers[k] = v
    return response


def _login_page(message: str = "", status: int = 200) -> Response:
    text = LOGIN_PAGE.format(message=f'<p class="error" role="alert">{html.escape(message)}</p>'
                             if message else "")
    r = Response(text, status, media_type="text/html; charset=utf-8",
                 headers={"cache-control": "no-store"})
    return _secured(r)


def _json(data: Any, status: int = 200) -> Response:
    return _secured(Response(orjson.dumps(data), status, media_type="application/json",
                             headers={"cache-control": "no-store"}))


class Console:
    """The ASGI app the controller serves: the console's routes, and the API behind a gate
    that turns a console session into the API's bearer token."""

    def __init__(self, api: ASGIApp, controller: Any, token: str) -> None:
        self.api = api
        self.controller = controller
        self.sessions = Sessions(token)
        self._bearer = f"Bearer {token}".encode()
        self._assets = {name: _asset(name) for name in ASSETS}
        self._index = _asset("index.html")
        self.pages = Starlette(routes=[
            Route("/", self.root),
            Route("/console", self.root),
            Route("/console/", self.index),
            Route("/console/login", self.login_form),
            Route("/console/login", self.login, methods=["POST"]),
            Route("/console/logout", self.logout, methods=["POST"]),
            Route("/console/static/{name}", self.static),
            Route("/console/api/session", self.session),
            Route("/console/api/rollouts/{rollout_id}/errors", self.rollout_errors),
        ])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        path: str = scope["path"]
        if path in {"/", "/console"} or path.startswith("/console/"):
            await self.pages(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        if b"authorization" not in headers:
            nonce = self.sessions.check(cookie_of(headers))
            if nonce is not None:
                why = csrf_refusal(self.sessions, nonce, scope["method"], headers,
                                   scope.get("scheme", "http"))
                if why is not None:
                    await _json({"error": why}, 403)(scope, receive, send)
                    return
                scope = dict(scope, headers=[*scope.get("headers", ()),
                                             (b"authorization", self._bearer)])
        await self.api(scope, receive, send)

    # -- helpers ------------------------------------------------------------------------------
    def _nonce(self, request: Request) -> str | None:
        return self.sessions.check(request.cookies.get(COOKIE))

    # -- routes -------------------------------------------------------------------------------
    async def root(self, _r: Request) -> Response:
        return RedirectResponse("/console/", 303)

    async def index(self, request: Request) -> Response:
        if self._nonce(request) is None:
            return RedirectResponse("/console/login", 303)
        return _secured(Response(self._index, media_type="text/html; charset=utf-8",
                                 headers={"cache-control": "no-store"}))

    async def login_form(self, request: Request) -> Response:
        if self._nonce(request) is not None:
            return RedirectResponse("/console/", 303)
        return _login_page()

    async def login(self, request: Request) -> Response:
        headers = dict(request.scope.get("headers", ()))
        if not same_origin(headers, request.url.scheme):
            return _login_page("Refused: the sign-in form must be posted from this console's "
                               "own page.", 403)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_LOGIN_BODY:
                return _login_page("Refused: the form is too large.", 413)
        given = parse_qs(raw.decode("utf-8", "replace")).get("token", [""])[0]
        if not self.sessions.token_matches(given):
            await asyncio.sleep(WRONG_TOKEN_DELAY_S)  # a guess costs time
            log.warning("console: sign-in with a wrong token from %s",
                        request.client.host if request.client else "?")
            return _login_page("Wrong token: that is not this controller's API token.", 401)
        cookie = self.sessions.issue()
        r = RedirectResponse("/console/", 303)
        r.set_cookie(COOKIE, cookie, max_age=int(self.sessions.lifetime_s), path="/",
                     httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return r

    async def logout(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is not None:
            why = csrf_refusal(self.sessions, nonce, "POST", dict(request.scope["headers"]),
                               request.url.scheme)
            if why is not None:
                return _json({"error": why}, 403)
        r = _json({"ok": True})
        r.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return r

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self._assets.get(name)
        if body is None:
            return _secured(Response("not found", 404, media_type="text/plain"))
        return _secured(Response(body, media_type=ASSETS[name],
                                 headers={"cache-control": "no-cache"}))

    async def session(self, request: Request) -> Response:
        nonce = self._nonce(request)
        if nonce is None:
            return _json({"error": "not signed in (or the session expired)"}, 401)
        cookie = request.cookies[COOKIE]
        return _json({"csrf": self.sessions.csrf(nonce),
                      "expires": self.sessions.expires(cookie)})

    async def rollout_errors(self, request: Request) -> Response:
        """The failed members' errors grouped per wave: {"waves": [{"wave": 1, "errors":
        [{"error": "...", "devices": 3}, ...]}, ...]}."""
        given = dict(request.scope["headers"]).get(b"authorization", b"")
        if self._nonce(request) is None and not secrets.compare_digest(given, self._bearer):
            return _json({"error": "not signed in (or the session expired)"}, 401)
        rid = request.path_params["rollout_id"]
        store = self.controller.store
        rollout = await run_in_threadpool(store.rollout, rid)
        if rollout is None:
            return _json({"error": f"no rollout {rid!r}"}, 404)
        waves = await run_in_threadpool(store.waves, rid)
        failed = await run_in_threadpool(store.failed_members, rid)
        return _json({"rollout_id": rid, "waves": group_errors(waves, failed)})


def group_errors(waves: list[dict[str, Any]],
                 failed: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Each failed member in the first wave whose share covers its bucket, errors counted."""
    thresholds = [int(w["threshold"]) for w in waves]
    grouped: list[dict[str, int]] = [{} for _ in thresholds]
    for b, err in failed:
        i = next((n for n, t in enumerate(thresholds) if b < t), len(thresholds) - 1)
        if i < 0:
            continue
        text = err or "(no error text)"
        grouped[i][text] = grouped[i].get(text, 0) + 1
    return [{"wave": n + 1, "errors": [{"error": e, "devices": k} for e, k in
                                        sorted(g.items(), key=lambda x: (-x[1], x[0]))]}
            for n, g in enumerate(grouped)]

