"""Giving freed C heap back to the operating system after a model load, and after a burst of
large requests.

Loading an ONNX model frees more than it keeps: onnxruntime reads the file, parses the protobuf
and transforms the graph, holding two to three copies of the weights on the way to the one the
session keeps. glibc's allocator keeps such freed memory in the process (measured: +46 MB of RSS
for the 11 MB benchmark CNN, +13 MB once trimmed), where on a box with 4 GB shared by several
services it counts against the agent. ``malloc_trim`` hands it back; it costs a few
milliseconds, so it runs once per load, on the loading thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


@functools.cache
def _glibc(name: str) -> Callable[..., int] | None:
    """A glibc function (``malloc_trim``, ``mallopt``); None on another C library."""
    try:
        fn: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    return fn


#: glibc's ``mallopt`` parameter for the number of malloc arenas.
_M_ARENA_MAX = -8

#: Malloc arenas the agent lets glibc make (its default is 8 per core). Large request buffers
#: are freed by other threads than the ones that allocated them; with an arena per thread each
#: keeps its own freed memory, and the RSS reached under load stays (measured with the
#: benchmark's CNN load: +26 MB kept with glibc's default, +10 MB with 2 arenas, the same
#: throughput).
MALLOC_ARENAS = 2


def limit_malloc_arenas(environ: Mapping[str, str], arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas before the agent starts its threads, unless the operator set
    ``MALLOC_ARENA_MAX`` (glibc reads it itself, and it wins). Whether the cap was set."""
    mallopt = _glibc("mallopt")
    if "MALLOC_ARENA_MAX" in environ or mallopt is None:
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS; whether the C library offers that."""
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def _log_failure(done: asyncio.Future[object]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("releasing memory after a burst failed", exc_info=done.exception())


class HeapTrimmer:
    """Hands the heap back once a burst of large requests has passed.

    Large request bodies and tensors (a CNN frame is 600 KB; JSON several MB) are allocated and
    freed by many threads; glibc keeps what they freed in per-thread arenas, so the RSS reached
    under load stays after it (measured: +67 MB after the benchmark's load). After each large
    request :meth:`note` (re)arms a timer; when ``quiet_s`` pass with no other large request
    and nothing in flight, :func:`release_free_heap` runs once in a worker thread. Small
    requests never touch it.
    """

    #: Requests moving at least this many bytes count as large.
    LARGE_BYTES = 256 * 1024

    def __init__(self, quiet_s: float = 2.0,
                 release: Callable[[], object] = release_free_heap) -> None:
        self.quiet_s = quiet_s
        self.release = release
        """What runs once a burst has passed (the agent gives its model manager's
        :meth:`~edgeagent.runtime.manager.ModelManager.release_memory`: runtimes, then heap)."""
        self.trims = 0
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight = 0

    def start(self) -> None:
        """A large request started (keeps the trim off while it runs)."""
        self._in_flight += 1

    def note(self) -> None:
        """A large request ended: trim after ``quiet_s`` without another."""
        self._in_flight -= 1
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.quiet_s, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._in_flight:
            return  # the next one to end re-arms the timer
        loop = asyncio.get_running_loop()
        self.trims += 1
        loop.run_in_executor(None, self.release).add_done_callback(_log_failure)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
