"""The TUF side of the agent: refresh the hub's metadata and fetch verified files.

Wraps ``tuf.ngclient.Updater``: the trusted root provisioned with the config is the trust
anchor (later, root rotations are followed and cached under the metadata directory); every
refresh walks root -> timestamp -> snapshot -> targets and refuses replayed (older) metadata,
expired metadata, bad signatures and mismatched hashes or lengths. python-tuf's exceptions are
translated here into the agent's own (:class:`HubUnreachable`, :class:`MetadataExpired`,
:class:`~edgeagent.errors.VerificationError`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient.updater import Updater

from edgeagent.errors import HubError, HubTransientError, TransientError, VerificationError
from edgeagent.hub.bundle import Bundle, bundle_path, file_path, parse_bundle
from edgeagent.hub.fetcher import HubFetcher, Progress

log = logging.getLogger(__name__)

_BUNDLE = re.compile(r"^models/([A-Za-z0-9][A-Za-z0-9._-]*)/([1-9][0-9]*)/bundle\.json$")
_MAX_BUNDLE = 4 * 1024 * 1024


class HubUnreachable(HubTransientError):
    """The hub could not be reached, or a transfer from it failed on the way (network, server
    error, a stall, a deadline, a transfer that ended short): retry later. Never a verdict on a
    release."""


class MetadataExpired(VerificationError, TransientError):
    """The hub's metadata has expired (a frozen hub): keep serving, install nothing new."""


@dataclass(frozen=True)
class HubIndex:
    """The releases a verified refresh found: model name -> sorted versions."""

    versions: Mapping[str, tuple[int, ...]]

    def latest(self, name: str) -> int | None:
        found = self.versions.get(name, ())
        return found[-1] if found else None


class HubClient:
    """One hub: ``{url}/metadata/`` (TUF metadata) and ``{url}/targets/`` (bundles and files).

    Args:
        url: The hub's base URL (``https://``, ``http://`` or ``file://``).
        trusted_root: The provisioned root metadata (used until a newer root is cached).
        metadata_dir: Where the verified metadata is kept between runs.
        fetcher: Does the transfers.
    """

    def __init__(self, url: str, trusted_root: Path, metadata_dir: Path,
                 fetcher: HubFetcher) -> None:
        self.url = url.rstrip("/")
        self._root = trusted_root
        self._dir = metadata_dir
        self._fetcher = fetcher
        self._updater: Updater | None = None

    def refresh(self) -> HubIndex:
        """Fetch and verify the latest metadata; list the releases it signs.

        Raises:
            HubUnreachable, MetadataExpired, VerificationError, HubError.
        """
        self._dir.mkdir(parents=True, exist_ok=True)
        cached = self._dir / "root.json"
        try:
            bootstrap = None if cached.exists() else self._root.read_bytes()
        except OSError as exc:
            raise HubError(f"cannot read the hub's trusted root {self._root}: {exc.strerror} "
                           "(hub.root must name the root.json 'edgeconvert hub init' printed)"
                           ) from exc
        with _translated(self.url):
            updater = Updater(str(self._dir), f"{self.url}/metadata/", None,
                              f"{self.url}/targets/", self._fetcher, bootstrap=bootstrap)
            updater.refresh()
        self._updater = updater
        # ngclient persisted exactly the targets metadata it just verified.
        targets = Metadata[Targets].from_file(str(self._dir / "targets.json")).signed
        versions: dict[str, list[int]] = {}
        for path in targets.targets:
            match = _BUNDLE.match(path)
            if match:
                versions.setdefault(match.group(1), []).append(int(match.group(2)))
        return HubIndex({n: tuple(sorted(v)) for n, v in versions.items()})

    def _target(self, path: str) -> TargetFile:
        if self._updater is None:
            raise HubError("refresh() the hub before fetching from it")
        with _translated(self.url):
            info = self._updater.get_targetinfo(path)
        if info is None:
            raise HubError(f"{path} is not on the hub (not signed by its targets metadata)")
        return info

    def bundle(self, name: str, version: int) -> Bundle:
        """Download, verify and parse a release's bundle.json.

        Raises:
            HubError: no such release; VerificationError: bad content.
        """
        path = bundle_path(name, version)
        info = self._target(path)
        if info.length > _MAX_BUNDLE:
            raise VerificationError(f"{path}: {info.length} bytes is too large for a bundle")
        with _translated(self.url):
            data = self._fetcher.download_bytes(self.target_url(info), info.length)
            if len(data) < info.length:  # cut short: nothing to verify yet
                raise HubUnreachable(f"hub {self.url}: {path}: the transfer ended after "
                                     f"{len(data)} of {info.length} bytes")
            info.verify_length_and_hashes(data)
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise VerificationError(f"{path}: not JSON ({exc})") from exc
        bundle = parse_bundle(doc, name, version)
        for ref in bundle.files():
            signed = self._target(file_path(name, version, ref.file))
            if signed.length != ref.size or signed.hashes.get("sha256") != ref.sha256:
                raise VerificationError(
                    f"{path}: {ref.file} in the bundle does not match the file signed for this "
                    "release (a mix of releases)")
        return bundle

    def target_url(self, info: TargetFile) -> str:
        """Where a target lives: consistent snapshots prefix its name with its hash."""
        digest = info.hashes["sha256"]
        folder, _, base = info.path.rpartition("/")
        return f"{self.url}/targets/{folder}/{digest}.{base}"

    def download(self, name: str, version: int, file: str, partial: Path,
                 progress: Progress | None = None) -> TargetFile:
        """Download one release file into ``partial`` (resuming it), verified by its signed
        length and hash.

        Raises:
            HubUnreachable: a transient failure (what arrived is kept for resuming).
            VerificationError: the complete file does not match its signed hash, or the hub
                sent more than its signed length.
        """
        info = self._target(file_path(name, version, file))
        try:
            self._fetcher.download(self.target_url(info), partial, info.length,
                                   info.hashes["sha256"], progress)
        except HubTransientError as exc:
            if isinstance(exc, HubUnreachable):
                raise
            raise HubUnreachable(str(exc)) from exc
        return info


class _translated:
    """Translate python-tuf's exceptions into the agent's."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is None or isinstance(exc, HubError):
            return
        if isinstance(exc, tuf_exc.ExpiredMetadataError):
            raise MetadataExpired(
                f"hub {self.url}: its metadata has expired ({exc}); nothing new is installed "
                "until the hub is refreshed ('edgeconvert hub refresh')") from exc
        if isinstance(exc, tuf_exc.BadVersionNumberError):
            raise VerificationError(
                f"hub {self.url}: refused metadata older than what this box already trusts "
                f"(a replay/rollback): {exc}") from exc
        if isinstance(exc, tuf_exc.RepositoryError):
            raise VerificationError(f"hub {self.url}: verification failed: {exc}") from exc
        if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
            raise VerificationError(f"hub {self.url}: {exc}") from exc
        if isinstance(exc, tuf_exc.DownloadError):
            raise HubUnreachable(f"hub {self.url}: {exc}") from exc
        if isinstance(exc, OSError):
            raise HubError(f"hub metadata: {exc}") from exc
