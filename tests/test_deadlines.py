"""Blocking work on an executor within a deadline (backend/deadlines.py): real threads, real event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from backend.deadlines import run_before_deadline
from backend.errors import DeadlineExceeded


@pytest.fixture
def one_thread() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture
async def loop_errors() -> list[dict[str, object]]:
    """What the loop's exception handler saw (an unretrieved error, a failed callback): nothing, in every test."""
    seen: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: seen.append(context))
    return seen


async def test_the_result_and_the_error_of_the_work_come_back(one_thread: ThreadPoolExecutor,
                                                              loop_errors: list[dict[str, object]]) -> None:
    assert await run_before_deadline(one_thread, None, lambda: threading.current_thread().name) != \
        threading.current_thread().name  # it ran on the executor
    with pytest.raises(ZeroDivisionError):
        await run_before_deadline(one_thread, time.monotonic() + 5, lambda: 1 / 0)
    assert loop_errors == []


async def test_work_still_queued_at_its_deadline_is_not_run_and_the_await_ends_then(
        one_thread: ThreadPoolExecutor, loop_errors: list[dict[str, object]]) -> None:
    gate, ran = threading.Event(), []
    busy = asyncio.ensure_future(run_before_deadline(one_thread, None, lambda: gate.wait(10)))
    await asyncio.sleep(0.05)  # it holds the only thread
    with pytest.raises(DeadlineExceeded, match="too late"):
        await run_before_deadline(one_thread, time.monotonic() + 0.1, lambda: ran.append(True), "too late")
    gate.set()  # the only thread is free: the expired work is skipped when it gets there
    assert await busy is True
    await run_before_deadline(one_thread, None, lambda: None)  # queued after it, so it has been skipped by now
    assert ran == [] and loop_errors == []


async def test_a_caller_that_gives_up_leaves_nothing_behind(one_thread: ThreadPoolExecutor,
                                                            loop_errors: list[dict[str, object]]) -> None:
    gate = threading.Event()

    def failing_later() -> None:
        gate.wait(10)
        raise ValueError("nobody reads this")

    waiting = asyncio.ensure_future(run_before_deadline(one_thread, time.monotonic() + 5, failing_later))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.set()
    await run_before_deadline(one_thread, None, lambda: None)
    await asyncio.sleep(0.05)  # the failed work's outcome reached the loop, and was dropped
    assert loop_errors == []
