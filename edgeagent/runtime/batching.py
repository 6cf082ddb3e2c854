"""Dynamic batching: concurrent requests to one model stacked into one run and split back.

A model is batchable when every input and output of its active version has a dynamic first
dimension. Requests are validated *before* they join the queue, so one malformed request never
fails the others.

Batching never makes a request wait for company (decisions.md, "Batching that never costs"):
a request to an idle model (a concurrency slot free, nobody queued) runs at once, by itself,
on the scheduler's direct path; requests that arrive while every slot is busy queue here, and
as soon as a slot is free the collector takes the queued requests that can share a run (same
model version, same requested outputs, same datatypes and non-batch dimensions), by priority
then arrival, while their rows fit in ``max_batch_size``. So a batch is what arrived during the
previous run, and ``max_queue_delay_ms`` is only an upper bound that the collector never needs
to wait for. A request that alone has more rows than ``max_batch_size`` is not refused: it runs
in a batch of its own, so turning batching on never breaks a client that worked without it.
While the model's runs are long and its threads fill the box's cores, the scheduler lowers the
lane's :class:`Gate` to one execution at a time (:attr:`Gate.limit`): a second run would only
split the same cores, so what arrives waits for the next batch instead.

The batch runs once, in the inference pool, under a lease of the version its requests were
validated against (a model swap while it is queued or running is safe), and each caller gets
its own rows of each output. An error in the run fails every request of that batch with it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeagent.errors import DeadlineExceeded, InferenceError
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
    rank: int = 0
    """Lower runs first (see :func:`priority_rank`)."""
    seq: int = 0
    key: Hashable = field(init=False)
    """Requests with equal keys can share a run."""

    def __post_init__(self) -> None:
        shapes = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(self.arrays.items()))
        self.key = (self.version, self.output_names, shapes)


#: The rank of requests without a priority (Triton's priority 0): after every explicit one.
DEFAULT_RANK = 1 << 62


def priority_rank(priority: int) -> int:
    """Queue order of a request priority: 1 is the highest, 0 (the default) the lowest."""
    return priority if priority > 0 else DEFAULT_RANK


def deadline_error(waited_ns: int) -> DeadlineExceeded:
    return DeadlineExceeded(f"request timeout expired: it waited {waited_ns / 1e6:.1f} ms in the "
                            "model's queue, past its 'timeout' parameter, and was not run")


class Gate:
    """A counting semaphore for a model's executions whose waiters are served by priority,
    then in arrival order; a waiter can carry a deadline, past which it leaves with
    :class:`~edgeagent.errors.DeadlineExceeded` instead of running."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._limit = slots
        self._in_use = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def limit(self) -> int:
        """Executions allowed at once now: :attr:`slots`, or fewer while the scheduler says
        so (a lowered limit takes effect as executions end; none is stopped)."""
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = max(1, min(value, self.slots))
        self._wake()

    @property
    def free(self) -> bool:
        """Whether an acquire now would not wait."""
        return self._in_use < self._limit and not any(not f.done() for _, _, f in self._waiters)

    def try_acquire(self) -> bool:
        if self.free:
            self._in_use += 1
            return True
        return False

    async def acquire(self, rank: int = DEFAULT_RANK, deadline_ns: int = 0) -> None:
        """Take a slot; with ``deadline_ns`` (``perf_counter_ns``), give up at that time.

        Raises:
            DeadlineExceeded: the deadline passed before a slot was free.
        """
        if self.try_acquire():
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._waiters, (rank, next(self._seq), fut))
        timer = None
        if deadline_ns:
            arrived = time.perf_counter_ns()
            delay = max(0.0, (deadline_ns - arrived) / 1e9)
            timer = loop.call_later(delay, _expire, fut, arrived)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # the slot was handed over just as the waiter was cancelled
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def release(self) -> None:
        """Give a slot back: to the first waiter still waiting, if the limit allows one."""
        self._in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._limit:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                self._in_use += 1
                fut.set_result(None)


def _expire(fut: asyncio.Future[Any], arrived_ns: int) -> None:
    if not fut.done():
        fut.set_exception(deadline_error(time.perf_counter_ns() - arrived_ns))


@dataclass(frozen=True)
class BatchTimes:
    """Where a run's time went, in nanoseconds (Triton's compute_input/infer/output)."""

    input_ns: int
    infer_ns: int
    output_ns: int


def run_batch(model: LoadedModel, requests: Sequence[Mapping[str, np.ndarray]],
              rows: Sequence[int], output_names: Sequence[str] | None
              ) -> tuple[list[Outputs], BatchTimes]:
    """Concatenate requests along the first dimension, run once, split the outputs back.

    Blocking: runs in the inference pool (the concatenation copies too, so it stays off the
    event loop).

    Raises:
        InferenceError: the run failed, or an output's first dimension is not the batch.
    """
    t0 = time.perf_counter_ns()
    if len(requests) == 1:
        out = model.run(requests[0], output_names)
        t1 = time.perf_counter_ns()
        return [out], BatchTimes(0, t1 - t0, 0)
    joined = {n: np.concatenate([r[n] for r in requests]) for n in requests[0]}
    t1 = time.perf_counter_ns()
    outputs = model.run(joined, output_names)
    t2 = time.perf_counter_ns()
    total = sum(rows)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise InferenceError(
                f"output {name!r} has shape {list(arr.shape)} for a batch of {total} rows, so it "
                "cannot be split between the batched requests; set max_batch_size = 0 for it"
            )
    bounds = list(itertools.accumulate(rows, initial=0))
    split = [{n: a[lo:hi] for n, a in outputs.items()} for lo, hi in itertools.pairwise(bounds)]
    return split, BatchTimes(t1 - t0, t2 - t1, time.perf_counter_ns() - t2)


class BatchQueue:
    """The bounded batch queue of one model and the collector that empties it.

    The collector task exists only while requests are queued, so an idle agent holds no task.
    """

    def __init__(self, max_batch_size: int, max_queue_delay_ms: float, max_queue_size: int, *,
                 running: Gate, stats: ModelStats, run_in_worker: RunInWorker) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_delay_ms = max_queue_delay_ms
        """Reported in the model configuration; the collector never waits for it (above)."""
        self._running = running
        self._stats = stats
        self._run_in_worker = run_in_worker
        self._pending: list[BatchItem] = []
        self._seq = itertools.count()
        self._collector: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.max_queue_size

    async def submit(self, version: ModelVersion, arrays: dict[str, np.ndarray],
                     output_names: Sequence[str] | None, rows: int, *, priority: int = 0,
                     deadline_ns: int = 0) -> Outputs:
        """Queue one validated request and wait for its share of a batched run.

        The caller checks :attr:`full` first (and holds a lease on ``version``).

        Raises:
            DeadlineExceeded: ``deadline_ns`` passed before the request's batch started.
        """
        loop = asyncio.get_running_loop()
        item = BatchItem(version, arrays, tuple(output_names) if output_names else None, rows,
                         time.perf_counter_ns(), loop.create_future(),
                         priority_rank(priority), next(self._seq))
        self._pending.append(item)
        timer = None
        if deadline_ns:
            delay = max(0.0, (deadline_ns - item.arrived_ns) / 1e9)
            timer = loop.call_later(delay, _expire, item.future, item.arrived_ns)
        if self._collector is None:
            self._collector = asyncio.create_task(self._collect(), name="edgeagent-batcher")
        try:
            return await item.future
        except DeadlineExceeded:
            self._stats.request_done(False, time.perf_counter_ns() - item.arrived_ns, 0)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if item in self._pending:  # expired or cancelled while queued: leave at once
                self._pending.remove(item)

    async def _collect(self) -> None:
        try:
            while self._pending:
                await self._running.acquire()
                batch = self._form()
                if not batch:  # every queued request was cancelled or expired meanwhile
                    self._running.release()
                    continue
                task = asyncio.create_task(self._execute(batch), name="edgeagent-batch")
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)
        finally:
            # No await between the emptiness check and here: submit() sees None and restarts us.
            self._collector = None

    def _form(self) -> list[BatchItem]:
        """The next batch: the first waiting request by priority and arrival, and those after
        it that can share its run, while their rows fit; taken out of the queue."""
        waiting = sorted((i for i in self._pending if not i.future.done()),
                         key=lambda i: (i.rank, i.seq))
        if not waiting:
            self._pending = []
            return []
        key = waiting[0].key
        chosen: list[BatchItem] = []
        rows = 0
        for item in waiting:
            if item.key != key:
                continue
            if chosen and rows + item.rows > self.max_batch_size:
                break  # keep the order: no smaller request jumps ahead
            chosen.append(item)
            rows += item.rows
        taken = {id(i) for i in chosen}
        self._pending = [i for i in self._pending if id(i) not in taken and not i.future.done()]
        return chosen

    async def _run(self, version: ModelVersion, inputs: list[dict[str, np.ndarray]],
                   rows: list[int], output_names: Sequence[str] | None,
                   ) -> tuple[list[Outputs], BatchTimes]:
        """:func:`run_batch` in the inference pool, or on the loop for a tiny model whose
        runs are predicted shorter than the hand-off (as the direct path decides)."""
        nbytes = sum(a.nbytes for arrays in inputs for a in arrays.values())
        if version.runs_inline(nbytes):
            return run_batch(version.model, inputs, rows, output_names)
        result: tuple[list[Outputs], BatchTimes] = await version.run_off_loop(
            self._run_in_worker, run_batch, version.model, inputs, rows, output_names)
        return result

    async def _execute(self, batch: list[BatchItem]) -> None:
        version = batch[0].version
        rows = [item.rows for item in batch]
        started = time.perf_counter_ns()
        self._stats.in_flight += len(batch)
        # The batch's own lease: its callers' leases end if they are cancelled mid-run.
        version.acquire()
        times = None
        try:
            results, times = await self._run(version, [item.arrays for item in batch], rows,
                                             batch[0].output_names)
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
            if times is not None:
                self._stats.execution_done(sum(rows), times.infer_ns, len(batch),
                                           input_ns=times.input_ns, output_ns=times.output_ns,
                                           version=version.version)
            for item in batch:
                self._stats.request_done(times is not None, done - item.arrived_ns,
                                         started - item.arrived_ns, version=version.version)
