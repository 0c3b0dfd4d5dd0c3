"""Running blocking model work on an executor within a client's deadline.

A request can wait in the executor's queue behind others; if its deadline passes while it waits it is dropped
before it runs (its client has gone), instead of spending TensorFlow time on an answer nobody reads. The caller's
await is bounded by the same deadline.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Callable, TypeVar

import grpc

from backend.errors import DeadlineExceeded

T = TypeVar("T")


async def run_before_deadline(executor: Executor, deadline: float | None, work: Callable[[], T],
                              expired_message: str = "Deadline Exceeded") -> T:
    """Run `work` on the executor unless `deadline` (time.monotonic() seconds; None: none) passes first."""
    return await finish_before_deadline(start_before_deadline(executor, deadline, work, expired_message), deadline,
                                        expired_message)


def start_before_deadline(executor: Executor, deadline: float | None, work: Callable[[], T],
                          expired_message: str = "Deadline Exceeded") -> asyncio.Future[T]:
    """Hand `work` to the executor now, without yielding to the event loop; it is skipped if `deadline` has passed
    by the time a thread takes it."""

    def guarded() -> T:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(expired_message)
        return work()

    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(expired_message)
    return asyncio.get_running_loop().run_in_executor(executor, guarded)


async def finish_before_deadline(future: asyncio.Future[T], deadline: float | None,
                                 expired_message: str = "Deadline Exceeded") -> T:
    """Await work started by start_before_deadline, for no longer than `deadline`."""
    try:
        return await asyncio.wait_for(future, None if deadline is None else deadline - time.monotonic())
    except TimeoutError:
        raise DeadlineExceeded(expired_message) from None


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
