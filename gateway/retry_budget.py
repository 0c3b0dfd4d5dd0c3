"""A retry budget (linkerd's and Envoy's idea): retries may add at most `budget_percent` of a pool's recent
requests, plus a small floor (`min_retries_per_s`) so a quiet pool can still retry. Plain code, clock passed in.

Why: retries on every failure turn a struggling backend into a retry storm. Bounding them by a share of the traffic
keeps the extra load proportional, however many clients retry at once.

How it works: requests and retries are counted in one-second buckets over the last `window_s` seconds. A retry is
allowed while retries < requests × budget_percent / 100 + min_retries_per_s × window_s.
"""

from __future__ import annotations

import math
from collections import deque


class RetryBudget:
    def __init__(self, budget_percent: float, min_retries_per_s: float, window_s: int = 10) -> None:
        self.budget_percent = budget_percent
        self.min_retries_per_s = min_retries_per_s
        self._window_s = window_s
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries], oldest first

    def reconfigure(self, budget_percent: float, min_retries_per_s: float) -> None:
        self.budget_percent, self.min_retries_per_s = budget_percent, min_retries_per_s

    def record_request(self, now: float) -> None:
        self._bucket(now)[1] += 1

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it."""
        bucket = self._bucket(now)
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        if retries >= requests * self.budget_percent / 100 + self.min_retries_per_s * self._window_s:
            return False
        bucket[2] += 1
        return True

    def _bucket(self, now: float) -> list[int]:
        second = math.floor(now)
        while self._buckets and self._buckets[0][0] <= second - self._window_s:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]
