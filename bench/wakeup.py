"""How long this machine takes to wake a sleeping thread: a benchmark's latencies include it several times over.

Why: on a virtual machine an idle vCPU halts, and waking it goes through the hypervisor. On this project's CI-class
machine a pipe round trip to a thread that slept 2 ms took ~0.1 ms at the median, and at the p99 3-6 ms in a busy
spell (15-30% steal) but 0.2 ms in a quiet one the same day; 0.03 ms when the thread never slept. A served request
crosses such wake-ups several times (client → event loop → batch thread → event loop → client; more through the
gateway), so in a busy spell a p99 target of a few milliseconds can be out of reach for reasons outside tfgate.
Each latency benchmark prints this figure beside its own.

How: a thread echoes one byte over a pair of pipes; the caller sleeps IDLE_S between round trips (so the echoing
thread's CPU may go idle), and times each with time.perf_counter_ns.
"""

from __future__ import annotations

import os
import threading
import time

from bench.histogram import Histogram

PERCENTILES = (50.0, 90.0, 99.0)
IDLE_S = 0.002
_STOP = b"q"


def thread_wakeup_us(samples: int = 200) -> dict[str, float | None]:
    """Percentiles (p50, p90, p99; microseconds) of a round trip to a thread that slept IDLE_S before each."""
    to_echo, from_echo = os.pipe(), os.pipe()

    def echo() -> None:
        while (byte := os.read(to_echo[0], 1)) not in (_STOP, b""):
            os.write(from_echo[1], byte)

    echoing = threading.Thread(target=echo, name="wakeup-echo", daemon=True)
    echoing.start()
    histogram = Histogram()
    try:
        for _ in range(samples):
            time.sleep(IDLE_S)
            started = time.perf_counter_ns()
            os.write(to_echo[1], b"x")
            os.read(from_echo[0], 1)
            histogram.record(time.perf_counter_ns() - started)
    finally:
        os.write(to_echo[1], _STOP)
        echoing.join()
        for descriptor in (*to_echo, *from_echo):
            os.close(descriptor)
    return {f"p{percent:g}": _us(histogram.percentile(percent)) for percent in PERCENTILES}


def describe_wakeup(figures: dict[str, float | None]) -> str:
    """One line for a report."""
    def ms(key: str) -> str:
        value = figures.get(key)
        return "-" if value is None else f"{value / 1000:.2f}"

    return (f"machine: a thread woken after {IDLE_S * 1000:g} ms asleep answers in p50 {ms('p50')} ms, "
            f"p90 {ms('p90')} ms, p99 {ms('p99')} ms (bench/wakeup.py); a request crosses several such wake-ups")


def _us(nanoseconds: float | None) -> float | None:
    return None if nanoseconds is None else nanoseconds / 1000
