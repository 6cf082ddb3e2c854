"""HTTP content coding of inference bodies: ``gzip`` and ``deflate`` requests
(``Content-Encoding``) and responses (``Accept-Encoding``), as Triton's HTTP endpoint takes and
gives them.

A compressed body is inflated in bounded steps, so no more than ``http.max_request_bytes`` is
ever allocated for it: a small body that inflates past the limit (a "zip bomb") is refused with
413 as soon as the limit is crossed.
"""

from __future__ import annotations

import zlib

from edgeagent.api.errors import BadRequest, PayloadTooLarge

#: zlib's ``wbits`` for each content coding (gzip header; zlib header, as RFC 9110 says
#: ``deflate`` means; raw deflate is tried too, as some clients send it).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_STEP = 1 << 20


def decompress(body: bytes | bytearray, encoding: str, limit: int) -> bytes:
    """The body, decoded from ``Content-Encoding`` (``identity``, ``gzip`` or ``deflate``).

    Raises:
        BadRequest: an unknown coding, or data that does not decode.
        PayloadTooLarge: the decoded body exceeds ``limit`` bytes.
    """
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return bytes(body)
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    try:
        return _inflate(body, wbits, limit)
    except zlib.error:
        if coding != "deflate":
            raise BadRequest(f"the body is not valid {coding} data") from None
    try:
        return _inflate(body, -zlib.MAX_WBITS, limit)  # raw deflate
    except zlib.error:
        raise BadRequest("the body is not valid deflate data") from None


def _inflate(body: bytes | bytearray, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    parts: list[bytes] = []
    size = 0
    data: bytes | bytearray = body
    while True:
        chunk = d.decompress(data, min(_STEP, limit + 1 - size))
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body inflates past http.max_request_bytes ({limit} "
                                  "bytes)")
        parts.append(chunk)
        data = d.unconsumed_tail
        if d.eof or (not data and not chunk):
            break
    if not d.eof:
        raise zlib.error("truncated")
    return b"".join(parts)


def compress(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    """The response body in the first coding of ``Accept-Encoding`` that the agent has
    (``gzip``, ``deflate``), with its name; the body as it is (and ``None``) otherwise."""
    for part in accept_encoding.split(","):
        coding, _, params = part.strip().lower().partition(";")
        q = params.strip()
        if q.startswith("q=") and _quality(q[2:]) == 0:
            continue
        coding = coding.strip()
        if coding in ("gzip", "x-gzip"):
            c = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            return c.compress(body) + c.flush(), "gzip"
        if coding == "deflate":
            return zlib.compress(body, 1), "deflate"
    return body, None


def _quality(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0
