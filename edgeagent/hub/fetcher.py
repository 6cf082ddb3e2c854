"""Fetching hub files: an ngclient fetcher over httpx (and plain files for ``file://`` hubs).

Metadata goes through :meth:`HubFetcher.fetch` (ngclient's interface: it enforces the length
limit and verifies). Model files go through :meth:`HubFetcher.download`: streamed into a
partial file with a length limit, hashed as they stream, resumed with an HTTP ``Range``
request when the connection is cut (within this call, and across restarts since the partial
file stays), and verified against the expected SHA-256 before the caller may move them into
the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from edgeagent import __version__
from edgeagent.errors import HubError, VerificationError

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
Hash = Any  # hashlib's _Hash is not public
#: Called with (bytes so far, total bytes) as a download streams.
Progress = Callable[[int, int], None]


class HubFetcher(FetcherInterface):
    """ngclient's fetcher over httpx, plus resumable verified downloads of large files.

    Args:
        timeout_s: Connect and read timeout.
        retries: Resume attempts after a cut connection, per download call.
        transport: An httpx transport (tests, Unix sockets); None = httpx's default.
    """

    def __init__(self, timeout_s: float = 30.0, retries: int = 3,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._client = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=True,
                                    headers={"User-Agent": f"edgeagent/{__version__}"})
        self._retries = retries

    def close(self) -> None:
        self._client.close()

    # ---- ngclient interface -------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith("file://"):
            return _file_chunks(_local_path(url), 0)
        request = self._client.build_request("GET", url)
        try:
            response = self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise tuf_exc.DownloadError(f"cannot reach {url}: {exc}") from exc
        if response.status_code != 200:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {response.status_code}",
                                            response.status_code)
        return _stream(response)

    # ---- large files --------------------------------------------------------------------

    def download(self, url: str, partial: Path, length: int, sha256: str,
                 progress: Progress | None = None) -> None:
        """Download ``url`` into ``partial`` and verify it, resuming what is already there.

        On return ``partial`` holds exactly ``length`` bytes whose SHA-256 is ``sha256``.

        Raises:
            HubError: the hub could not be reached, or the connection kept failing.
            VerificationError: the content is longer than ``length`` or its hash is wrong
                (the partial file is removed: resuming it could never succeed).
        """
        attempt = 0
        while True:
            have = partial.stat().st_size if partial.exists() else 0
            if have > length:
                partial.unlink()
                have = 0
            # Hash what is already there once; the rest is hashed as it streams in.
            digest = _sha256(partial, have)
            try:
                if have < length:
                    self._append(url, partial, digest, have, length, progress=progress)
                break
            except HubError as exc:
                if isinstance(exc, VerificationError):
                    partial.unlink(missing_ok=True)
                    raise
                attempt += 1
                if attempt > self._retries:
                    raise
                log.warning("download of %s interrupted (%s); resuming (attempt %d of %d)",
                            url, exc, attempt, self._retries)
                time.sleep(min(0.2 * attempt, 2.0))
        if digest.hexdigest() != sha256:
            partial.unlink()
            raise VerificationError(
                f"{url}: content hash {digest.hexdigest()[:16]}... differs from the signed "
                f"{sha256[:16]}... (tampered or corrupted file on the hub)"
            )

    def _append(self, url: str, partial: Path, digest: Hash, have: int, length: int, *,
                progress: Progress | None) -> None:
        if url.startswith("file://"):
            try:
                chunks = _file_chunks(_local_path(url), have)
            except tuf_exc.DownloadError as exc:
                raise HubError(str(exc)) from exc
            _write(chunks, partial, digest, have, length, progress=progress)
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code == 200 and have:
                    # The server ignores Range: start over (the next attempt asks for all).
                    partial.unlink()
                    raise HubError(f"{url}: the server does not resume (no Range support)")
                if response.status_code not in (200, 206):
                    raise HubError(f"{url}: HTTP {response.status_code}")
                _write(response.iter_bytes(), partial, digest, have, length,
                       progress=progress)
        except httpx.HTTPError as exc:
            raise HubError(f"{url}: {type(exc).__name__}: {exc}") from exc


def _write(chunks: Iterator[bytes], partial: Path, digest: Hash, have: int, length: int, *,
           progress: Progress | None) -> None:
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
        finally:
            # Whatever arrived stays on disk for the next resume.
            f.flush()
            os.fsync(f.fileno())
    if have < length:
        raise HubError(f"connection closed after {have} of {length} bytes")


def _stream(response: httpx.Response) -> Iterator[bytes]:
    try:
        yield from response.iter_bytes(_CHUNK)
    except httpx.HTTPError as exc:
        raise tuf_exc.DownloadError(f"{response.url}: {exc}") from exc
    finally:
        response.close()


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
