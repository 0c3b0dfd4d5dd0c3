"""The dynamic batcher: merges concurrent calls to the same signature into one TensorFlow run.

How it works: each (model version, signature, outputs, per-row input shapes) has a `BatchQueue` and one dispatcher
task. A call joins its queue and awaits a future. The dispatcher waits until the queue's batch is due (see
batching.py), then for a free batch thread (`num_batch_threads`), takes the batch, and runs it on the executor:
inputs are concatenated along dimension 0 (and padded to an allowed batch size with copies of the first row), the
signature runs once, and each caller gets exactly its own rows of every output. A call that completes a whole batch
starts it itself when a batch thread is free, without yielding, so TensorFlow overlaps the parsing of the requests
behind it instead of waiting for the event loop to finish a burst. A call too large for one batch, or
without a shared dimension 0, runs alone. REST and gRPC share the batcher, so their requests batch together.
A version directory's own `batching_params.pbtxt` (TF Serving's per-model convention) overrides the global
parameters for that version's queues, except `num_batch_threads`: the batch threads are one pool for the process,
since every model shares the same cores.

The batch thread hands its outcome back itself, in one loop callback (deadlines.hand_off), so the callers resume on
the event loop's next turn: with 1-row REST requests at 1,000/s, a batch's end and its delivery were 1.5 ms apart on
average (median of five runs) when a task awaited the executor's future through a deadline wrapper, and are 0.4 ms
apart now.

Guarantees: a full queue refuses a call at once (RESOURCE_EXHAUSTED / 429); a call whose deadline passes while it
waits is dropped before it runs; `close()` cancels every task the batcher starts and fails the calls of batches still
running as UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

from backend import errors, inference
from backend.batching import Batch, BatchPolicy, BatchQueue, Task
from backend.batching_config import BatchingParameters
from backend.deadlines import await_before, expire, hand_off, unless_expired
from backend.inference import ModelCall
from backend.metrics import BackendMetrics
from backend.runners import DirectRunner

log = logging.getLogger(__name__)

IDLE_LANE_S = 60.0
_EXPIRED = "Deadline exceeded while the request waited for its batch; it was not run"


@dataclass(slots=True, eq=False)
class _Pending:
    call: ModelCall
    future: asyncio.Future[dict[str, np.ndarray]]


@dataclass(slots=True, eq=False)
class _Lane:
    """One queue, the event that wakes its dispatcher, and the dispatcher itself."""

    queue: BatchQueue[_Pending]
    own_parameters: bool  # the version brought its own batching_params.pbtxt: global changes leave it alone
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dispatcher: asyncio.Task[None] | None = None


@dataclass(slots=True, eq=False)
class _Running:
    """A batch on its thread: what delivering its outcome needs."""

    batch: Batch[_Pending]
    threads: asyncio.Semaphore  # the semaphore it holds a thread of (a reload may make a new one meanwhile)
    started: float


def policy_of(parameters: BatchingParameters) -> BatchPolicy:
    return BatchPolicy(max_batch_size=parameters.max_batch_size, timeout_s=parameters.batch_timeout_s,
                       max_enqueued_batches=parameters.max_enqueued_batches,
                       allowed_batch_sizes=parameters.allowed_batch_sizes)


class Batcher:
    def __init__(self, parameters: BatchingParameters, executor: Executor, metrics: BackendMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._executor = executor
        self._metrics = metrics
        self._clock = clock
        self._direct = DirectRunner(executor)
        self._lanes: dict[Hashable, _Lane] = {}
        self._running: set[_Running] = set()
        self.configure(parameters)

    def configure(self, parameters: BatchingParameters) -> None:
        """New parameters for every queue; batches already running keep the thread they hold."""
        self._parameters = parameters
        self._threads = asyncio.Semaphore(parameters.num_batch_threads)
        policy = policy_of(parameters)
        for lane in self._lanes.values():
            if not lane.own_parameters:
                lane.queue.policy = policy
                lane.wake.set()

    async def run(self, call: ModelCall, deadline: float | None) -> dict[str, np.ndarray]:
        rows = call.rows
        parameters = call.servable.batching or self._parameters
        if rows is None or not 0 < rows <= parameters.max_batch_size:
            return await self._direct.run(call, deadline)
        lane = self._lane(call, parameters)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        future.add_done_callback(_retrieve)  # a caller that gave up must not leave an unretrieved exception
        queue = lane.queue
        if not queue.admit(Task(rows=rows, enqueued_at=self._clock(), deadline=deadline,
                                payload=_Pending(call, future), abandoned=future.done)):
            raise errors.ResourceExhausted("The batch scheduling queue to which this request was submitted is full")
        if len(queue) == 1 or queue.full():  # a new oldest call sets the timeout; a whole batch is due now
            threads = self._threads
            if queue.full() and not threads.locked():
                # A free thread is taken without yielding, so the batch starts before the event loop reads the next
                # request: TensorFlow runs while later requests are parsed, instead of after a burst of them.
                await threads.acquire()
                self._start_batch(queue, threads)
            lane.wake.set()
        # Past the deadline the caller gets its answer at once, and the queue drops the call before it runs; a caller
        # cancelled (client gone) cancels the future, which the queue skips too.
        return await await_before(future, deadline, self._clock(), _EXPIRED)

    def _lane(self, call: ModelCall, parameters: BatchingParameters) -> _Lane:
        pad = parameters.pad_variable_length_inputs
        key = (id(call.signature), call.output_keys,
               tuple((name, value.dtype.str, None if pad else value.shape[1:]) for name, value in call.inputs.items()))
        lane = self._lanes.get(key)
        if lane is None or lane.dispatcher is None or lane.dispatcher.done():
            lane = _Lane(queue=BatchQueue(policy_of(parameters)), own_parameters=call.servable.batching is not None)
            lane.dispatcher = asyncio.create_task(self._dispatch(key, lane))
            self._lanes[key] = lane
        return lane

    async def _dispatch(self, key: Hashable, lane: _Lane) -> None:
        queue = lane.queue
        while True:
            if not await self._wait_until_due(lane):
                self._lanes.pop(key, None)  # idle: an unloaded version's lane must not pin its model
                return
            threads = self._threads
            await threads.acquire()
            self._start_batch(queue, threads)

    async def _wait_until_due(self, lane: _Lane) -> bool:
        """Wait until the lane's batch is due; False when it stayed empty for IDLE_LANE_S."""
        while not lane.queue.ready(self._clock()):
            lane.wake.clear()
            due = lane.queue.due_at()
            try:
                await asyncio.wait_for(lane.wake.wait(), IDLE_LANE_S if due is None else max(0.0, due - self._clock()))
            except TimeoutError:
                if due is None and not len(lane.queue):
                    return False
        return True

    def _start_batch(self, queue: BatchQueue[_Pending], threads: asyncio.Semaphore) -> None:
        """Take the due batch and hand it to the held batch thread now; the thread delivers its outcome."""
        started = self._clock()
        batch = queue.take(started)
        for task in batch.expired:
            expire(task.payload.future, _EXPIRED)
        if not batch.tasks:
            threads.release()
            return
        calls = [task.payload.call for task in batch.tasks]
        deadlines = [task.deadline for task in batch.tasks]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        pad = (calls[0].servable.batching or self._parameters).pad_variable_length_inputs
        running = _Running(batch, threads, started)
        # Skipped on the batch thread if every caller's deadline passed while it waited for the thread.
        run = unless_expired(latest, lambda: _run_merged(calls, batch.padded_rows, pad), _EXPIRED)
        self._running.add(running)
        try:
            hand_off(self._executor, run, functools.partial(self._deliver, running))
        except RuntimeError as error:  # the executor is shut down
            self._deliver(running, None, error)

    def _deliver(self, running: _Running, outputs: list[dict[str, np.ndarray]] | None, error: Exception | None
                 ) -> None:
        """On the loop, once the batch thread is done: each caller gets its rows, or the batch's error."""
        if running not in self._running:
            return  # close() failed these calls already
        self._running.discard(running)
        running.threads.release()
        batch = running.batch
        if error is not None:
            _fail_batch(batch, error)
            return
        assert outputs is not None  # _run_merged returned them
        first = batch.tasks[0].payload.call
        self._metrics.observe_batch(model=first.servable.name, rows=batch.rows, padded_rows=batch.padded_rows,
                                    queue_seconds=[running.started - task.enqueued_at for task in batch.tasks])
        for task, result in zip(batch.tasks, outputs):
            if not task.payload.future.done():
                task.payload.future.set_result(result)

    async def close(self) -> None:
        """Cancel every dispatcher; calls still queued or in a running batch fail as UNAVAILABLE."""
        dispatchers = [lane.dispatcher for lane in self._lanes.values() if lane.dispatcher is not None]
        for task in dispatchers:
            task.cancel()
        await asyncio.gather(*dispatchers, return_exceptions=True)
        shutting_down = errors.Unavailable("The server is shutting down")
        running, self._running = self._running, set()
        for unfinished in running:
            unfinished.threads.release()
            _fail_batch(unfinished.batch, shutting_down)
        for lane in self._lanes.values():
            while len(lane.queue):
                for queued in lane.queue.take(float("-inf")).tasks:
                    _fail(queued.payload.future, shutting_down)
        self._lanes.clear()


def _retrieve(future: asyncio.Future[dict[str, np.ndarray]]) -> None:
    if not future.cancelled():
        future.exception()


def _fail(future: asyncio.Future[dict[str, np.ndarray]], error: errors.ServingError) -> None:
    if not future.done():
        future.set_exception(error)


def _fail_batch(batch: Batch[_Pending], error: Exception) -> None:
    """Fail the batch's calls with a ServingError as it is; anything else is a bug, logged, and fails only this
    batch's calls as INTERNAL, never the dispatcher."""
    if not isinstance(error, errors.ServingError):
        log.error("batch of %d rows failed", batch.rows, exc_info=error)
        error = errors.Internal(f"batch failed: {error}")
    for task in batch.tasks:
        _fail(task.payload.future, error)


def _run_merged(calls: list[ModelCall], padded_rows: int, pad_lengths: bool) -> list[dict[str, np.ndarray]]:
    """Concatenate the calls' inputs, run once, and split every output back into each call's rows."""
    rows = [call.rows or 0 for call in calls]
    total = sum(rows)
    merged = {name: _concatenate([call.inputs[name] for call in calls], total, padded_rows, pad_lengths)
              for name in calls[0].inputs}
    outputs = inference.run(inference.ModelCall(calls[0].servable, calls[0].signature, merged, calls[0].output_keys))
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != padded_rows:
            raise errors.Internal(f"output '{name}' has shape {list(value.shape)} for a batch of {padded_rows} rows: "
                                  "this signature cannot be batched (its outputs must keep dimension 0)")
    offsets = np.cumsum([0, *rows])
    return [{name: value[offsets[i]:offsets[i + 1]] for name, value in outputs.items()} for i in range(len(calls))]


def _concatenate(values: list[np.ndarray], rows: int, padded_rows: int, pad_lengths: bool) -> np.ndarray:
    if pad_lengths:
        width = tuple(max(sizes) for sizes in zip(*(value.shape[1:] for value in values)))
        values = [_pad_to(value, width) for value in values]
    merged = np.concatenate(values, axis=0) if len(values) > 1 else values[0]
    if padded_rows > rows:
        merged = np.concatenate([merged, np.repeat(merged[:1], padded_rows - rows, axis=0)], axis=0)
    return merged


def _pad_to(value: np.ndarray, width: tuple[int, ...]) -> np.ndarray:
    if value.shape[1:] == width:
        return value
    fill = b"" if value.dtype == object else 0
    padded = np.full((value.shape[0], *width), fill, dtype=value.dtype)
    padded[tuple(slice(0, size) for size in value.shape)] = value
    return padded
