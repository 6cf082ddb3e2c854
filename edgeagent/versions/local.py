"""``path`` models as versions: each distinct content of the configured file is one local version.

The first time the agent sees a content (at start-up, on SIGHUP after the file was replaced in
place) it copies the file into ``state_dir/local/NAME/VERSION/FILE``, hashing while it copies,
and numbers it one above the newest local version of that model. Those kept copies are what
serves and what a rollback goes back to, so rollback works for local models as for hub models
and survives a restart, and replacing the configured file never changes a loaded version under
its feet. Blocking I/O: the owner calls these from an executor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from edgeagent.config import ModelSection
from edgeagent.errors import ModelError, ModelNotFound
from edgeagent.fsutil import fsync_dir
from edgeagent.runtime.inspect import sha256_file
from edgeagent.runtime.manager import ModelSource

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024


class LocalFiles:
    """The kept copies of ``path`` models under ``state_dir/local``.

    Args:
        state_dir: The agent's state directory.
        base_dir: What a relative ``path`` is relative to (the config file's folder).
    """

    def __init__(self, state_dir: Path, base_dir: Path) -> None:
        self.root = state_dir / "local"
        self.base_dir = base_dir
        # path -> (size, mtime, inode) and the hash it had: a file is hashed again only when
        # it changed, not on every poll pass.
        self._hashed: dict[Path, tuple[tuple[int, int, int], str]] = {}

    def configured_path(self, section: ModelSection) -> Path:
        path = Path(section.path)
        return path if path.is_absolute() else self.base_dir / path

    def _folder(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def kept(self, name: str, version: int) -> Path | None:
        folder = self._folder(name, version)
        if not folder.is_dir():
            return None
        files = [p for p in folder.iterdir() if not p.name.startswith(".")]
        return files[0] if len(files) == 1 else None

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if p.name.isdigit() and self.kept(name, int(p.name)) is not None)

    def current(self, section: ModelSection, known: dict[int, str]) -> tuple[int, str]:
        """The local version the configured file holds now: a known one, or a new one (copied).

        Args:
            section: The model's configuration.
            known: version -> SHA-256 of the versions recorded so far.

        Returns:
            (version, sha256); a version not in ``known`` is new and its copy is in place.

        Raises:
            ModelError: the file cannot be read.
        """
        path = self.configured_path(section)
        name = section.name
        sha = self._sha256(path)
        for version, known_sha in known.items():
            if known_sha == sha and self.kept(name, version) is not None:
                return version, sha
        version = max([0, *known, *self.versions(name)]) + 1
        folder = self._folder(name, version)
        tmp = folder.with_name(f".{version}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as src, (tmp / path.name).open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"cannot read {path}: {exc.strerror}") from exc
        fsync_dir(tmp)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        copied = digest.hexdigest()
        if copied != sha:
            log.warning("model %s: %s changed while it was copied; keeping what was read", name,
                        path)
        log.info("model %s: %s is local version %d", name, path, version)
        return version, copied

    def _sha256(self, path: Path) -> str:
        try:
            st = path.stat()
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc.strerror}") from exc
        signature = (st.st_size, st.st_mtime_ns, st.st_ino)
        cached = self._hashed.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        sha = sha256_file(path)
        self._hashed[path] = (signature, sha)
        return sha

    def source(self, name: str, version: int, sha256: str) -> ModelSource:
        """The manager's view of a kept local version.

        Raises:
            ModelNotFound: no such local version is kept.
        """
        path = self.kept(name, version)
        if path is None:
            raise ModelNotFound(f"model {name!r} has no local version {version} "
                                f"(kept: {', '.join(map(str, self.versions(name))) or 'none'})")
        return ModelSource(path, version, "auto", origin="path", sha256=sha256)

    def collect(self, name: str, keep: Iterable[int]) -> None:
        """Remove the kept copies of ``name`` not in ``keep``."""
        wanted = set(keep)
        for version in self.versions(name):
            if version not in wanted:
                shutil.rmtree(self._folder(name, version), ignore_errors=True)

