"""CUDA shared memory regions (Triton's CUDA shared memory extension): device memory that a
local client exported with ``cudaIpcGetMemHandle``, opened here with ``cudaIpcOpenMemHandle``.

The CUDA runtime is loaded with ctypes only when a client registers a CUDA region, so a box
without a GPU never loads it (and answers such a registration with a clear error). Inputs are
copied from the device to a host buffer before the run and outputs from the host to the device
after it: the backends take host arrays. Where the CUDA driver library is present, the
registered size is checked against the device allocation behind the handle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from typing import Any

import numpy as np

from edgeagent.runtime.shm import Leased, SharedMemoryError, ShmRef

#: ``cudaIpcMemHandle_t`` is 64 opaque bytes.
IPC_HANDLE_BYTES = 64
_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_H2D, _D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class CudaRuntime:
    """The few CUDA runtime calls CUDA shared memory needs, through ctypes."""

    def __init__(self, lib: Any, driver: Any | None) -> None:
        self._lib = lib
        self._driver = driver
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle,
                                             ctypes.c_uint]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                   ctypes.c_int]
        lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        self._lock = threading.Lock()

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            message = self._lib.cudaGetErrorString(status).decode(errors="replace")
            raise SharedMemoryError(f"{what}: CUDA error {status}: {message}")

    def open(self, handle: bytes, device_id: int) -> int:
        """The device pointer of an exported allocation, opened on ``device_id``."""
        ptr = ctypes.c_void_p()
        with self._lock:  # cudaSetDevice is per thread; keep set-and-open together
            self._check(self._lib.cudaSetDevice(device_id), f"device {device_id}")
            self._check(self._lib.cudaIpcOpenMemHandle(
                ctypes.byref(ptr), _IpcHandle(handle), _LAZY_PEER_ACCESS),
                "cudaIpcOpenMemHandle")
        return int(ptr.value or 0)

    def allocation_size(self, ptr: int) -> int | None:
        """Bytes from ``ptr`` to the end of its device allocation (None: no driver library)."""
        if self._driver is None:
            return None
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        status = self._driver.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size),
                                                      ctypes.c_uint64(ptr))
        if status != 0:
            return None
        return int(base.value + size.value - ptr)

    def close(self, ptr: int) -> None:
        self._lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr))

    def to_host(self, ptr: int, size: int, device_id: int) -> bytearray:
        out = bytearray(size)
        buf = (ctypes.c_char * size).from_buffer(out)
        with self._lock:
            self._check(self._lib.cudaSetDevice(device_id), f"device {device_id}")
            self._check(self._lib.cudaMemcpy(ctypes.addressof(buf), ctypes.c_void_p(ptr), size,
                                             _D2H), "copying from the device")
        return out

    def to_device(self, ptr: int, data: np.ndarray, device_id: int) -> None:
        src = np.ascontiguousarray(data)
        with self._lock:
            self._check(self._lib.cudaSetDevice(device_id), f"device {device_id}")
            self._check(self._lib.cudaMemcpy(ctypes.c_void_p(ptr),
                                             ctypes.c_void_p(src.ctypes.data), src.nbytes, _H2D),
                        "copying to the device")


def cuda_runtime() -> CudaRuntime:
    """The CUDA runtime, loaded once (a box without one is told so once, then from memory).

    Raises:
        SharedMemoryError: no CUDA runtime library on this box.
    """
    loaded = _load()
    if isinstance(loaded, str):
        raise SharedMemoryError(loaded)
    return loaded


@functools.cache
def _load() -> CudaRuntime | str:
    names = ["libcudart.so", "libcudart.so.12", "libcudart.so.11.0"]
    found = ctypes.util.find_library("cudart")
    if found:
        names.insert(0, found)
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return ("CUDA shared memory needs the CUDA runtime (libcudart), and none is installed "
                "on this box")
    try:
        driver: Any | None = ctypes.CDLL("libcuda.so.1")
    except OSError:
        driver = None
    return CudaRuntime(lib, driver)


class CudaRegion(Leased):
    """A registered CUDA region: a device pointer opened from a client's IPC handle."""

    kind = "cuda"

    def __init__(self, name: str, *, device_id: int, byte_size: int, ptr: int,
                 runtime: CudaRuntime) -> None:
        self.name = name
        self.device_id = device_id
        self.byte_size = byte_size
        self._ptr = ptr
        self._cuda = runtime
        super().__init__()

    def status(self) -> dict[str, object]:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}

    def _close(self) -> None:
        self._cuda.close(self._ptr)

    def _check(self, ref: ShmRef, what: str) -> None:
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > self.byte_size:
            raise SharedMemoryError(
                f"{what}: offset {ref.offset} + byte size {ref.byte_size} is past the end of "
                f"CUDA shared memory region {self.name!r} ({self.byte_size} bytes)")

    def view(self, ref: ShmRef, what: str) -> memoryview:
        """The bytes of ``ref``, copied to the host."""
        self._check(ref, what)
        return memoryview(self._cuda.to_host(self._ptr + ref.offset, ref.byte_size,
                                             self.device_id))

    def write(self, ref: ShmRef, data: np.ndarray, what: str) -> None:
        self._check(ref, what)
        if data.nbytes > ref.byte_size:
            raise SharedMemoryError(
                f"{what}: takes {data.nbytes} bytes, more than the {ref.byte_size} bytes given "
                f"in CUDA shared memory region {self.name!r}")
        self._cuda.to_device(self._ptr + ref.offset, data, self.device_id)


def open_cuda_region(name: str, raw_handle: bytes, device_id: int,
                     byte_size: int) -> CudaRegion:
    """Open a client's exported device allocation as a region.

    Raises:
        SharedMemoryError: a handle that is not 64 bytes, a bad device id or size, no CUDA
            runtime, a CUDA error, or a size past the end of the allocation.
    """
    if len(raw_handle) != IPC_HANDLE_BYTES:
        raise SharedMemoryError(f"region {name!r}: a CUDA IPC handle is {IPC_HANDLE_BYTES} "
                                f"bytes, got {len(raw_handle)}")
    if device_id < 0 or byte_size <= 0:
        raise SharedMemoryError(f"region {name!r}: device_id must be >= 0 and byte_size > 0")
    runtime = cuda_runtime()
    ptr = runtime.open(raw_handle, device_id)
    available = runtime.allocation_size(ptr)
    if available is not None and byte_size > available:
        runtime.close(ptr)
        raise SharedMemoryError(f"region {name!r}: byte_size {byte_size} is past the end of the "
                                f"device allocation ({available} bytes)")
    return CudaRegion(name, device_id=device_id, byte_size=byte_size, ptr=ptr, runtime=runtime)
