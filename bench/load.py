"""The load generator's engine: N concurrent callers on one asyncio (uvloop) event loop, driving a Target for a
bounded time, in a closed or an open loop.

Closed loop (`rate` None): each caller sends its next request as soon as the previous one is answered, so
`concurrency` requests are always in flight and the rate is whatever the server sustains.
Open loop (`rate` R): send times are fixed in advance, start + i/R, and handed in order to whichever caller is free;
a request's latency counts from its scheduled time (or from its send, if the timer fired early), so when the
server falls behind, the wait for a free caller shows up as latency instead of silently slowing the load (the
"coordinated omission" a closed loop has). `send_lag_us` says how late sends were against the schedule; send times
that passed while every caller was busy and that no caller took before the deadline are reported as `unsent`.

The warm-up runs straight into the measured window, as in wrk: the load is already in steady state when the
window opens, instead of every caller starting at once. Only what completes inside the window counts: requests/s is
those completions over the window's length, latency their samples (including any that started in the warm-up).
Bounds: no request starts after the window; requests still in flight then get `drain_s` to finish (uncounted, so
the next measurement finds the server idle), after which they are cancelled and counted as errors, so a server that
hangs shows up. The generator's own CPU time (all its threads, over the window) is reported as `generator_cpu`, a
fraction of one core: it shares the machine with the server it measures.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from bench.histogram import Histogram
from bench.latency import LatencyRecorder, latency_us
from bench.progress import Progress
from bench.targets import Send, Target


@dataclass(frozen=True, slots=True)
class Load:
    concurrency: int  # callers: requests in flight (closed loop), or at most in flight (open loop)
    rate: float | None = None  # scheduled requests per second; None for a closed loop
    seconds: float = 10.0
    warmup_s: float = 1.0
    drain_s: float = 10.0

    def describe(self) -> str:
        if self.rate is None:
            return f"closed loop, {self.concurrency} in flight"
        return f"open loop, {self.rate:g}/s, at most {self.concurrency} in flight"


def run_load(target: Target, load: Load, label: str) -> dict[str, Any]:
    """Warm up, measure and return the JSON-ready summary; runs its own event loop (for synchronous callers)."""
    return uvloop.run(measure_load(target, load, label))


async def measure_load(target: Target, load: Load, label: str) -> dict[str, Any]:
    async with target.connect(load.concurrency) as session:
        result = await _measure(session.sends, load, label)
        result["connections"] = session.connections()
    return {"mode": "closed" if load.rate is None else "open", "concurrency": load.concurrency,
            "rate": load.rate, "rows_per_request": target.rows, **result,
            "rows_per_s": result["requests_per_s"] * target.rows}


@dataclass(slots=True)
class _Window:
    """The measured interval, in perf_counter nanoseconds, and what completed inside it."""

    start: int
    end: int
    recorder: LatencyRecorder
    completed: int = 0  # in the warm-up too, for the progress line

    def record(self, begin_ns: int, end_ns: int) -> None:
        self.completed += 1
        if self.start <= end_ns < self.end:
            self.recorder.record(end_ns - begin_ns)

    def record_failure(self, error: Exception, end_ns: int) -> None:
        self.completed += 1
        if self.start <= end_ns < self.end:
            self.recorder.record_failure(error)


class _Schedule:
    """Send times start + i/rate before the end, taken in order by whichever caller is free."""

    def __init__(self, start_ns: int, rate: float, end_ns: int) -> None:
        self._start = start_ns
        self._interval = 1e9 / rate
        self._end = end_ns
        self.taken = 0
        self.total = math.ceil((end_ns - start_ns) / self._interval)

    def take(self, now_ns: int) -> int | None:
        """The next send time, or None once the run is over."""
        if self.taken >= self.total or now_ns >= self._end:
            return None
        self.taken += 1
        return self._start + int((self.taken - 1) * self._interval)


async def _measure(sends: list[Send], load: Load, label: str) -> dict[str, Any]:
    clock = time.perf_counter_ns
    start = clock()
    window = _Window(start + int(load.warmup_s * 1e9), start + int((load.warmup_s + load.seconds) * 1e9),
                     LatencyRecorder())
    lag, schedule = Histogram(), None
    if load.rate is None:
        workers = [_closed_caller(send, window) for send in sends]
    else:
        schedule = _Schedule(start, load.rate, window.end)
        workers = [_open_caller(send, window, lag, schedule) for send in sends]
    tasks = [asyncio.ensure_future(worker) for worker in workers]
    ticker = asyncio.ensure_future(_show_progress(label, load, window))
    try:
        await asyncio.sleep((window.start - clock()) / 1e9)
        cpu_start = time.process_time()
        await asyncio.sleep((window.end - clock()) / 1e9)
        cpu_s = time.process_time() - cpu_start
        _, pending = await asyncio.wait(tasks, timeout=load.drain_s)
        for _ in pending:
            window.recorder.record_error("timeout", f"no response {load.drain_s:g} s after the run ended")
    finally:
        for task in (*tasks, ticker):
            task.cancel()
        await asyncio.gather(*tasks, ticker, return_exceptions=True)
    recorder = window.recorder
    recorder.elapsed_s = load.seconds
    Progress(label, load.seconds).done(load.seconds, recorder.count, recorder.error_count)
    result = {**recorder.summary(), "generator_cpu": cpu_s / load.seconds}
    if schedule is not None:
        result |= {"unsent": schedule.total - schedule.taken, "send_lag_us": latency_us(lag)}
    return result


async def _closed_caller(send: Send, window: _Window) -> None:
    clock = time.perf_counter_ns
    while (begin := clock()) < window.end:
        try:
            await send()
        except Exception as error:  # counted, not raised; cancellation is not an Exception and still stops it
            window.record_failure(error, clock())
        else:
            window.record(begin, clock())


async def _open_caller(send: Send, window: _Window, lag: Histogram, schedule: _Schedule) -> None:
    clock = time.perf_counter_ns
    while (scheduled := schedule.take(clock())) is not None:
        wait_ns = scheduled - clock()
        if wait_ns > 0:
            await asyncio.sleep(wait_ns / 1e9)
        sent = clock()
        if sent >= window.start:
            lag.record(sent - scheduled)
        try:
            await send()
        except Exception as error:
            window.record_failure(error, clock())
        else:
            window.record(min(scheduled, sent), clock())


async def _show_progress(label: str, load: Load, window: _Window) -> None:
    """The warm-up's clock, then the window's count, until cancelled (the final line is _measure's)."""
    warmup, measured = Progress(f"{label} warm-up", load.warmup_s), Progress(label, load.seconds)
    recorder = window.recorder
    while True:
        await asyncio.sleep(measured.interval_ns / 1e9)
        now = time.perf_counter_ns()
        if now < window.start:
            warmup.update(load.warmup_s - (window.start - now) / 1e9, window.completed, 0)
        else:
            measured.update(min(now - window.start, window.end - window.start) / 1e9, recorder.count,
                            recorder.error_count)
