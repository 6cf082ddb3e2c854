"""The model store under ``state_dir/hub``: verified files by content hash, one folder per
installed version. Which versions are active, kept and failed is the version owner's history
(``state_dir/versions.json``), not the store's.

Layout (a contract, see ``docs/decisions.md``)::

    hub/metadata/              TUF metadata this box trusts (ngclient's cache)
    hub/downloads/SHA.part     downloads in progress (kept to resume; never served)
    hub/blobs/SHA              verified files, named by their SHA-256
    hub/models/NAME/VERSION/   an installed version: bundle.json, install.json and hard
                               links to the blobs it uses, under their release file names

Every write that matters is atomic: files are written, fsynced and renamed; a version folder
is built under a dot-name and renamed into place. A kill at any moment leaves the old or the
new state; :meth:`ModelStore.recover` sweeps the leftovers of an interrupted step (half-built
folders), never anything a state refers to.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgeagent.errors import HubError, VerificationError
from edgeagent.fsutil import fsync_dir
from edgeagent.hub.bundle import Bundle, Variant, parse_bundle

log = logging.getLogger(__name__)


class DiskUsage(Protocol):
    """What :func:`shutil.disk_usage` returns (the part the store reads)."""

    @property
    def free(self) -> int: ...


#: Reads a file system's usage (``shutil.disk_usage``; tests pass a fake).
DiskUsageReader = Callable[[Path], DiskUsage]


@dataclass(frozen=True)
class Installed:
    """An installed version: its bundle, the variant chosen for this box and why."""

    name: str
    version: int
    directory: Path
    bundle: Bundle
    variant: Variant
    reason: str

    @property
    def model_path(self) -> Path:
        return self.directory / self.variant.file


class ModelStore:
    """The files of hub models on this box (blocking I/O: call from an executor).

    Args:
        root: The store folder (``state_dir/hub``).
        disk_usage: Reads the free space of the store's file system.
    """

    def __init__(self, root: Path, disk_usage: DiskUsageReader = shutil.disk_usage) -> None:
        self.root = root
        self._disk_usage = disk_usage
        self.metadata_dir = root / "metadata"
        self.downloads = root / "downloads"
        self.blobs = root / "blobs"
        self.models = root / "models"

    # ---- files --------------------------------------------------------------------------

    def partial_path(self, sha256: str) -> Path:
        return self.downloads / f"{sha256}.part"

    def blob(self, sha256: str) -> Path | None:
        path = self.blobs / sha256
        return path if path.is_file() else None

    def commit_blob(self, partial: Path, sha256: str) -> Path:
        """Move a verified download into the blobs (same file system: an atomic rename)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        target = self.blobs / sha256
        os.replace(partial, target)
        fsync_dir(self.blobs)
        return target

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return int(self._disk_usage(self.root).free)

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for d in (self.blobs, self.downloads) if d.is_dir()
                   for p in d.iterdir() if p.is_file())

    # ---- versions -----------------------------------------------------------------------

    def installed_versions(self, name: str) -> list[int]:
        folder = self.models / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    def install(self, bundle_bytes: bytes, bundle: Bundle, variant: Variant,
                reason: str) -> Installed:
        """Make a version folder from blobs already in the store (atomically)."""
        folder = self.models / bundle.name
        final = folder / str(bundle.version)
        if final.is_dir():
            return self.installed(bundle.name, bundle.version)
        tmp = folder / f".{bundle.version}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for ref in (variant, *((bundle.checks,) if bundle.checks else ())):
            blob = self.blob(ref.sha256)
            if blob is None:
                raise HubError(f"{ref.file} ({ref.sha256[:16]}...) is not in the store")
            os.link(blob, tmp / ref.file)
        install = {"variant": variant.file, "reason": reason}
        for file, data in (("bundle.json", bundle_bytes),
                           ("install.json", json.dumps(install, indent=2).encode())):
            with (tmp / file).open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(folder)
        return self.installed(bundle.name, bundle.version)

    def add_variant(self, inst: Installed, variant: Variant, reason: str) -> Installed:
        """Link another variant of an installed version (its blob already in the store) into
        the version's folder; the install record keeps the variant chosen at install time."""
        target = inst.directory / variant.file
        if not target.is_file():
            blob = self.blob(variant.sha256)
            if blob is None:
                raise HubError(f"{variant.file} ({variant.sha256[:16]}...) is not in the store")
            tmp = inst.directory / f".{variant.file}.tmp"
            if tmp.exists():
                tmp.unlink()
            os.link(blob, tmp)
            os.replace(tmp, target)
            fsync_dir(inst.directory)
        return dataclasses.replace(inst, variant=variant, reason=reason)

    def installed(self, name: str, version: int) -> Installed:
        """An installed version, read back from its folder.

        Raises:
            HubError: not installed; VerificationError: its files do not read back.
        """
        folder = self.models / name / str(version)
        try:
            bundle = parse_bundle(json.loads((folder / "bundle.json").read_bytes()), name, version)
            install = json.loads((folder / "install.json").read_bytes())
        except FileNotFoundError:
            raise HubError(f"model {name} version {version} is not in the store") from None
        except (OSError, ValueError) as exc:
            raise VerificationError(f"{folder}: unreadable ({exc})") from exc
        variant = next((v for v in bundle.variants if v.file == install.get("variant")), None)
        if variant is None or not (folder / variant.file).is_file():
            raise VerificationError(f"{folder}: the chosen variant's file is missing")
        return Installed(name, version, folder, bundle, variant, str(install.get("reason", "")))

    # ---- housekeeping -------------------------------------------------------------------

    def recover(self) -> None:
        """Sweep what an interrupted step left: half-built version folders, temp files."""
        if self.models.is_dir():
            for model in self.models.iterdir():
                for leftover in model.glob(".*.tmp"):
                    log.info("removing %s, left by an interrupted install", leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
                for leftover in model.glob("*/.*.tmp"):  # a variant being added
                    leftover.unlink(missing_ok=True)
        for folder in (self.root, self.blobs):
            if folder.is_dir():
                for leftover in folder.glob(".*.tmp"):
                    leftover.unlink(missing_ok=True)

    def gc(self, keep: Mapping[str, Iterable[int]], keep_downloads: Iterable[str] = ()) -> int:
        """Remove version folders not in ``keep``, then blobs no folder links to, then stale
        downloads. Returns the bytes freed."""
        freed = 0
        if self.models.is_dir():
            for model in self.models.iterdir():
                wanted = set(keep.get(model.name, ()))
                for version in model.iterdir():
                    if version.name.isdigit() and int(version.name) not in wanted:
                        log.info("removing %s version %s from the store", model.name, version.name)
                        shutil.rmtree(version)
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                st = blob.stat()
                if st.st_nlink <= 1:  # no version folder links to it
                    freed += st.st_size
                    blob.unlink()
        wanted_downloads = {f"{sha}.part" for sha in keep_downloads}
        if self.downloads.is_dir():
            for part in self.downloads.iterdir():
                if part.name not in wanted_downloads:
                    freed += part.stat().st_size
                    part.unlink()
        return freed
