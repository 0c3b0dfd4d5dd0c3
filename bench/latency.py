"""Latency samples of one measured loop, and the summary every benchmark reports: rate, percentiles, count, errors.

Samples go into a log-linear histogram (bench.histogram), so a long or fast run costs constant memory and the
percentiles are within 0.4% of the exact ones; never a mean. Failed requests are counted by kind and kept out of the
samples, so a fast error path cannot flatter the latency figures.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench.histogram import Histogram

PERCENTILES = (50, 90, 99, 99.9)


class RequestFailed(Exception):
    """A response that arrived but was wrong: `kind` is what the report counts, `detail` what it shows once."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def percentile_key(percent: float) -> str:
    return f"p{percent:g}"


class LatencyRecorder:
    def __init__(self) -> None:
        self.histogram = Histogram()
        self.errors: Counter[str] = Counter()
        self.first_error: str | None = None
        self.elapsed_s = 0.0

    @property
    def count(self) -> int:
        return self.histogram.count

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def record(self, latency_ns: int) -> None:
        self.histogram.record(latency_ns)

    def record_error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if self.first_error is None:
            self.first_error = f"{kind}: {detail}"

    def record_failure(self, error: Exception) -> None:
        """A failed request: RequestFailed says what it was; any other exception is counted by its type."""
        if isinstance(error, RequestFailed):
            self.record_error(error.kind, error.detail)
        else:
            self.record_error(type(error).__name__, str(error))

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures; latencies in microseconds, None when nothing succeeded."""
        return {
            "count": self.count,
            "errors": self.error_count,
            "error_kinds": dict(self.errors),
            "first_error": self.first_error,
            "elapsed_s": self.elapsed_s,
            "requests_per_s": self.count / self.elapsed_s if self.elapsed_s else 0.0,
            "latency_us": latency_us(self.histogram),
        }


def latency_us(histogram: Histogram) -> dict[str, float | None]:
    """The reported percentiles of a histogram of nanoseconds, in microseconds."""
    values = {percentile_key(p): histogram.percentile(p) for p in PERCENTILES}
    return {key: None if value is None else value / 1e3 for key, value in values.items()}
