"""The dynamic batcher: merges concurrent calls to the same signature into one TensorFlow run.

How it works: each (model version, signature, outputs, per-row input shapes) has a lane: a `BatchQueue` and what
starts its next batch. A call joins the queue and awaits a future. A batch is due (see batching.py) when the queue
holds a whole one, or when a loop timer set for the oldest call's timeout fires; a due batch starts at once on a free
batch thread (`num_batch_threads`), or waits in line for the next thread a finished batch frees. Starting: inputs
are concatenated along dimension 0 (and padded to an allowed batch size with copies of the first row), the signature
runs once on the executor, and each caller gets exactly its own rows of every output. A call that completes a whole
batch starts it itself, without yielding, so TensorFlow overlaps the parsing of the requests behind it instead of
waiting for the event loop to finish a burst. A call too large for one batch, or without a shared dimension 0, runs
alone. REST and gRPC share the batcher, so their requests batch together. A lane whose queue empties is dropped, so
an unloaded version's lane never pins its model. A version directory's own `batching_params.pbtxt` (TF Serving's
per-model convention) overrides the global parameters for that version's queues, except `num_batch_threads`: the
batch threads are one pool for the process, since every model shares the same cores.

Why timers and not a dispatcher task per lane waiting with `wait_for`: a timeout woke the dispatcher three loop turns
later (the timer cancels the wait, the cancelled wait ends, the dispatcher resumes), and a turn under load is a pass
over every readable connection. With 1-row REST requests at 3,000/s and a 2 ms timeout, the oldest call of a batch
waited p90 3.4 / p99 5.4 ms before its batch started; a timer callback starts it in the turn it fires: p90 2.8-3.0,
p99 3.3-4.5 ms.

The batch thread hands its outcome back itself, in one loop callback (deadlines.hand_off), so the callers resume on
the event loop's next turn: with 1-row REST requests at 1,000/s, a batch's end and its delivery were 1.5 ms apart on
average (median of five runs) when a task awaited the executor's future through a deadline wrapper, and are 0.4 ms
apart now.

Guarantees: a full queue refuses a call at once (RESOURCE_EXHAUSTED / 429); a call whose deadline passes while it
waits is dropped before it runs; `close()` cancels every timer the batcher set and fails the calls still queued or in
a running batch as UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
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

_EXPIRED = "Deadline exceeded while the request waited for its batch; it was not run"


# Each with an __init__ of its own, which mypyc compiles (see backend/inference.py's ModelCall).
@dataclass(slots=True, eq=False, init=False)
class _Pending:
    call: ModelCall
    future: asyncio.Future[dict[str, np.ndarray]]

    def __init__(self, call: ModelCall, future: asyncio.Future[dict[str, np.ndarray]]) -> None:
        self.call, self.future = call, future


@dataclass(slots=True, eq=False, init=False)
class _Lane:
    """One queue, and what starts its next batch: a timer for the oldest call's timeout, or a place in line."""

    key: Hashable
    queue: BatchQueue[_Pending]
    own_parameters: bool  # the version brought its own batching_params.pbtxt: global changes leave it alone
    timer: asyncio.TimerHandle | None
    in_line: bool  # its batch is due and waits for a batch thread

    def __init__(self, key: Hashable, queue: BatchQueue[_Pending], own_parameters: bool) -> None:
        self.key, self.queue, self.own_parameters, self.timer, self.in_line = key, queue, own_parameters, None, False


@dataclass(slots=True, eq=False, init=False)
class _Outcome:
    """What a batch thread hands back: each call's outputs, in order, and how long the batch took on the thread."""

    outputs: list[dict[str, np.ndarray]]
    seconds: float

    def __init__(self, outputs: list[dict[str, np.ndarray]], seconds: float) -> None:
        self.outputs, self.seconds = outputs, seconds


@dataclass(slots=True, eq=False, init=False)
class _Running:
    """A batch on its thread: what delivering its outcome needs."""

    batch: Batch[_Pending]
    started: float

    def __init__(self, batch: Batch[_Pending], started: float) -> None:
        self.batch, self.started = batch, started


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
        # Made on its event loop, which it keeps: asyncio.get_running_loop() makes a getpid() system call (CPython 3.11).
        self._loop = asyncio.get_running_loop()
        self._lanes: dict[Hashable, _Lane] = {}
        self._line: deque[_Lane] = deque()  # lanes whose batch is due, oldest first, while every thread is busy
        self._running: set[_Running] = set()
        self._parameters = parameters

    def configure(self, parameters: BatchingParameters) -> None:
        """New parameters for every queue; batches already running keep their thread, and a queue the change made
        due starts (or joins the line) now."""
        self._parameters = parameters
        policy = policy_of(parameters)
        for lane in list(self._lanes.values()):
            if not lane.own_parameters:
                lane.queue.policy = policy
                if not lane.in_line:
                    self._cancel_timer(lane)
                    self._schedule(lane)
        self._start_next_in_line()

    async def run(self, call: ModelCall, deadline: float | None) -> dict[str, np.ndarray]:
        rows = call.rows
        parameters = call.servable.batching or self._parameters
        if rows is None or not 0 < rows <= parameters.max_batch_size:
            return await self._direct.run(call, deadline)
        lane = self._lane(call, parameters)
        future: asyncio.Future[dict[str, np.ndarray]] = self._loop.create_future()
        future.add_done_callback(_retrieve)  # a caller that gave up must not leave an unretrieved exception
        queue = lane.queue
        if not queue.admit(Task(rows=rows, enqueued_at=self._clock(), deadline=deadline,
                                payload=_Pending(call, future), abandoned=future.done)):
            raise errors.ResourceExhausted("The batch scheduling queue to which this request was submitted is full")
        if queue.full() and not lane.in_line:
            # A free thread takes the whole batch now, before the event loop reads the next request: TensorFlow
            # runs while later requests are parsed, instead of after a burst of them.
            self._cancel_timer(lane)
            self._due(lane)
        elif lane.timer is None and not lane.in_line:  # a new oldest call: its timeout sets when the batch is due
            self._schedule(lane)
        # Past the deadline the caller gets its answer at once, and the queue drops the call before it runs; a caller
        # cancelled (client gone) cancels the future, which the queue skips too.
        return await await_before(future, deadline, self._clock(), _EXPIRED)

    def _lane(self, call: ModelCall, parameters: BatchingParameters) -> _Lane:
        pad = parameters.pad_variable_length_inputs
        # The signature's id is safe in the key: a lane is dropped whenever its queue empties, and a queued call
        # keeps its signature alive, so no other signature can take that id while the lane exists.
        key = (id(call.signature), call.output_keys,
               tuple((name, value.dtype, None if pad else value.shape[1:]) for name, value in call.inputs.items()))
        lane = self._lanes.get(key)
        if lane is None:
            lane = _Lane(key=key, queue=BatchQueue(policy_of(parameters)),
                         own_parameters=call.servable.batching is not None)
            self._lanes[key] = lane
        return lane

    def _schedule(self, lane: _Lane) -> None:
        """After the lane's queue changed: start its batch if due, else time it; an empty lane is dropped."""
        due = lane.queue.due_at()
        if due is None:
            if self._lanes.get(lane.key) is lane:
                del self._lanes[lane.key]
        elif lane.queue.ready(self._clock()):
            self._due(lane)
        else:
            lane.timer = self._loop.call_later(due - self._clock(), self._on_timer, lane)

    def _on_timer(self, lane: _Lane) -> None:
        # uvloop's timers count whole milliseconds, so one may fire a little before `due`: _schedule re-arms it.
        lane.timer = None
        self._schedule(lane)

    def _cancel_timer(self, lane: _Lane) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None

    def _due(self, lane: _Lane) -> None:
        """The lane's batch is due: it starts on a free batch thread, or waits in line for one."""
        if len(self._running) < self._parameters.num_batch_threads:
            self._start_batch(lane)
        elif not lane.in_line:
            lane.in_line = True
            self._line.append(lane)

    def _start_next_in_line(self) -> None:
        while self._line and len(self._running) < self._parameters.num_batch_threads:
            lane = self._line.popleft()
            lane.in_line = False
            self._schedule(lane)  # expired calls may have emptied it meanwhile

    def _start_batch(self, lane: _Lane) -> None:
        """Take the due batch and hand it to a batch thread now; the thread delivers its outcome. Then the rest of
        the queue is scheduled in turn."""
        started = self._clock()
        batch = lane.queue.take(started)
        for task in batch.expired:
            expire(task.payload.future, _EXPIRED)
        if batch.tasks:
            calls = [task.payload.call for task in batch.tasks]
            deadlines = [task.deadline for task in batch.tasks]
            latest = None if None in deadlines else max(d for d in deadlines if d is not None)
            pad = (calls[0].servable.batching or self._parameters).pad_variable_length_inputs
            running = _Running(batch, started)
            # Skipped on the batch thread if every caller's deadline passed while it waited for the thread.
            run = unless_expired(latest, lambda: _run_merged(calls, batch.padded_rows, pad), _EXPIRED)
            self._running.add(running)
            try:
                hand_off(self._loop, self._executor, run, functools.partial(self._deliver, running))
            except RuntimeError as error:  # the executor is shut down
                self._deliver(running, None, error)
        self._schedule(lane)

    def _deliver(self, running: _Running, outcome: _Outcome | None, error: Exception | None) -> None:
        """On the loop, once the batch thread is done: each caller gets its rows, or the batch's error; the next
        due batch takes the thread."""
        if running not in self._running:
            return  # close() failed these calls already
        self._running.discard(running)
        self._start_next_in_line()
        batch = running.batch
        if error is not None:
            _fail_batch(batch, error)
            return
        assert outcome is not None  # _run_merged returned it
        first = batch.tasks[0].payload.call
        self._metrics.observe_batch(model=first.servable.name, rows=batch.rows, padded_rows=batch.padded_rows,
                                    queue_seconds=[running.started - task.enqueued_at for task in batch.tasks],
                                    run_seconds=outcome.seconds)
        for task, result in zip(batch.tasks, outcome.outputs):
            if not task.payload.future.done():
                task.payload.future.set_result(result)

    async def close(self) -> None:
        """Calls still queued or in a running batch fail as UNAVAILABLE; no timer is left behind."""
        shutting_down = errors.Unavailable("The server is shutting down")
        running, self._running = self._running, set()
        for unfinished in running:
            _fail_batch(unfinished.batch, shutting_down)
        lanes = list(self._lanes.values())
        self._lanes.clear()
        self._line.clear()
        for lane in lanes:
            self._cancel_timer(lane)
            while len(lane.queue):
                for queued in lane.queue.take(float("-inf")).tasks:
                    _fail(queued.payload.future, shutting_down)


def _retrieve(future: asyncio.Future[dict[str, np.ndarray]]) -> None:
    if not future.cancelled():
        future.exception()


def _fail(future: asyncio.Future[dict[str, np.ndarray]], error: errors.ServingError) -> None:
    if not future.done():
        future.set_exception(error)


def _fail_batch(batch: Batch[_Pending], error: Exception) -> None:
    """Fail the batch's calls with a ServingError as it is; anything else is a bug, logged, and fails only this
    batch's calls as INTERNAL, never the batcher."""
    if not isinstance(error, errors.ServingError):
        log.error("batch of %d rows failed", batch.rows, exc_info=error)
        error = errors.Internal(f"batch failed: {error}")
    for task in batch.tasks:
        _fail(task.payload.future, error)


def _run_merged(calls: list[ModelCall], padded_rows: int, pad_lengths: bool) -> _Outcome:
    """Concatenate the calls' inputs, run once, and split every output back into each call's rows."""
    started = time.perf_counter()
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
    split = [{name: value[offsets[i]:offsets[i + 1]] for name, value in outputs.items()} for i in range(len(calls))]
    return _Outcome(split, time.perf_counter() - started)


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
