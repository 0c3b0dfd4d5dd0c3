"""Latency samples of one measured loop, and the summary every benchmark reports: rate, percentiles, count, errors.

Percentiles come from every recorded sample (NumPy's linear interpolation), never from a mean. Failed requests are
counted by kind and kept out of the samples, so a fast error path cannot flatter the latency figures.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


class LatencyRecorder:
    def __init__(self) -> None:
        self.samples_ns: list[int] = []
        self.errors: Counter[str] = Counter()
        self.first_error: str | None = None
        self.elapsed_s = 0.0

    @property
    def count(self) -> int:
        return len(self.samples_ns)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def record(self, latency_ns: int) -> None:
        self.samples_ns.append(latency_ns)

    def record_error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if self.first_error is None:
            self.first_error = f"{kind}: {detail}"

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures; latencies in microseconds, None when nothing succeeded."""
        samples_us = np.asarray(self.samples_ns, dtype=np.float64) / 1e3
        values = np.percentile(samples_us, PERCENTILES).tolist() if samples_us.size else [None] * len(PERCENTILES)
        return {
            "count": self.count,
            "errors": self.error_count,
            "error_kinds": dict(self.errors),
            "first_error": self.first_error,
            "elapsed_s": self.elapsed_s,
            "requests_per_s": self.count / self.elapsed_s if self.elapsed_s else 0.0,
            "latency_us": {f"p{p}": value for p, value in zip(PERCENTILES, values)},
        }
