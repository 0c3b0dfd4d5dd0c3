"""A log-linear histogram of latencies in the manner of HdrHistogram: fixed memory, constant-time recording, and
percentiles with a bounded relative error however many samples a long run collects.

How it works: a value (an integer, nanoseconds here) below 2**SUB_BUCKET_BITS gets its own bucket. A larger value
with bit length b falls in one of 2**(SUB_BUCKET_BITS-1) equal buckets spanning [2**(b-1), 2**b), so every bucket is
at most 2**(1-SUB_BUCKET_BITS) of its values wide (under 0.8%), and a percentile reported as its bucket's midpoint
is within half that (0.4%) of the true sample. The minimum and maximum are kept exactly.
"""

from __future__ import annotations

import math

SUB_BUCKET_BITS = 8
_HALF = 1 << (SUB_BUCKET_BITS - 1)
_BUCKETS = (64 - SUB_BUCKET_BITS + 2) * _HALF  # enough for any value below 2**64


def bucket_index(value: int) -> int:
    shift = value.bit_length() - SUB_BUCKET_BITS
    if shift <= 0:
        return value
    return (shift << (SUB_BUCKET_BITS - 1)) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The smallest and largest value that land in bucket `index`; the inverse of bucket_index."""
    if index < 2 * _HALF:
        return index, index
    shift = (index >> (SUB_BUCKET_BITS - 1)) - 1
    low = (index - (shift << (SUB_BUCKET_BITS - 1))) << shift
    return low, low + (1 << shift) - 1


class Histogram:
    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self.count = 0
        self.min: int | None = None
        self.max: int | None = None

    def record(self, value: int) -> None:
        """Record a non-negative integer (a negative one, from a clock's jitter, counts as 0)."""
        value = max(value, 0)
        self._counts[bucket_index(value)] += 1
        self.count += 1
        if self.max is None or value > self.max:
            self.max = value
        if self.min is None or value < self.min:
            self.min = value

    def percentile(self, percent: float) -> float | None:
        """The value at or below which `percent` % of the samples lie (within the bucket error); None when empty."""
        if not self.count or self.min is None or self.max is None:
            return None
        rank = max(1, math.ceil(percent / 100 * self.count))
        if rank >= self.count:
            return float(self.max)
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                low, high = bucket_bounds(index)
                return min(max((low + high) / 2, self.min), self.max)  # the exact extremes beat a midpoint
        raise AssertionError("counts add up to less than count")
