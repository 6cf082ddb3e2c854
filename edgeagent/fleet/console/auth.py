"""Console sessions: the API token typed once into a login form, then an HttpOnly cookie.

A session is a signed cookie (``nonce.expiry.mac``, HMAC-SHA256 under a key derived from the
API token), so any replica holding the same token accepts it and changing the token ends every
session. Requests that change something (POST, PUT, DELETE) made with the cookie must also
carry the session's CSRF token in ``X-CSRF-Token`` (an HMAC of the nonce, handed to the page
by ``GET /console/api/session``) and an ``Origin`` equal to the console's own; the cookie is
``SameSite=Strict`` besides. Requests with ``Authorization: Bearer`` are API clients and go
through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

COOKIE = "edgeagent_console"
SESSION_S = 12 * 3600
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Sessions:
    """Issues and checks console session cookies and their CSRF tokens."""

    def __init__(self, token: str, lifetime_s: float = SESSION_S) -> None:
        self._key = hashlib.sha256(b"edgeagent-console-session\0" + token.encode()).digest()
        self._token = token.encode()
        self.lifetime_s = lifetime_s

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        return secrets.compare_digest(given.strip().encode(), self._token)

    def issue(self, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.lifetime_s)
        body = f"{secrets.token_urlsafe(18)}.{expires}"
        return f"{body}.{self._mac(body)}"

    def check(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session's nonce when the cookie is genuine and unexpired, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        nonce, expires, mac = cookie.split(".")
        if not secrets.compare_digest(mac, self._mac(f"{nonce}.{expires}")):
            return None
        if not expires.isdigit() or int(expires) < (time.time() if now is None else now):
            return None
        return nonce

    def csrf(self, nonce: str) -> str:
        return self._mac(f"csrf:{nonce}")

    def expires(self, cookie: str) -> int:
        return int(cookie.split(".")[1])


def cookie_of(headers: Mapping[bytes, bytes]) -> str | None:
    """The console's session cookie in a request's ``Cookie`` header, if any."""
    raw = headers.get(b"cookie", b"").decode("latin-1")
    for part in raw.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


def same_origin(headers: Mapping[bytes, bytes], scheme: str) -> bool:
    """Whether the request's ``Origin`` is the console's own (scheme and Host header)."""
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    return bool(origin and host) and origin == f"{scheme}://{host}"


def csrf_refusal(sessions: Sessions, nonce: str, method: str, headers: Mapping[bytes, bytes],
                 scheme: str) -> str | None:
    """Why a cookie-authenticated request must be refused (None: it may go on)."""
    if method in SAFE_METHODS:
        return None
    if not same_origin(headers, scheme):
        return "refused: a console request that changes something must come from the console's " \
               "own origin (Origin header missing or foreign)"
    given = headers.get(CSRF_HEADER.encode(), b"").decode("latin-1")
    if not secrets.compare_digest(given.encode(), sessions.csrf(nonce).encode()):
        return "refused: missing or wrong X-CSRF-Token for this console session (reload the page)"
    return None
