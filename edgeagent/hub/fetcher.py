"""Fetching hub files: an ngclient fetcher over httpx (and plain files for ``file://`` hubs).

Metadata goes through :meth:`HubFetcher.fetch` (ngclient's interface: it enforces the length
limit and verifies). Model files go through :meth:`HubFetcher.download`: streamed into a
partial file with a length limit, hashed as they stream, resumed with an HTTP ``Range``
request when the connection is cut (within this call, and across restarts since the partial
file stays), and verified against the expected SHA-256 before the caller may move them into
the store.

Every transfer has a deadline as a whole, not only per read (:class:`TransferLimits`): a file
may take ``hub.file_timeout_s`` plus its size at ``hub.min_rate_bytes_s``, and in any window of
``timeout_s`` it must move at least that rate, so a hub trickling a byte a second is cut off
within a window instead of holding the sync for as long as it likes. The deadline is hard: a
timer shuts the socket down even while the response's headers are still trickling in.

Transient failures (connect errors, resets, timeouts, HTTP 5xx and 429, a stall, a transfer
that ended short) are retried with exponential backoff and jitter, ``hub.retries`` times, and
raised as :class:`~edgeagent.errors.HubTransientError` (for metadata: ngclient's
``DownloadError``, which the client translates into the same). Only a complete file whose
hash is wrong, or a file longer than signed, is a
:class:`~edgeagent.errors.VerificationError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from edgeagent import __version__
from edgeagent.config import HubSection
from edgeagent.errors import HubTransientError, VerificationError

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
Hash = Any  # hashlib's _Hash is not public
#: Called with (bytes so far, total bytes) as a download streams.
Progress = Callable[[int, int], None]

#: Most bytes of one metadata file (or bundle.json) held in memory; ngclient's own limits are
#: far lower (timestamp 16 KiB, root 512 KiB, snapshot and targets 2 MiB by default).
_MAX_METADATA = 64 << 20
#: Longest wait between two attempts.
_MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class TransferLimits:
    """Deadlines and retries for hub transfers (``[hub]``).

    The defaults suit a large model on a Raspberry Pi behind a slow mobile link: 16 KiB/s
    (128 kbit/s, below what EDGE or a weak 3G cell sustains) gives a 1 GB model about 18 hours
    before its deadline, while a hub that trickles or stalls is cut off within a minute or so.
    """

    timeout_s: float = 30.0
    """Connect timeout, each read's timeout, and the window the minimum rate is measured on."""
    file_timeout_s: float = 300.0
    """Each file may take this long plus its size at ``min_rate_bytes_s``."""
    min_rate_bytes_s: int = 16 * 1024
    """Slowest transfer kept going, measured over each ``timeout_s`` window."""
    retries: int = 5
    """Further attempts after a transient failure (each resumes what already arrived)."""
    backoff_s: float = 1.0
    """Delay before the first retry; doubled for each further one (with jitter, 60 s at most)."""

    @classmethod
    def from_section(cls, hub: HubSection) -> TransferLimits:
        return cls(hub.timeout_s, hub.file_timeout_s, hub.min_rate_bytes_s, hub.retries)

    def deadline_s(self, size: int) -> float:
        """Seconds a transfer of ``size`` bytes may take as a whole."""
        return self.file_timeout_s + size / self.min_rate_bytes_s

    def backoff(self, attempt: int) -> float:
        """The jittered delay before retry number ``attempt`` (1, 2, ...)."""
        base = min(_MAX_BACKOFF_S, self.backoff_s * 2.0 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security


class _Watch:
    """One transfer's deadline and minimum rate, checked as bytes arrive, with a timer that
    shuts the socket down at the deadline (for a peer that trickles its headers, or holds a
    read just under the read timeout)."""

    def __init__(self, url: str, limits: TransferLimits, seconds: float, have: int = 0) -> None:
        self.url, self.limits = url, limits
        self.started = time.monotonic()
        self.seconds = seconds
        self.deadline = self.started + seconds
        self.window_start, self.window_bytes = self.started, have
        self.expired = False
        self.cancelled = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._timer: threading.Timer | None = None

    def extend(self, seconds: float) -> None:
        """Move the deadline to ``seconds`` after the start (the size became known)."""
        self.seconds, self.deadline = seconds, self.started + seconds

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: remember the connection's socket (TCP, then TLS)."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with self._lock:
                    self._sock = sock

    def __enter__(self) -> _Watch:
        self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closed = True
            timer = self._timer
        if timer is not None:
            timer.cancel()
            timer.join()

    def _arm(self) -> None:
        timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._fire)
        timer.daemon = True
        timer.name = "edgeagent-hub-deadline"
        self._timer = timer
        timer.start()

    def cut(self) -> None:
        """End the transfer now (from another thread): as if its deadline had passed."""
        with self._lock:
            self.deadline = time.monotonic()
            self.cancelled = True
        self._fire()

    def _fire(self) -> None:
        with self._lock:
            if self._closed:
                return
            if time.monotonic() < self.deadline:  # extended meanwhile
                self._arm()
                return
            self.expired = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread

    def error(self, have: int, size: int) -> HubTransientError:
        if self.cancelled:
            return HubTransientError(f"{self.url}: cancelled (the agent is stopping); {have} of "
                                     f"{size} bytes arrived, kept for resuming")
        return HubTransientError(
            f"{self.url}: not complete within its deadline ({self.seconds:.0f} s: "
            f"hub.file_timeout_s plus its size at hub.min_rate_bytes_s); {have} of {size} "
            "bytes arrived, kept for resuming")

    def check(self, have: int, size: int) -> None:
        """Raise once past the deadline, or when the last window moved too little."""
        now = time.monotonic()
        if self.expired or now >= self.deadline:
            raise self.error(have, size)
        elapsed = now - self.window_start
        if elapsed >= self.limits.timeout_s:
            rate = (have - self.window_bytes) / elapsed
            if rate < self.limits.min_rate_bytes_s:
                raise HubTransientError(
                    f"{self.url}: {rate:.0f} bytes/s over the last {elapsed:.0f} s, below "
                    f"hub.min_rate_bytes_s ({self.limits.min_rate_bytes_s}); {have} of {size} "
                    "bytes arrived")
            self.window_start, self.window_bytes = now, have


def _transient_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


class HubFetcher(FetcherInterface):
    """ngclient's fetcher over httpx, plus resumable verified downloads of large files.

    Args:
        timeout_s: Connect and read timeout (``limits.timeout_s`` when ``limits`` is given).
        retries: Attempts after a transient failure (``limits.retries`` likewise).
        transport: An httpx transport (tests, Unix sockets); None = httpx's default.
        limits: Deadlines, minimum rate and retries; None = the defaults with ``timeout_s``
            and ``retries``.
        sleep: Waits between attempts (tests pass a fake); None = a wait that
            :meth:`cancel` cuts short.
    """

    def __init__(self, timeout_s: float = 30.0, retries: int = 5,
                 transport: httpx.BaseTransport | None = None, *,
                 limits: TransferLimits | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.limits = limits or TransferLimits(timeout_s=timeout_s, retries=retries)
        # No keep-alive: each transfer gets a connection of its own, whose socket the deadline
        # timer can shut down (a pooled one would be shared with the next transfer).
        self._client = httpx.Client(timeout=self.limits.timeout_s, transport=transport,
                                    follow_redirects=True,
                                    limits=httpx.Limits(max_keepalive_connections=0),
                                    headers={"User-Agent": f"edgeagent/{__version__}"})
        self._retries = self.limits.retries
        self._cancelled = threading.Event()
        self._sleep = sleep or self._wait
        self._watches: set[_Watch] = set()
        self._watches_lock = threading.Lock()

    @classmethod
    def from_section(cls, hub: HubSection,
                     transport: httpx.BaseTransport | None = None) -> HubFetcher:
        """A fetcher with the deadlines, minimum rate and retries of ``[hub]``."""
        return cls(transport=transport, limits=TransferLimits.from_section(hub))

    def close(self) -> None:
        self._client.close()

    def cancel(self) -> None:
        """End what runs now and what follows, from any thread (at shutdown): waits between
        attempts end at once, and transfers in progress are cut (their sockets shut down), each
        raising :class:`~edgeagent.errors.HubTransientError`. What arrived stays for resuming."""
        self._cancelled.set()
        with self._watches_lock:
            watches = list(self._watches)
        for watch in watches:
            watch.cut()

    def _wait(self, seconds: float) -> None:
        self._cancelled.wait(seconds)

    def _check_cancelled(self, url: str) -> None:
        if self._cancelled.is_set():
            raise HubTransientError(f"{url}: cancelled (the agent is stopping)")

    @contextlib.contextmanager
    def _watching(self, url: str, seconds: float, have: int = 0) -> Iterator[_Watch]:
        self._check_cancelled(url)
        with _Watch(url, self.limits, seconds, have) as watch:
            with self._watches_lock:
                self._watches.add(watch)
            try:
                yield watch
            finally:
                with self._watches_lock:
                    self._watches.discard(watch)

    # ---- ngclient interface -------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        """The whole file, fetched with retries: metadata is small, and a file held in memory
        can be fetched again from the start when a transfer fails halfway.

        Raises:
            tuf_exc.DownloadHTTPError: a status that is no transient failure (403, 404: what
                ngclient looks for when it probes for a newer root), or one that stayed.
            tuf_exc.DownloadError: the transfer kept failing.
        """
        if url.startswith("file://"):
            return _file_chunks(_local_path(url), 0)
        attempt = 0
        while True:
            try:
                return iter([self._get_all(url)])
            except tuf_exc.DownloadHTTPError as exc:
                if not _transient_status(exc.status_code):
                    raise
                error: tuf_exc.DownloadError = exc
            except tuf_exc.DownloadError as exc:
                error = exc
            attempt += 1
            if attempt > self._retries or self._cancelled.is_set():
                raise error
            delay = self.limits.backoff(attempt)
            log.warning("hub metadata %s: %s; retrying in %.1f s (attempt %d of %d)",
                        url, error, delay, attempt, self._retries)
            self._sleep(delay)

    def _get_all(self, url: str) -> bytes:
        # The size is not known before the headers: the deadline starts as a small file's
        # and is extended to the Content-Length's once it is known.
        with self._watching(url, self.limits.deadline_s(0)) as watch:
            try:
                with self._client.stream("GET", url, extensions={"trace": watch.trace}) as r:
                    if r.status_code != 200:
                        raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {r.status_code}",
                                                        r.status_code)
                    size = _content_length(r) or 0
                    watch.extend(self.limits.deadline_s(size))
                    parts, have = [], 0
                    for chunk in r.iter_bytes():  # as it arrives: the watch sees every read
                        parts.append(chunk)
                        have += len(chunk)
                        if have > _MAX_METADATA:
                            break  # ngclient refuses it for its length
                        watch.check(have, size)
                    return b"".join(parts)
            except HubTransientError as exc:
                raise tuf_exc.DownloadError(str(exc)) from exc
            except httpx.HTTPError as exc:
                if watch.expired:
                    raise tuf_exc.DownloadError(str(watch.error(0, 0))) from exc
                raise tuf_exc.DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc

    # ---- large files --------------------------------------------------------------------

    def download(self, url: str, partial: Path, length: int, sha256: str,
                 progress: Progress | None = None) -> None:
        """Download ``url`` into ``partial`` and verify it, resuming what is already there.

        On return ``partial`` holds exactly ``length`` bytes whose SHA-256 is ``sha256``.

        The whole call has one deadline (:meth:`TransferLimits.deadline_s` of what is left to
        fetch), over all its attempts; past it, what arrived stays for the next call.

        Raises:
            HubTransientError: the hub could not be reached, the transfer stalled or passed
                its deadline, or the connection kept failing (what arrived is kept).
            VerificationError: the content is longer than ``length``, or the complete file's
                hash is wrong (the partial file is removed: resuming it could never succeed).
        """
        attempt = 0
        start = partial.stat().st_size if partial.exists() else 0
        overall = time.monotonic() + self.limits.deadline_s(max(0, length - start))
        while True:
            have = partial.stat().st_size if partial.exists() else 0
            if have > length:
                partial.unlink()
                have = 0
            # Hash what is already there once; the rest is hashed as it streams in.
            digest = _sha256(partial, have)
            try:
                if have < length:
                    self._append(url, partial, digest, have, length, progress=progress,
                                 deadline=overall)
                break
            except VerificationError:
                partial.unlink(missing_ok=True)
                raise
            except HubTransientError as exc:
                attempt += 1
                delay = self.limits.backoff(attempt)
                if (attempt > self._retries or time.monotonic() + delay >= overall
                        or self._cancelled.is_set()):
                    raise
                log.warning("download of %s interrupted (%s); resuming in %.1f s (attempt %d "
                            "of %d)", url, exc, delay, attempt, self._retries)
                self._sleep(delay)
        if digest.hexdigest() != sha256:
            partial.unlink()
            raise VerificationError(
                f"{url}: content hash {digest.hexdigest()[:16]}... differs from the signed "
                f"{sha256[:16]}... (tampered or corrupted file on the hub)"
            )

    def _append(self, url: str, partial: Path, digest: Hash, have: int, length: int, *,
                progress: Progress | None, deadline: float) -> None:
        if url.startswith("file://"):
            try:
                chunks = _file_chunks(_local_path(url), have)
            except tuf_exc.DownloadError as exc:
                raise HubTransientError(str(exc)) from exc
            _write(chunks, partial, digest, have, length, progress=progress, watch=None)
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        # This attempt's deadline is the whole call's, whichever attempt it is.
        with self._watching(url, max(0.0, deadline - time.monotonic()), have) as watch:
            try:
                with self._client.stream("GET", url, headers=headers,
                                         extensions={"trace": watch.trace}) as response:
                    if response.status_code == 200 and have:
                        # The server ignores Range: start over (the next attempt asks for all).
                        partial.unlink()
                        raise HubTransientError(
                            f"{url}: the server does not resume (no Range support)")
                    if response.status_code not in (200, 206):
                        raise HubTransientError(f"{url}: HTTP {response.status_code}")
                    _write(response.iter_bytes(), partial, digest, have, length,
                           progress=progress, watch=watch)
            except httpx.HTTPError as exc:
                if watch.expired:
                    arrived = partial.stat().st_size if partial.exists() else 0
                    raise watch.error(arrived, length) from exc
                raise HubTransientError(f"{url}: {type(exc).__name__}: {exc}") from exc


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


def _write(chunks: Iterator[bytes], partial: Path, digest: Hash, have: int, length: int, *,
           progress: Progress | None, watch: _Watch | None) -> None:
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("r+b" if have else "wb") as f:
        f.truncate(have)
        f.seek(have)
        try:
            for chunk in chunks:
                have += len(chunk)
                if have > length:
                    raise VerificationError(
                        f"{partial.name}: the hub sent more than the signed {length} bytes")
                f.write(chunk)
                digest.update(chunk)
                if progress is not None:
                    progress(have, length)
                if watch is not None and have < length:
                    watch.check(have, length)
        finally:
            # Whatever arrived stays on disk for the next resume.
            f.flush()
            os.fsync(f.fileno())
    if have < length:
        raise HubTransientError(f"connection closed after {have} of {length} bytes")


def _local_path(url: str) -> Path:
    return Path(unquote(urlparse(url).path))


def _file_chunks(path: Path, offset: int) -> Iterator[bytes]:
    try:
        f = path.open("rb")
    except FileNotFoundError as exc:
        raise tuf_exc.DownloadHTTPError(f"{path}: no such file", 404) from exc
    except OSError as exc:
        raise tuf_exc.DownloadError(f"{path}: {exc.strerror}") from exc

    def chunks() -> Iterator[bytes]:
        with f:
            f.seek(offset)
            while block := f.read(_CHUNK):
                yield block

    return chunks()


def _sha256(path: Path, length: int) -> Hash:
    h = hashlib.sha256()
    if length:
        with path.open("rb") as f:
            while length and (block := f.read(min(1 << 20, length))):
                h.update(block)
                length -= len(block)
    return h
