"""Dynamic batching: concurrent requests to one model stacked into one run and split back.

A model is batchable when every input and output of its active version has a dynamic first
dimension. Requests are validated *before* they join the queue, so one malformed request never
fails the others. A collector takes the oldest request once a concurrency slot is free, waits up
to ``max_queue_delay_ms`` (counted from that request's arrival, as Triton does) for more, and
takes the compatible requests (same model version, same requested outputs, same datatypes and
non-batch dimensions) in arrival order while their rows fit in ``max_batch_size``. A request that
alone has more rows than ``max_batch_size`` is not refused: it runs in a batch of its own, so
turning batching on never breaks a client that worked without it.

The batch runs once, in the inference pool, under a lease of the version its requests were
validated against (a model swap while it is queued or running is safe), and each caller gets
its own rows of each output. An error in the run fails every request of that batch with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeagent.errors import InferenceError
from edgeagent.runtime.base import LoadedModel
from edgeagent.runtime.manager import ModelVersion
from edgeagent.runtime.stats import ModelStats

Outputs = dict[str, np.ndarray]
#: ``ModelManager.run_in_worker``: runs blocking work in the inference pool.
RunInWorker = Callable[..., Awaitable[Any]]


def unbatchable_reason(model: LoadedModel) -> str:
    """Why a model cannot be batched dynamically ('' when it can)."""
    for kind, specs in (("input", model.inputs), ("output", model.outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] != -1:
                return (f"{kind} {spec.name!r} has shape {list(spec.shape)}: dynamic batching "
                        "needs a dynamic first dimension on every input and output")
    return ""


def request_rows(arrays: Mapping[str, np.ndarray]) -> int:
    """Rows of a request: the first dimension its inputs share (0 when they do not share one)."""
    rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    return rows.pop() if len(rows) == 1 else 0


@dataclass(eq=False)
class BatchItem:
    """One validated request waiting in a model's batch queue."""

    version: ModelVersion
    arrays: dict[str, np.ndarray]
    output_names: tuple[str, ...] | None
    rows: int
    arrived_ns: int
    future: asyncio.Future[Outputs]
    key: Hashable = field(init=False)
    """Requests with equal keys can share a run."""

    def __post_init__(self) -> None:
        shapes = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(self.arrays.items()))
        self.key = (self.version, self.output_names, shapes)


def run_batch(model: LoadedModel, requests: Sequence[Mapping[str, np.ndarray]],
              rows: Sequence[int], output_names: Sequence[str] | None) -> list[Outputs]:
    """Concatenate requests along the first dimension, run once, split the outputs back.

    Blocking: runs in the inference pool (the concatenation copies too, so it stays off the
    event loop).

    Raises:
        InferenceError: the run failed, or an output's first dimension is not the batch.
    """
    if len(requests) == 1:
        return [model.run(requests[0], output_names)]
    joined = {n: np.concatenate([r[n] for r in requests]) for n in requests[0]}
    outputs = model.run(joined, output_names)
    total = sum(rows)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise InferenceError(
                f"output {name!r} has shape {list(arr.shape)} for a batch of {total} rows, so it "
                "cannot be split between the batched requests; set max_batch_size = 0 for it"
            )
    bounds = list(itertools.accumulate(rows, initial=0))
    return [{n: a[lo:hi] for n, a in outputs.items()} for lo, hi in itertools.pairwise(bounds)]


class BatchQueue:
    """The bounded batch queue of one model and the collector that empties it.

    The collector task exists only while requests are queued, so an idle agent holds no task.
    """

    def __init__(self, max_batch_size: int, max_queue_delay_ms: float, max_queue_size: int, *,
                 running: asyncio.Semaphore, stats: ModelStats, run_in_worker: RunInWorker) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self._delay_ns = int(max_queue_delay_ms * 1e6)
        self._running = running
        self._stats = stats
        self._run_in_worker = run_in_worker
        self._pending: deque[BatchItem] = deque()
        self._arrived = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.max_queue_size

    async def submit(self, version: ModelVersion, arrays: dict[str, np.ndarray],
                     output_names: Sequence[str] | None, rows: int) -> Outputs:
        """Queue one validated request and wait for its share of a batched run.

        The caller checks :attr:`full` first (and holds a lease on ``version``).
        """
        item = BatchItem(version, arrays, tuple(output_names) if output_names else None, rows,
                         time.perf_counter_ns(), asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._arrived.set()
        if self._collector is None:
            self._collector = asyncio.create_task(self._collect(), name="edgeagent-batcher")
        return await item.future

    async def _collect(self) -> None:
        try:
            while self._pending:
                await self._running.acquire()
                batch = await self._form()
                if not batch:  # every queued request was cancelled meanwhile
                    self._running.release()
                    continue
                task = asyncio.create_task(self._execute(batch), name="edgeagent-batch")
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)
        finally:
            # No await between the emptiness check and here: submit() sees None and restarts us.
            self._collector = None

    def _select(self, key: Hashable) -> tuple[list[BatchItem], bool]:
        """The requests the next batch would take, and whether it is full."""
        chosen: list[BatchItem] = []
        rows = 0
        for item in self._pending:
            if item.future.done() or item.key != key:
                continue
            if chosen and rows + item.rows > self.max_batch_size:
                return chosen, True  # keep arrival order: no smaller request jumps ahead
            chosen.append(item)
            rows += item.rows
        return chosen, rows >= self.max_batch_size

    async def _form(self) -> list[BatchItem]:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # cancelled while waiting
        if not self._pending:
            return []
        first = self._pending[0]
        key = first.key
        deadline = first.arrived_ns + self._delay_ns
        chosen, full = self._select(key)
        while not full:
            remaining = deadline - time.perf_counter_ns()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining / 1e9)
            chosen, full = self._select(key)
        taken = {id(item) for item in chosen}
        self._pending = deque(
            i for i in self._pending if id(i) not in taken and not i.future.done())
        return [i for i in chosen if not i.future.done()]

    async def _execute(self, batch: list[BatchItem]) -> None:
        version = batch[0].version
        rows = [item.rows for item in batch]
        started = time.perf_counter_ns()
        self._stats.in_flight += len(batch)
        # The batch's own lease: its callers' leases end if they are cancelled mid-run.
        version.acquire()
        ok = False
        try:
            results: list[Outputs] = await self._run_in_worker(
                run_batch, version.model, [item.arrays for item in batch], rows,
                batch[0].output_names)
            ok = True
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        except asyncio.CancelledError:
            for item in batch:
                item.future.cancel()
            raise
        else:
            for item, result in zip(batch, results, strict=False):
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            version.release()
            self._running.release()
            self._stats.in_flight -= len(batch)
            done = time.perf_counter_ns()
            if ok:
                self._stats.execution_done(sum(rows), done - started, len(batch),
                                           version=version.version)
            for item in batch:
                self._stats.request_done(ok, done - item.arrived_ns, started - item.arrived_ns,
                                         version=version.version)
