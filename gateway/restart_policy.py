"""When to restart a crashed backend, and when to stop trying. Plain code, no I/O: `now` and the RNG are passed in.

How it works: one `RestartPolicy` per backend. The supervisor calls `on_started(now)` when it starts the process and
`on_exit(now, rng)` when it exits; `on_exit` answers the delay before the next start, or None to give up.
- Backoff: the n-th consecutive crash waits `initial_s * multiplier**(n-1)`, capped at `max_s`, then spread by
  ± `jitter` (a fraction) so backends that crashed together do not restart in step. A run that lasted at least
  `healthy_after_s` was a success: the exit after it starts over from `initial_s`.
- Crash loop: more than `crash_loop_restarts` exits within `crash_loop_window_s` (the current one included) and
  the policy gives up for good; the supervisor reports the backend failed instead of spinning on it.

Guarantees: a delay is always within `[d * (1 - jitter), d * (1 + jitter)]` for the unjittered d <= max_s; once
given up, every later `on_exit` returns None.
"""

from __future__ import annotations

import random
from collections import deque


class RestartPolicy:
    def __init__(
        self,
        initial_s: float = 1.0,
        max_s: float = 60.0,
        multiplier: float = 2.0,
        jitter: float = 0.2,
        crash_loop_restarts: int = 5,
        crash_loop_window_s: float = 120.0,
        healthy_after_s: float = 60.0,
    ) -> None:
        if not 0.0 < initial_s <= max_s:
            raise ValueError(f"need 0 < initial_s <= max_s, got {initial_s} and {max_s}")
        if multiplier < 1.0:
            raise ValueError(f"multiplier must be at least 1, got {multiplier}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be a fraction in [0, 1), got {jitter}")
        if crash_loop_restarts < 0 or crash_loop_window_s <= 0.0 or healthy_after_s < 0.0:
            raise ValueError("crash_loop_restarts and healthy_after_s must not be negative, the window must be > 0")
        self._initial_s = initial_s
        self._max_s = max_s
        self._multiplier = multiplier
        self._jitter = jitter
        self._crash_loop_restarts = crash_loop_restarts
        self._window_s = crash_loop_window_s
        self._healthy_after_s = healthy_after_s
        self._next_s = initial_s  # unjittered delay for the next crash; grows by multiplying, so it cannot overflow
        self._started_at: float | None = None
        self._exits: deque[float] = deque()  # exit times within the window, oldest first
        self._restarts = 0
        self._gave_up = False

    def on_started(self, now: float) -> None:
        """Remember the start: the exit compares with it to tell a healthy run from a crash."""
        self._started_at = now

    def on_exit(self, now: float, rng: random.Random) -> float | None:
        """Seconds to wait before starting again, or None: a crash loop, give up."""
        if self._gave_up:
            return None
        if self._started_at is not None and now - self._started_at >= self._healthy_after_s:
            self._next_s = self._initial_s
        self._started_at = None
        self._exits.append(now)
        while self._exits[0] <= now - self._window_s:
            self._exits.popleft()
        if len(self._exits) > self._crash_loop_restarts:
            self._gave_up = True
            return None
        delay = self._next_s
        self._next_s = min(self._next_s * self._multiplier, self._max_s)
        self._restarts += 1
        return delay * (1.0 + rng.uniform(-self._jitter, self._jitter))

    @property
    def restarts(self) -> int:
        """Restarts granted so far (a metric)."""
        return self._restarts

    @property
    def gave_up(self) -> bool:
        return self._gave_up
