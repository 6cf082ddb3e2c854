"""The model store under ``state_dir/hub``: verified files by content hash, one folder per
installed version, and the active-version state.

Layout (a contract, see ``docs/decisions.md``)::

    hub/metadata/              TUF metadata this box trusts (ngclient's cache)
    hub/downloads/SHA.part     downloads in progress (kept to resume; never served)
    hub/blobs/SHA              verified files, named by their SHA-256
    hub/models/NAME/VERSION/   an installed version: bundle.json, install.json and hard
                               links to the blobs it uses, under their release file names
    hub/state.json             active, previous, requested, desired and failed versions
    hub/.state.lock            serialises read-modify-write of state.json (flock)

Every write that matters is atomic: files are written, fsynced and renamed; a version folder
is built under a dot-name and renamed into place; ``state.json`` is replaced whole. A kill at
any moment leaves the old or the new state; :meth:`ModelStore.recover` sweeps the leftovers of
an interrupted step (half-built folders), never anything a state refers to.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgeagent.errors import HubError, VerificationError
from edgeagent.hub.bundle import Bundle, Variant, parse_bundle

log = logging.getLogger(__name__)

STATE_SCHEMA = 1


@dataclass
class ModelState:
    """What the box runs of one hub model."""

    active: int | None = None
    previous: list[int] = field(default_factory=list)
    """Older versions kept for rollback, newest first."""
    requested: int | None = None
    """A version an operator asked for (pull/rollback), not yet activated."""
    failed: dict[int, str] = field(default_factory=dict)
    """Versions that failed to activate here, with why: not retried unless asked for."""
    desired: int | None = None
    """A pinned version (fleet desired state, ``pull NAME@V``, rollback) that overrides the
    configured ``version``; None follows the configuration."""

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "previous": self.previous, "requested": self.requested,
                "desired": self.desired,
                "failed": {str(k): v for k, v in self.failed.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelState:
        return cls(data.get("active"), list(data.get("previous", [])), data.get("requested"),
                   {int(k): str(v) for k, v in data.get("failed", {}).items()},
                   data.get("desired"))


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the folder: the file is either old or new after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _replace_with(state: ModelState, new: ModelState) -> None:
    state.__dict__.update(new.__dict__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """The files and state of hub models on this box (blocking I/O: call from an executor).

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
        self.state_file = root / "state.json"

    # ---- state --------------------------------------------------------------------------

    def read_state(self) -> dict[str, ModelState]:
        try:
            doc = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise HubError(f"{self.state_file}: unreadable ({exc}); move it aside to start over"
                           ) from exc
        return {n: ModelState.from_dict(m) for n, m in doc.get("models", {}).items()}

    def write_state(self, state: Mapping[str, ModelState]) -> None:
        doc = {"schema": STATE_SCHEMA, "models": {n: s.to_dict() for n, s in sorted(state.items())}}
        write_atomic(self.state_file, json.dumps(doc, indent=2).encode())

    def model_state(self, name: str) -> ModelState:
        return self.read_state().get(name, ModelState())

    def update_state(self, name: str, state: ModelState) -> None:
        """Replace one model's state whole (prefer :meth:`modify`, which cannot lose a
        concurrent change)."""
        self.modify(name, lambda s: _replace_with(s, state))

    def modify(self, name: str, change: Callable[[ModelState], None]) -> ModelState:
        """Read one model's state, apply ``change`` to it and write it back, atomically and
        under an exclusive lock, so two writers (the poll loop, the load endpoint, an operator's
        ``edgeagent pull`` in another process) never lose each other's changes.

        Returns:
            The state as written.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".state.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
            everything = self.read_state()
            state = everything.get(name, ModelState())
            change(state)
            everything[name] = state
            self.write_state(everything)
            return state
        finally:
            os.close(fd)

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
        _fsync_dir(self.blobs)
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
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(folder)
        return self.installed(bundle.name, bundle.version)

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
