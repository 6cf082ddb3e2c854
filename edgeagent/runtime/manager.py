"""The model manager: load, warm up, check, swap and unload models; one place for readiness.

A new version is loaded, warmed up and checked while the old one keeps serving; the swap is a
single reference change; the old version is closed only once the requests that hold a lease on
it have finished. All blocking work (hashing, session creation, inference) runs in executors so
the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeagent.device.plan import NO_OVERRIDES, PlanOverrides, ProviderPlan
from edgeagent.errors import EdgeAgentError, ModelError, ModelNotFound, ModelNotReady
from edgeagent.runtime.base import LoadedModel
from edgeagent.runtime.checks import ModelCheck, run_checks
from edgeagent.runtime.inspect import PRECISIONS, onnx_precision, sha256_file
from edgeagent.runtime.memory import release_free_heap
from edgeagent.runtime.registry import BackendRegistry, model_format

log = logging.getLogger(__name__)

#: (format, precision, model sha256, the model's overrides) -> provider plan. Built by the
#: composition root from the device profile and facts, so the manager knows nothing of profiles.
Planner = Callable[[str, str, str, PlanOverrides], ProviderPlan]


@dataclass(frozen=True)
class ModelSource:
    """What to load: a file, and what is known about it beforehand."""

    path: Path
    version: int = 1
    precision: str = "auto"
    """``auto`` = inspect the file; the hub passes the bundle's declared precision."""
    origin: str = "path"
    """``path`` (a configured local file) or ``hub``."""
    variant: str = ""
    """The bundle variant chosen, for reporting (hub models)."""
    checks: tuple[ModelCheck, ...] = ()
    sha256: str = ""
    """Known content hash (the store's); computed when empty."""
    overrides: PlanOverrides = NO_OVERRIDES
    """The model's own providers and threads (its ``[[models]]`` entry, or its tuning)."""
    tuned: str = ""
    """Set when a tuning result chose this configuration (what it is, for reporting)."""


#: A run predicted to take less than this runs on the event loop: handing it to a worker thread
#: costs more (~110 us of CPU for the hop on a small box) than such a run itself.
INLINE_RUN_NS = 50_000

#: With nothing else in flight in the agent, a run predicted shorter than this runs on the
#: event loop too: the hand-off to a worker and back is then pure latency (0.18-0.2 ms of wall
#: time per request on a 2-core box: 5-6 % of a 3.5 ms CNN run), and what arrives meanwhile
#: waits at most this long (docs/decisions.md, "Runs on the loop when the agent is idle").
IDLE_INLINE_RUN_NS = 10_000_000


class ModelVersion:
    """One loaded version of a model, with the leases of the requests using it."""

    # Built in one place (ModelManager._prepare) from the results of a load; the
    # positional signature mirrors that call.
    def __init__(self, name: str, source: ModelSource, fmt: str, precision: str,  # noqa: PLR0917
                 precision_reason: str, sha256: str, plan: ProviderPlan,
                 model: LoadedModel) -> None:
        self.name = name
        self.version = source.version
        self.source = source
        self.format = fmt
        self.precision = precision
        self.precision_reason = precision_reason
        self.sha256 = sha256
        self.plan = plan
        self.model = model
        self.loaded_at = time.time()
        self._leases = 0
        self._in_worker = 0  # runs of this version in a worker thread now (the loop's count)
        self.ran_since_release = False
        """Whether a run that may grow the runtime's memory (in a worker, or on the loop while
        the agent was idle) happened since :meth:`ModelManager.release_memory` last released
        this version's memory (tiny inline runs grow nothing worth it)."""
        self._retired = False
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self.ns_per_byte: float | None = None
        """Recent run time per byte of input (a moving average), once a run was timed."""

    def timed_run(self, arrays: Mapping[str, np.ndarray], output_names: Sequence[str] | None,
                  nbytes: int) -> dict[str, np.ndarray]:
        """``model.run``, timed per byte of input (``nbytes``) into :attr:`ns_per_byte`."""
        started = time.perf_counter_ns()
        outputs = self.model.run(arrays, output_names)
        cost = (time.perf_counter_ns() - started) / max(1, nbytes)
        # Races between workers only blur the average, which is all it is used for.
        last = self.ns_per_byte
        self.ns_per_byte = cost if last is None else 0.8 * last + 0.2 * cost
        return outputs

    def runs_inline(self, nbytes: int, *, alone: bool = False) -> bool:
        """Whether a run on ``nbytes`` of input is predicted to be cheaper than a thread
        hand-off, or (``alone``: nothing else is in flight in the agent) shorter than
        :data:`IDLE_INLINE_RUN_NS`.

        Per byte of input is conservative: a run's fixed cost, spread over a bigger input,
        predicts too long a run, never too short. No run of this version may be in a worker
        meanwhile: a backend that serialises runs (LiteRT) would make the event loop wait for
        it. (Requests merely queued or holding a lease do not count: only the loop runs
        inline, one at a time.)
        """
        predicted = self.predicted_ns(nbytes)
        if predicted is None or self._in_worker:
            return False
        return predicted < (IDLE_INLINE_RUN_NS if alone else INLINE_RUN_NS)

    def predicted_ns(self, nbytes: int) -> float | None:
        """A run on ``nbytes`` of input, as the recent runs predict it (None: never timed)."""
        rate = self.ns_per_byte
        return None if rate is None else rate * nbytes

    async def run_off_loop(self, run_in_worker: Callable[..., Awaitable[Any]],
                           fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, counted so that :meth:`runs_inline` never puts a
        run on the event loop while another one of this version is in a worker."""
        self._in_worker += 1
        self.ran_since_release = True
        try:
            return await run_in_worker(fn, *args)
        finally:
            self._in_worker -= 1

    def acquire(self) -> None:
        with self._lock:
            self._leases += 1
            self._idle.clear()

    def acquire_unless_retired(self) -> bool:
        """A lease, unless the version is retired (it may be closed already): for work that
        found the version on its own (a worker thread, not a request routed to it)."""
        with self._lock:
            if self._retired:
                return False
            self._leases += 1
            self._idle.clear()
            return True

    def release(self) -> None:
        with self._lock:
            self._leases -= 1
            if self._leases == 0:
                self._idle.set()
                if self._retired:
                    self.model.close()

    def retire(self) -> None:
        """Close now if idle, else when the last lease is released."""
        with self._lock:
            self._retired = True
            if self._leases == 0:
                self.model.close()

    @property
    def retired(self) -> bool:
        return self._retired

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    @property
    def in_flight(self) -> int:
        return self._leases

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {
            "version": self.version,
            "origin": self.source.origin,
            "path": str(self.source.path),
            "variant": self.source.variant,
            "tuned": self.source.tuned,
            "format": self.format,
            "platform": m.platform,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "sha256": self.sha256,
            "provider": m.provider,
            "fallback": m.fallback_reason,
            "attempts": [a.to_dict() for a in m.attempts],
            "plan": self.plan.to_dict(),
            "inputs": [s.to_dict() for s in m.inputs],
            "outputs": [s.to_dict() for s in m.outputs],
            "loaded_at": self.loaded_at,
        }


@dataclass
class ModelSlot:
    """A model name the agent knows, whatever its state."""

    name: str
    state: str = "unloaded"
    """``unloaded``, ``loading``, ``ready`` or ``failed`` (failed with nothing serving)."""
    active: ModelVersion | None = None
    last_error: str = ""
    loading: asyncio.Lock = field(default_factory=asyncio.Lock)


def _warmup_inputs(model: LoadedModel) -> dict[str, np.ndarray]:
    from edgeagent.runtime.datatypes import numpy_dtype

    out: dict[str, np.ndarray] = {}
    for spec in model.inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            out[spec.name] = np.full(shape, b"", dtype=object)
        else:
            out[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
    return out


class ModelManager:
    """Owns every model slot; the only code that loads, swaps and unloads sessions."""

    def __init__(self, registry: BackendRegistry, planner: Planner, *,
                 infer_workers: int = 4) -> None:
        self._registry = registry
        self._planner = planner
        self._slots: dict[str, ModelSlot] = {}
        # Loading never competes with inference for the same workers.
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="edgeagent-load")
        self._infer_pool = ThreadPoolExecutor(infer_workers, thread_name_prefix="edgeagent-infer")
        self._running: dict[int, float] = {}
        self._running_lock = threading.Lock()
        self._next_ticket = 0

    # ---- lifecycle -------------------------------------------------------------------

    def declare(self, name: str) -> ModelSlot:
        """Make a model name known (configured but not loaded yet)."""
        return self._slots.setdefault(name, ModelSlot(name))

    async def load(self, name: str, source: ModelSource) -> ModelVersion:
        """Load, warm up and check a version, then make it the active one.

        The previous version keeps serving throughout and is closed once its in-flight requests
        finish. On any failure the previous version stays active and the error is recorded.

        Raises:
            ModelError, BackendUnavailable: the new version could not be activated.
        """
        slot = self.declare(name)
        loop = asyncio.get_running_loop()
        async with slot.loading:
            if slot.active is None:
                slot.state = "loading"
            log.info("loading model %s version %d from %s", name, source.version, source.path)
            try:
                new = await loop.run_in_executor(self._load_pool, self._prepare, name, source)
            except EdgeAgentError as exc:
                slot.last_error = str(exc)
                slot.state = "ready" if slot.active else "failed"
                log.error("model %s version %d not activated: %s", name, source.version, exc)
                raise
            old, slot.active = slot.active, new
            slot.state, slot.last_error = "ready", ""
            if old is not None:
                old.retire()
                log.info("model %s: version %d replaces %d (%d requests finishing on the old one)",
                         name, new.version, old.version, old.in_flight)
            log.info("model %s version %d ready on %s (%s, %s)%s", name, new.version,
                     new.model.provider, new.format, new.precision,
                     f"; fell back: {new.model.fallback_reason}"
                     if new.model.fallback_reason else "")
            return new

    def _prepare(self, name: str, source: ModelSource) -> ModelVersion:
        path = source.path
        fmt = model_format(path)
        sha = source.sha256 or sha256_file(path)
        precision, why = source.precision, "declared"
        if precision == "auto":
            precision, why = onnx_precision(path) if fmt == "onnx" else ("fp32", "pending")
        elif precision not in PRECISIONS:
            raise ModelError(f"unknown precision {precision!r} (expected {', '.join(PRECISIONS)})")
        plan = self._planner(fmt, precision, sha, source.overrides)
        backend = self._registry.for_format(fmt)
        model = backend.load(path, plan)
        try:
            if why == "pending":
                precision, why = _tflite_precision(model)
            warm = model.validate(_warmup_inputs(model))
            model.run(warm)
            run_checks(model, source.checks)
            model.release_memory(warm)
        except EdgeAgentError as exc:
            model.close()
            raise ModelError(f"{name} version {source.version}: {exc}") from exc
        finally:
            release_free_heap()  # what loading freed (copies of the weights), back to the OS
        return ModelVersion(name, source, fmt, precision, why, sha, plan, model)

    async def unload(self, name: str) -> None:
        """Stop serving a model; requests already running on it finish first."""
        slot = self._slot(name)
        async with slot.loading:
            old, slot.active = slot.active, None
            slot.state = "unloaded"
            if old is not None:
                old.retire()
                log.info("model %s version %d unloaded", name, old.version)

    def forget(self, name: str) -> None:
        """Drop an unloaded model name entirely (removed from the config)."""
        slot = self._slots.get(name)
        if slot is not None and slot.active is None:
            del self._slots[name]

    async def close(self, grace_s: float = 10.0) -> None:
        """Unload everything, waiting up to ``grace_s`` for requests in flight."""
        deadline = time.monotonic() + grace_s
        versions = [s.active for s in self._slots.values() if s.active is not None]
        for v in versions:
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.get_running_loop().run_in_executor(None, v.wait_idle, remaining)
        for name in list(self._slots):
            await self.unload(name)
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)

    # ---- serving ----------------------------------------------------------------------

    def _slot(self, name: str) -> ModelSlot:
        try:
            return self._slots[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}") from None

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The active version of a model (or that exact version, if it is the active one).

        Raises:
            ModelNotFound: unknown model, or a version that is not loaded.
            ModelNotReady: the model is known but nothing serves it.
        """
        slot = self._slot(name)
        active = slot.active
        if active is None:
            why = f": {slot.last_error}" if slot.last_error else ""
            raise ModelNotReady(f"model {name!r} is {slot.state}{why}")
        if version is not None and version != active.version:
            raise ModelNotFound(
                f"model {name!r} version {version} is not loaded (version {active.version} is)"
            )
        return active

    @contextlib.contextmanager
    def lease(self, name: str, version: int | None = None) -> Iterator[ModelVersion]:
        """Hold a version for the length of a request, so a swap cannot close it under us."""
        mv = self.get(name, version)
        mv.acquire()
        try:
            yield mv
        finally:
            mv.release()

    async def infer(self, name: str, inputs: Mapping[str, np.ndarray],
                    output_names: Sequence[str] | None = None,
                    version: int | None = None, *, alone: bool = False,
                    ) -> tuple[ModelVersion, dict[str, np.ndarray]]:
        """Validate and run one request on the active version (``alone``: the caller knows
        of no other request in flight or waiting in the agent).

        The run goes to the inference pool, off the event loop, unless the version's recent
        runs predict it shorter than the hand-off itself (:data:`INLINE_RUN_NS`), or, when
        ``alone`` and no run is in a worker, shorter than :data:`IDLE_INLINE_RUN_NS`.
        """
        with self.lease(name, version) as mv:
            arrays = mv.model.validate(inputs)
            for out in output_names or ():
                mv.model.output_spec(out)
            nbytes = sum(a.nbytes for a in arrays.values())
            alone = alone and not self._running
            if mv.runs_inline(nbytes, alone=alone):
                if (mv.predicted_ns(nbytes) or 0) >= INLINE_RUN_NS:
                    mv.ran_since_release = True  # not tiny: it may grow the runtime's memory
                return mv, mv.timed_run(arrays, output_names, nbytes)
            outputs = await mv.run_off_loop(self.run_in_worker, mv.timed_run, arrays,
                                            output_names, nbytes)
            return mv, outputs

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking inference work in the inference pool, tracked for the watchdog."""
        with self._running_lock:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._running[ticket] = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._infer_pool, fn, *args)
        finally:
            with self._running_lock:
                del self._running[ticket]

    def release_memory(self) -> None:
        """Hand back what the runtimes and the C heap keep cached after a burst of large
        requests (:class:`~edgeagent.runtime.memory.HeapTrimmer` calls it from a worker
        thread once the burst has passed): the runtime of each active version that ran in a
        worker since its last release first (onnxruntime's arena, with one run of its warm-up
        inputs; a model idle through the burst costs nothing), then the heap."""
        for slot in list(self._slots.values()):
            mv = slot.active
            if mv is None or not mv.ran_since_release:
                continue
            if not mv.acquire_unless_retired():  # swapped out meanwhile: nothing to release
                continue
            mv.ran_since_release = False
            try:
                mv.model.release_memory(mv.model.validate(_warmup_inputs(mv.model)))
            except EdgeAgentError as exc:
                log.warning("model %s version %d: releasing memory failed: %s",
                            mv.name, mv.version, exc)
            finally:
                mv.release()
        release_free_heap()

    def oldest_running_s(self) -> float:
        """Age of the longest-running inference (0 when idle): a stuck worker shows here."""
        with self._running_lock:
            if not self._running:
                return 0.0
            return time.monotonic() - min(self._running.values())

    # ---- reporting --------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._slots)

    def ready(self, name: str, version: int | None = None) -> bool:
        try:
            self.get(name, version)
        except (ModelNotFound, ModelNotReady):
            return False
        return True

    def slot(self, name: str) -> ModelSlot:
        return self._slot(name)

    def status(self) -> list[dict[str, Any]]:
        out = []
        for name in self.names():
            slot = self._slots[name]
            entry: dict[str, Any] = {"name": name, "state": slot.state,
                                     "last_error": slot.last_error}
            if slot.active is not None:
                entry.update(slot.active.describe())
                entry["in_flight"] = slot.active.in_flight
            out.append(entry)
        return out


def _tflite_precision(model: LoadedModel) -> tuple[str, str]:
    """Precision of a TFLite model from what its interpreter reports."""
    if model.weight_precision in PRECISIONS:
        return model.weight_precision, "from the interpreter's tensor types"
    if any(s.quantization is not None for s in (*model.inputs, *model.outputs)):
        return "int8", "quantised inputs/outputs"
    return "fp32", "float inputs/outputs"
