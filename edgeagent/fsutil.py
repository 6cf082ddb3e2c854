"""Durable file writes: the one helper every state file goes through (DESIGN 3.6).

``write_atomic`` writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the folder, so after a power cut at any moment the file is either the old or
the new one, never a mix, and the rename itself is on disk. ``locked`` serialises
read-modify-write cycles between processes (the agent and an operator's command) with flock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename or a new file in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write, fsync, rename, fsync the folder: the file is either old or new after a crash.

    The file is created with ``mode`` (before the umask), so a secret is never readable by
    others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, doc: Any) -> None:
    """:func:`write_atomic` of a JSON document (indented: these files are read by people)."""
    write_atomic(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_file`` (created if missing) for the block."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def unix_socket(path: Path | None) -> Iterator[None]:
    """Around binding a Unix socket at ``path`` (the HTTP, metrics and gRPC listeners): its
    folder made, a socket a killed run left there removed, the socket created for its owner
    and group only (umask 0o117 meanwhile, so there is no moment with wider permissions) and
    set to 0o660 once bound. With ``path`` None (a TCP listener) it does nothing.

    Raises:
        OSError: the folder cannot be made, or what is at ``path`` cannot be removed.
    """
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    old_umask = os.umask(0o117)
    try:
        yield
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
