"""System shared memory regions that local clients register (Triton's shared memory extension).

A client creates a POSIX shared memory object (``shm_open``, as
``tritonclient.utils.shared_memory`` does), registers a region of it under a name (key, offset,
byte size), and then names the region in a request's inputs and outputs instead of sending the
bytes. Both transports (HTTP and gRPC) use the one :class:`SharedMemoryRegistry` of the agent.

Every bound is checked where it enters:

- names are short printable text; keys are ``/NAME`` of one path segment (no ``..``, no other
  ``/``), opened under ``/dev/shm`` without following links, and only regular files are taken;
- the region (offset + byte size) must lie inside the object when it is registered, and a
  tensor's offset and size inside the region when it is used; the object's size is checked
  again on every use, so an object shrunk after registration is refused rather than read past
  its end (which would fault the process);
- a region in use by a request is leased: unregistering it takes it out of the registry at once,
  and its mapping is closed when the last request using it ends;
- the object is opened read-write (outputs are written into it); a permission error names the
  key. The number of regions is bounded (:data:`MAX_REGIONS`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeagent.errors import InferenceInputError

#: Where Linux keeps POSIX shared memory objects (``shm_open("/key")`` is ``/dev/shm/key``).
SHM_ROOT = Path("/dev/shm")  # noqa: S108 - not a temporary file: the objects clients name
#: Regions registered at once, at most (each holds a file descriptor and a mapping).
MAX_REGIONS = 256
_MAX_NAME = 255


class SharedMemoryError(InferenceInputError):
    """A shared memory request the agent refuses (bad name, key, bounds, or state): HTTP 400."""


class RegionNotFound(SharedMemoryError):
    """No region is registered under the name."""


class RegionExists(SharedMemoryError):
    """A region is already registered under the name."""


class RegionForbidden(SharedMemoryError):
    """The agent may not open the shared memory object (file permissions)."""


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor lives: a registered region's name, an offset in it, and a size."""

    region: str
    byte_size: int
    offset: int = 0


class MemoryRegion(Protocol):
    """What a request needs of a registered region, system or CUDA."""

    name: str
    kind: str

    def status(self) -> dict[str, object]: ...
    def acquire(self) -> None: ...
    def release(self) -> None: ...
    def retire(self) -> None: ...
    def view(self, ref: ShmRef, what: str) -> memoryview: ...
    def write(self, ref: ShmRef, data: np.ndarray, what: str) -> None: ...


class Leased:
    """A region's life: requests hold leases; taken out of the registry (:meth:`retire`), it is
    closed once the last lease ends. Subclasses say how to close (:meth:`_close`)."""

    def __init__(self) -> None:
        self._leases = 0
        self._retired = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._leases += 1

    def release(self) -> None:
        with self._lock:
            self._leases -= 1
            close = self._retired and self._leases == 0
        if close:
            self._close()

    def retire(self) -> None:
        """Taken out of the registry: close now if unused, else when the last lease ends."""
        with self._lock:
            self._retired = True
            close = self._leases == 0
        if close:
            self._close()

    def _close(self) -> None:
        raise NotImplementedError


class Region(Leased):
    """One registered region: an open descriptor and a mapping of ``[0, offset + byte_size)``."""

    kind = "system"

    def __init__(self, name: str, key: str, *, offset: int, byte_size: int, fd: int,
                 mapping: mmap.mmap) -> None:
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self._fd = fd
        self._mmap = mapping
        super().__init__()

    def status(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "offset": self.offset,
                "byte_size": self.byte_size}

    def _close(self) -> None:
        # Views handed out (numpy arrays over the mapping) may outlive the lease in a
        # garbage cycle; then the mapping is freed with them instead of here.
        with contextlib.suppress(BufferError):
            self._mmap.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _check(self, ref: ShmRef, what: str) -> int:
        """The absolute offset of ``ref`` in the object, after checking every bound."""
        if ref.offset < 0 or ref.byte_size < 0:
            raise SharedMemoryError(f"{what}: shared memory offset and byte size must not be "
                                    "negative")
        if ref.offset + ref.byte_size > self.byte_size:
            raise SharedMemoryError(
                f"{what}: offset {ref.offset} + byte size {ref.byte_size} is past the end of "
                f"shared memory region {self.name!r} ({self.byte_size} bytes)")
        start = self.offset + ref.offset
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:  # pragma: no cover - the descriptor is ours and open
            raise SharedMemoryError(f"{what}: region {self.name!r} cannot be read") from exc
        if start + ref.byte_size > size:
            raise SharedMemoryError(
                f"{what}: shared memory object {self.key!r} was shrunk to {size} bytes after "
                f"region {self.name!r} was registered; register it again")
        return start

    def view(self, ref: ShmRef, what: str) -> memoryview:
        """The bytes of ``ref`` (a view of the mapping: no copy)."""
        start = self._check(ref, what)
        return memoryview(self._mmap)[start:start + ref.byte_size]

    def write(self, ref: ShmRef, data: np.ndarray, what: str) -> None:
        """Copy ``data`` into ``ref``; it must fit."""
        start = self._check(ref, what)
        if data.nbytes > ref.byte_size:
            raise SharedMemoryError(
                f"{what}: takes {data.nbytes} bytes, more than the {ref.byte_size} bytes given "
                f"in shared memory region {self.name!r}")
        target = np.frombuffer(self._mmap, dtype=np.uint8, count=data.nbytes, offset=start)
        target[:] = np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _check_name(name: str) -> None:
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        raise SharedMemoryError(f"a shared memory region name is 1 to {_MAX_NAME} printable "
                                f"characters, got {name!r}")


def _key_path(key: str, root: Path) -> Path:
    bare = key[1:] if key.startswith("/") else key
    if (not bare or len(bare) > _MAX_NAME or "/" in bare or bare in (".", "..")
            or "\0" in bare or not bare.isprintable()):
        raise SharedMemoryError(
            f"a shared memory key is '/NAME' (one name, as shm_open takes it), got {key!r}")
    return root / bare


class SharedMemoryRegistry:
    """The regions registered by clients, by name (thread-safe; the one owner of them).

    System and CUDA regions share one namespace, as in Triton: a request names a region
    without saying its kind.
    """

    def __init__(self, root: Path = SHM_ROOT, max_regions: int = MAX_REGIONS) -> None:
        self._root = root
        self._max = max_regions
        self._regions: dict[str, MemoryRegion] = {}
        self._lock = threading.Lock()

    def _admit(self, name: str) -> None:
        """Refuse a name taken, or one region too many (call under the lock)."""
        if name in self._regions:
            raise RegionExists(f"shared memory region {name!r} is already registered; "
                               "unregister it first")
        if len(self._regions) >= self._max:
            raise SharedMemoryError(f"{self._max} shared memory regions are registered, the "
                                    "most the agent keeps; unregister some first")

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int,
                      byte_size: int) -> None:
        """Open a client's CUDA IPC handle as a region (the CUDA runtime is loaded now).

        Raises:
            SharedMemoryError: see :func:`edgeagent.runtime.cuda_shm.open_cuda_region`.
            RegionExists: the name is taken.
        """
        from edgeagent.runtime.cuda_shm import open_cuda_region

        _check_name(name)
        with self._lock:
            self._admit(name)
            self._regions[name] = open_cuda_region(name, raw_handle, device_id, byte_size)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open and map a region of the object ``key``.

        Raises:
            SharedMemoryError: a bad name or key, a region outside the object, too many regions.
            RegionExists: the name is taken.
            RegionForbidden: the agent may not open the object.
        """
        _check_name(name)
        path = _key_path(key, self._root)
        if offset < 0 or byte_size <= 0:
            raise SharedMemoryError(f"region {name!r}: offset must be >= 0 and byte_size > 0")
        with self._lock:
            self._admit(name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                raise SharedMemoryError(f"region {name!r}: no shared memory object {key!r} "
                                        "(create it with shm_open first)") from None
            except PermissionError:
                raise RegionForbidden(f"region {name!r}: the agent may not read and write the "
                                      f"shared memory object {key!r} (file permissions)") from None
            except OSError as exc:
                raise SharedMemoryError(f"region {name!r}: cannot open shared memory object "
                                        f"{key!r}: {exc.strerror}") from None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise SharedMemoryError(f"region {name!r}: {key!r} is not a shared memory "
                                            "object")
                if offset + byte_size > info.st_size:
                    raise SharedMemoryError(
                        f"region {name!r}: offset {offset} + byte_size {byte_size} is past the "
                        f"end of shared memory object {key!r} ({info.st_size} bytes)")
                mapping = mmap.mmap(fd, offset + byte_size)
            except BaseException:
                os.close(fd)
                raise
            self._regions[name] = Region(name, key, offset=offset, byte_size=byte_size, fd=fd,
                                         mapping=mapping)

    def unregister(self, name: str = "", kind: str = "system") -> None:
        """Unregister one region of ``kind`` (``""``: all of that kind). An unknown name is not
        an error (as Triton)."""
        with self._lock:
            names = [name] if name else list(self._regions)
            regions = [self._regions.pop(n) for n in names
                       if n in self._regions and self._regions[n].kind == kind]
        for region in regions:
            region.retire()

    def status(self, name: str = "", kind: str = "system") -> list[dict[str, object]]:
        """The registered regions of ``kind`` (``name``: that one only).

        Raises:
            RegionNotFound: ``name`` is not registered as a region of ``kind``.
        """
        with self._lock:
            if not name:
                return [r.status() for r in self._regions.values() if r.kind == kind]
            region = self._regions.get(name)
        if region is None or region.kind != kind:
            raise RegionNotFound(f"no {'CUDA ' if kind == 'cuda' else ''}shared memory region "
                                 f"{name!r} is registered")
        return [region.status()]

    @contextlib.contextmanager
    def lease(self, names: set[str]) -> Iterator[dict[str, MemoryRegion]]:
        """The named regions, held until the block ends (unregistering waits for it).

        Raises:
            RegionNotFound: a name is not registered.
        """
        held: dict[str, MemoryRegion] = {}
        try:
            with self._lock:
                for name in names:
                    region = self._regions.get(name)
                    if region is None:
                        raise RegionNotFound(f"no shared memory region {name!r} is registered "
                                             "(register it first)")
                    region.acquire()
                    held[name] = region
            yield held
        finally:
            for region in held.values():
                region.release()

    def close(self) -> None:
        self.unregister(kind="system")
        self.unregister(kind="cuda")
