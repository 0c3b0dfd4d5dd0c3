"""Batch formation as plain decisions (a fake clock, no I/O), and the batcher merging real concurrent calls."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

import numpy as np
import pytest
import tensorflow as tf

from backend import errors
from backend.batcher import Batcher
from backend.batching import BatchPolicy, BatchQueue, Task
from backend.batching_config import BatchingParameters
from backend.inference import ModelCall
from backend.metrics import BackendMetrics
from backend.servable import Servable, Signature, TensorSpec

POLICY = BatchPolicy(max_batch_size=8, timeout_s=0.002, max_enqueued_batches=2, allowed_batch_sizes=(2, 4, 8))


def task(rows: int, at: float = 0.0, deadline: float | None = None) -> Task[str]:
    return Task(rows=rows, enqueued_at=at, deadline=deadline, payload=f"{rows}@{at}")


def test_a_batch_is_due_when_full_or_when_its_oldest_task_timed_out() -> None:
    queue: BatchQueue[str] = BatchQueue(POLICY)
    assert not queue.ready(0.0) and queue.due_at() is None
    assert queue.admit(task(3, at=1.0))
    assert not queue.ready(1.001) and queue.ready(1.002)
    assert queue.admit(task(5, at=1.001))
    assert queue.ready(1.001)  # 8 rows: full


def test_take_is_fifo_up_to_the_max_and_pads_to_an_allowed_size() -> None:
    queue: BatchQueue[str] = BatchQueue(POLICY)
    for rows in (1, 2, 4, 3):
        assert queue.admit(task(rows))
    batch = queue.take(now=1.0)
    assert [t.rows for t in batch.tasks] == [1, 2, 4] and batch.rows == 7 and batch.padded_rows == 8
    batch = queue.take(now=1.0)
    assert [t.rows for t in batch.tasks] == [3] and batch.padded_rows == 4
    assert len(queue) == 0 and queue.rows == 0


def test_a_full_queue_refuses_at_once() -> None:
    queue: BatchQueue[str] = BatchQueue(POLICY)
    assert queue.admit(task(8)) and queue.admit(task(8))
    assert not queue.admit(task(1))
    assert queue.rows == 16


def test_expired_tasks_are_dropped_before_they_run() -> None:
    queue: BatchQueue[str] = BatchQueue(POLICY)
    queue.admit(task(1, deadline=0.5))
    queue.admit(task(2, deadline=2.0))
    batch = queue.take(now=1.0)
    assert [t.rows for t in batch.expired] == [1]
    assert [t.rows for t in batch.tasks] == [2]
    assert queue.rows == 0


def test_abandoned_tasks_are_dropped_like_expired_ones() -> None:
    queue: BatchQueue[str] = BatchQueue(POLICY)
    gone = Task(rows=2, enqueued_at=0.0, deadline=None, payload="gone", abandoned=lambda: True)
    queue.admit(gone)
    queue.admit(task(1))
    batch = queue.take(now=0.0)
    assert batch.expired == [gone] and [t.rows for t in batch.tasks] == [1]


def test_a_task_larger_than_a_shrunk_policy_still_runs_alone() -> None:
    queue: BatchQueue[str] = BatchQueue(POLICY)
    queue.admit(task(6))
    queue.policy = BatchPolicy(max_batch_size=4, timeout_s=0, max_enqueued_batches=2)
    assert [t.rows for t in queue.take(now=0).tasks] == [6]


class RecordingSignature:
    """A signature runner computing y = 2x + row-count marker, recording the batch sizes it was called with."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, inputs: Mapping[str, np.ndarray], output_keys: Sequence[str]) -> dict[str, np.ndarray]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        x = inputs["x"]
        rows = x.shape[0] if x.ndim else 0
        self.batches.append(rows)
        return {"y": x * 2, "rows": np.full(rows, rows, np.int64)}


class FakeModel:
    """One servable with one signature (calls batch together only when they target the same signature)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.runner = RecordingSignature(gate)
        spec = TensorSpec(tf.float32, None)
        self.signature = Signature(key="serving_default", method_name="tensorflow/serving/predict",
                                   inputs=MappingProxyType({"x": spec}),
                                   outputs=MappingProxyType({"y": spec, "rows": TensorSpec(tf.int64, (-1,))}),
                                   run=self.runner)
        self.servable = Servable(name="m", version=1, signature_defs=MappingProxyType({}),
                                 signatures=MappingProxyType({"serving_default": self.signature}))

    def call(self, values: np.ndarray) -> ModelCall:
        return ModelCall(self.servable, self.signature, {"x": values}, ("y", "rows"))


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


def parameters(**overrides: object) -> BatchingParameters:
    values = dict(max_batch_size=8, batch_timeout_micros=50_000, max_enqueued_batches=4, num_batch_threads=1,
                  allowed_batch_sizes=(), pad_variable_length_inputs=False)
    values.update(overrides)
    return BatchingParameters(**values)  # type: ignore[arg-type]


async def test_concurrent_calls_merge_and_each_gets_exactly_its_rows(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    registry_metrics = BackendMetrics()
    batcher = Batcher(parameters(allowed_batch_sizes=(4, 8)), executor, registry_metrics)
    calls = [model.call(np.full((rows, 2), float(i), np.float32)) for i, rows in enumerate((1, 3, 2, 1))]
    try:
        results = await asyncio.gather(*(batcher.run(call, None) for call in calls))
    finally:
        await batcher.close()
    assert model.runner.batches == [8]  # 7 real rows, padded to the allowed size 8
    for i, (call, result) in enumerate(zip(calls, results)):
        assert result["y"].tolist() == (call.inputs["x"] * 2).tolist(), i
        assert result["rows"].tolist() == [8] * call.inputs["x"].shape[0]
    exposition = registry_metrics.exposition()[0].decode()
    assert 'tfgate_backend_batch_padding_rows_total{model="m"} 1.0' in exposition
    assert 'tfgate_backend_batch_run_seconds_count{model="m"} 1.0' in exposition  # the one batch's time on its thread


async def test_a_whole_batch_starts_on_a_thread_before_the_event_loop_runs_anything_else(
        executor: ThreadPoolExecutor) -> None:
    """So TensorFlow runs while the event loop parses the requests behind it, not after a burst of them."""
    model = FakeModel()
    batcher = Batcher(parameters(max_batch_size=2), executor, BackendMetrics())
    try:
        first = asyncio.ensure_future(batcher.run(model.call(np.ones((1, 1), np.float32)), None))
        await asyncio.sleep(0)  # queued; its batch is not due for 50 ms
        filling = asyncio.ensure_future(batcher.run(model.call(np.ones((1, 1), np.float32)), None))
        started_before_the_next_callback: list[bool] = []
        # Runs right after `filling` is admitted; it blocks the loop, so the batch can start only if admitting it
        # handed the batch to a thread itself.
        asyncio.get_running_loop().call_soon(lambda: started_before_the_next_callback.append(
            model.runner.entered.wait(2)))
        await asyncio.gather(first, filling)
    finally:
        await batcher.close()
    assert started_before_the_next_callback == [True]
    assert model.runner.batches == [2]


async def test_a_queue_short_of_a_batch_starts_when_its_timeout_ends(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = Batcher(parameters(batch_timeout_micros=1_000), executor, BackendMetrics())
    try:
        results = await asyncio.wait_for(asyncio.gather(
            *(batcher.run(model.call(np.ones((1, 1), np.float32)), None) for _ in range(3))), 5)
    finally:
        await batcher.close()
    assert model.runner.batches == [3] and [result["rows"].tolist() for result in results] == [[3]] * 3


async def test_a_reload_that_makes_a_queue_a_whole_batch_starts_it_without_waiting_for_the_timeout(
        executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = Batcher(parameters(batch_timeout_micros=3_600_000_000), executor, BackendMetrics())  # an hour
    try:
        calls = [asyncio.ensure_future(batcher.run(model.call(np.ones((1, 1), np.float32)), None)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert model.runner.batches == []
        batcher.configure(parameters(max_batch_size=2, batch_timeout_micros=3_600_000_000))
        await asyncio.wait_for(asyncio.gather(*calls), 5)
    finally:
        await batcher.close()
    assert model.runner.batches == [2]


async def test_full_queue_is_resource_exhausted(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    batcher = Batcher(parameters(max_batch_size=2, max_enqueued_batches=1, batch_timeout_micros=0), executor,
                      BackendMetrics())
    try:
        running = asyncio.ensure_future(batcher.run(model.call(np.ones((2, 1), np.float32)), None))
        await asyncio.sleep(0.05)  # the first batch holds the only batch thread
        queued = asyncio.ensure_future(batcher.run(model.call(np.ones((2, 1), np.float32)), None))
        await asyncio.sleep(0)
        with pytest.raises(errors.ResourceExhausted):
            await batcher.run(model.call(np.ones((1, 1), np.float32)), None)
        gate.set()
        await asyncio.gather(running, queued)
    finally:
        gate.set()
        await batcher.close()


async def test_a_call_whose_deadline_passes_in_the_queue_is_not_run(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    batcher = Batcher(parameters(max_batch_size=2, batch_timeout_micros=0), executor, BackendMetrics())
    try:
        first = asyncio.ensure_future(batcher.run(model.call(np.ones((2, 1), np.float32)), None))
        await asyncio.sleep(0.05)
        doomed = model.call(np.full((1, 1), 7.0, np.float32))
        with pytest.raises(errors.DeadlineExceeded):
            await batcher.run(doomed, time.monotonic() + 0.05)
        gate.set()
        await first
        await asyncio.sleep(0.1)
    finally:
        gate.set()
        await batcher.close()
    assert model.runner.batches == [2]  # the doomed call never ran


async def test_scalars_and_oversized_calls_run_alone(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = Batcher(parameters(max_batch_size=4), executor, BackendMetrics())
    try:
        big = await batcher.run(model.call(np.ones((6, 1), np.float32)), None)
        scalar = await batcher.run(model.call(np.float32(3.0)), None)
    finally:
        await batcher.close()
    assert big["y"].shape == (6, 1) and scalar["y"] == 6.0 and model.runner.batches == [6, 0]


async def test_variable_length_inputs_are_padded_when_asked(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = Batcher(parameters(pad_variable_length_inputs=True), executor, BackendMetrics())
    short, long = (model.call(np.ones((1, n), np.float32)) for n in (2, 3))
    try:
        results = await asyncio.gather(batcher.run(short, None), batcher.run(long, None))
    finally:
        await batcher.close()
    assert model.runner.batches == [2]
    assert results[0]["y"].tolist() == [[2.0, 2.0, 0.0]] and results[1]["y"].tolist() == [[2.0, 2.0, 2.0]]


class FailingSignature(RecordingSignature):
    """Fails its first run, as a bug in a model would; runs normally after."""

    def __call__(self, inputs: Mapping[str, np.ndarray], output_keys: Sequence[str]) -> dict[str, np.ndarray]:
        if not self.batches:
            self.batches.append(-1)
            raise ValueError("broken op")
        return super().__call__(inputs, output_keys)


async def test_a_failed_batch_fails_its_calls_and_frees_its_thread(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    model.runner = FailingSignature()
    model.signature = dataclasses.replace(model.signature, run=model.runner)
    batcher = Batcher(parameters(max_batch_size=2, num_batch_threads=1), executor, BackendMetrics())
    try:
        failed = await asyncio.gather(*(batcher.run(model.call(np.ones((1, 1), np.float32)), None)
                                        for _ in range(2)), return_exceptions=True)
        assert [type(error) for error in failed] == [errors.Internal] * 2
        assert "broken op" in str(failed[0])
        answer = await batcher.run(model.call(np.ones((2, 1), np.float32)), None)  # the one thread is free again
    finally:
        await batcher.close()
    assert answer["y"].tolist() == [[2.0], [2.0]] and model.runner.batches == [-1, 2]


async def test_close_fails_the_calls_of_a_running_batch_and_ignores_its_late_outcome(
        executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    batcher = Batcher(parameters(max_batch_size=1), executor, BackendMetrics())
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
    running = asyncio.ensure_future(batcher.run(model.call(np.ones((1, 1), np.float32)), None))
    try:
        assert await asyncio.to_thread(model.runner.entered.wait, 2)
        await batcher.close()
        with pytest.raises(errors.Unavailable, match="shutting down"):
            await running
    finally:
        gate.set()
    await asyncio.sleep(0.1)  # the thread's outcome arrives after close()
    assert model.runner.batches == [1] and loop_errors == []
