"""Running blocking model work on an executor within a client's deadline.

A request can wait in the executor's queue behind others; if its deadline passes while it waits it is dropped
before it runs (its client has gone), instead of spending TensorFlow time on an answer nobody reads. The caller's
await is bounded by the same deadline.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import Executor
from typing import Callable, TypeVar

import grpc

from backend.errors import DeadlineExceeded

T = TypeVar("T")


def hand_off(loop: asyncio.AbstractEventLoop, executor: Executor, work: Callable[[], T],
             deliver: Callable[[T | None, Exception | None], None]) -> None:
    """Run `work` on the executor; `deliver(result, error)` gets its outcome back on `loop`, the caller's running
    loop (passed in: asyncio.get_running_loop() makes a getpid() system call in CPython 3.11), in one callback.

    Why not `await loop.run_in_executor(...)`: its future is settled by one loop callback and wakes its awaiter with
    another, and a deadline on it (wait_for) adds a third; under load each turn waits behind a pass over every
    readable connection. One `call_soon_threadsafe` from the thread delivers on the next turn. Nothing is delivered
    once the loop is closed (shutdown: nobody waits)."""

    def run() -> None:
        result, error = None, None
        try:
            result = work()
        except Exception as failure:  # delivered as it is: the waiter turns it into its answer
            error = failure
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop is closed
            pass

    executor.submit(run)


async def run_before_deadline(executor: Executor, deadline: float | None, work: Callable[[], T],
                              expired_message: str = "Deadline Exceeded") -> T:
    """Run `work` on the executor unless `deadline` (time.monotonic() seconds; None: none) passes first: skipped if
    it passes while `work` waits for a thread, and the await ends when it passes."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(expired_message)
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    hand_off(loop, executor, unless_expired(deadline, work, expired_message), functools.partial(_settle, future))
    return await await_before(future, deadline, time.monotonic(), expired_message)


def unless_expired(deadline: float | None, work: Callable[[], T], expired_message: str) -> Callable[[], T]:
    """`work`, for a thread that takes it up: raises DeadlineExceeded instead if `deadline` (time.monotonic()) has
    passed by then, so work nobody waits for any more is not done."""
    def guarded() -> T:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(expired_message)
        return work()

    return guarded


async def await_before(future: asyncio.Future[T], deadline: float | None, now: float, expired_message: str) -> T:
    """Await `future`; when `deadline` passes first, it fails with DeadlineExceeded. `now` is the deadline's clock
    read now. A timer instead of wait_for(): no extra task, and no extra loop turn when the future is settled. The
    future's own loop, not asyncio.get_running_loop(): in CPython 3.11 that makes a getpid() system call each time."""
    loop = future.get_loop()
    expiry = None if deadline is None else loop.call_at(loop.time() + deadline - now, expire, future, expired_message)
    try:
        return await future
    finally:
        if expiry is not None:
            expiry.cancel()


def _settle(future: asyncio.Future[T], result: T | None, error: Exception | None) -> None:
    if future.done():  # expired, or its awaiter was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]  # `work` returned it: a T


def expire(future: asyncio.Future[T], message: str) -> None:
    """The error is made only when the deadline passes, not up front for every call's timer."""
    if not future.done():
        future.set_exception(DeadlineExceeded(message))


# A client whose deadline passes cancels the call itself; the server computed the same deadline from grpc-timeout a
# little later (the time the headers took to arrive), so it may see a few milliseconds left when the cancel comes.
_DEADLINE_SLACK_S = 0.05


def cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled a call's handler, as far as the server can tell: its deadline passed (or was about to),
    or the client cancelled it or left."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
