"""What a thread pays on this machine for having slept: the wake-up itself, and a slower pass over the model's
weights after it. A benchmark's latencies include both, several times over.

Why: on a virtual machine an idle vCPU halts, and waking it goes through the hypervisor. On this project's CI-class
machine a pipe round trip to a thread that slept 2 ms took ~0.1 ms at the median, and at the p99 3-6 ms in a busy
spell (15-30% steal) but 0.2 ms in a quiet one the same day; 0.03 ms when the thread never slept. A served request
crosses such wake-ups several times (client → event loop → batch thread → event loop → client; more through the
gateway), so in a busy spell a p99 target of a few milliseconds can be out of reach for reasons outside tfgate.
Each latency benchmark prints these figures beside its own.

The second figure: a pass over 8 MB (the demo MLP's weights are 7.3 MB) right after sleeping, divided by the same pass
back to back. Measured here: 1.7x (a cache-resident step: 1.07x), and the MLP's 4-row step in TensorFlow took 2.4 ms
after 3 ms asleep against 0.9 ms back to back. Most likely the host gives the idle moment to other guests, who share
its last-level cache, so the weights are lost from it. The in-process ceiling runs steps back to back; a server at
moderate load starts most batches after an idle moment, so its steps run slower than the ceiling's for this reason
alone.

How: a thread echoes one byte over a pair of pipes; the caller sleeps IDLE_S between round trips (so the echoing
thread's CPU may go idle), and times each with time.perf_counter_ns. The pass is NumPy's sum over a float32 array,
timed the same way, back to back and after sleeping, and the two medians are divided.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from bench.histogram import Histogram

PERCENTILES = (50.0, 90.0, 99.0)
IDLE_S = 0.002
COLD_PASS_BYTES = 8 * 1024 * 1024
_COLD_IDLE_S = 0.003
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


def cold_pass_ratio(samples: int = 60) -> float:
    """Median time of a pass over COLD_PASS_BYTES right after sleeping, over the median back to back."""
    data = np.ones(COLD_PASS_BYTES // 4, np.float32)
    return median_ns(data.sum, _COLD_IDLE_S, samples) / median_ns(data.sum, 0.0, samples)


def median_ns(work: Callable[[], object], idle_s: float, samples: int) -> float:
    """Median nanoseconds of `work`, each call right after sleeping `idle_s` (0: back to back)."""
    times = []
    for _ in range(samples):
        if idle_s:
            time.sleep(idle_s)
        started = time.perf_counter_ns()
        work()
        times.append(time.perf_counter_ns() - started)
    return statistics.median(times)


def describe_wakeup(machine: Mapping[str, Any]) -> str:
    """One line for a report, from the `thread_wakeup_us` and `cold_pass_ratio` of bench.report.environment()."""
    figures, cold_ratio = machine["thread_wakeup_us"], machine["cold_pass_ratio"]

    def ms(key: str) -> str:
        value = figures.get(key)
        return "-" if value is None else f"{value / 1000:.2f}"

    cold = "-" if cold_ratio is None else f"{cold_ratio:.2f}x"
    return (f"machine: a thread woken after {IDLE_S * 1000:g} ms asleep answers in p50 {ms('p50')} ms, "
            f"p90 {ms('p90')} ms, p99 {ms('p99')} ms; a pass over {COLD_PASS_BYTES >> 20} MB after "
            f"{_COLD_IDLE_S * 1000:g} ms asleep takes {cold} its time back to back (bench/wakeup.py)")


def _us(nanoseconds: float | None) -> float | None:
    return None if nanoseconds is None else nanoseconds / 1000
