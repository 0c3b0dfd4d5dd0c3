"""A closed loop: one caller sends the next request as soon as the previous one completes, for a fixed time.

At concurrency 1 the rate is the inverse of the mean latency, so rate and percentiles describe the same samples.
The loop ends by itself: the clock is read after every request, and a request that hangs is bounded by its own
timeout (the REST client sets one). Any exception a request raises is counted as an error, never propagated;
Ctrl-C (KeyboardInterrupt) is not an Exception and still stops the run.
"""

from __future__ import annotations

import time
from typing import Callable

from bench.latency import LatencyRecorder
from bench.progress import Progress


def run_closed_loop(request: Callable[[], None], seconds: float, progress: Progress) -> LatencyRecorder:
    recorder = LatencyRecorder()
    clock = time.perf_counter_ns
    start = now = clock()
    deadline = start + int(seconds * 1e9)
    next_update = start + progress.interval_ns
    while now < deadline:
        begin = clock()  # not `now`: a progress write since then must not count as latency
        try:
            request()
        except Exception as error:  # counted, not raised: see the module docstring
            now = clock()
            recorder.record_failure(error)
        else:
            now = clock()
            recorder.record(now - begin)
        if next_update <= now < deadline:  # the last line is done()'s
            progress.update((now - start) / 1e9, recorder.count, recorder.error_count)
            next_update = now + progress.interval_ns
    recorder.elapsed_s = (now - start) / 1e9
    progress.done(recorder.elapsed_s, recorder.count, recorder.error_count)
    return recorder


def measure(label: str, request: Callable[[], None], seconds: float, warmup_s: float) -> LatencyRecorder:
    """A warm-up loop whose results are dropped (first-call tracing, caches, connection set-up), then the real one."""
    if warmup_s > 0:
        run_closed_loop(request, warmup_s, Progress(f"{label} warm-up", warmup_s))
    return run_closed_loop(request, seconds, Progress(label, seconds))
