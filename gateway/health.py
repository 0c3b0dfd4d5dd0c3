"""Backend health: active checks, passive outlier ejection, and which backends may take traffic. Plain code, no I/O.

How it works (Envoy's model): each backend has one `BackendHealth`, fed two kinds of observations with `now`.
- Active checks (the prober's results): `unhealthy_threshold` consecutive failures mark it unhealthy,
  `healthy_threshold` consecutive successes mark it healthy again. A backend starts healthy, so a fresh gateway
  serves at once instead of waiting for a round of probes.
- Passive results (real requests): `consecutive_failures` failures in a row eject it, if the pool allows another
  ejection (`may_eject`, bounded by `max_ejected_percent`). The n-th ejection lasts `ejection_s * 2**(n-1)`, capped
  at `max_ejection_s`, so a flapping backend stays out longer each time. Any success resets the count. When the
  ejection ends, the backend is back in whatever state its active checks say.
`candidates` turns a pool's states into the backends to balance over: the healthy ones, or — when fewer than
`panic_threshold_percent` are healthy — all of them (panic: better to spread the load over maybe-bad backends than
crush the few good ones), but nothing at all when none is healthy (the caller answers 503). A pool's states change
only with a result or when an ejection ends (`states_hold_until`), so its candidates can be kept between requests.

Guarantees: state changes only through the results and `now` given; `reconfigure` keeps counts and ejections.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal, Protocol, TypeVar

State = Literal["healthy", "unhealthy", "ejected"]
T = TypeVar("T")

# 2.0 ** n overflows past n = 1023; any duration is far past its cap long before this many doublings.
_MAX_DOUBLINGS = 64


class HealthCheckLike(Protocol):
    """The fields of `gateway.config.HealthCheck` health decisions read."""

    @property
    def interval_s(self) -> float: ...
    @property
    def unhealthy_threshold(self) -> int: ...
    @property
    def healthy_threshold(self) -> int: ...
    @property
    def jitter_percent(self) -> float: ...


class OutlierLike(Protocol):
    """The fields of `gateway.config.Outlier` health decisions read."""

    @property
    def consecutive_failures(self) -> int: ...
    @property
    def ejection_s(self) -> float: ...
    @property
    def max_ejection_s(self) -> float: ...


class BackendHealth:
    def __init__(self, check: HealthCheckLike, outlier: OutlierLike) -> None:
        self._check = check
        self._outlier = outlier
        self._active_healthy = True
        self._active_failures = 0
        self._active_successes = 0
        self._passive_failures = 0
        self._ejected_until = float("-inf")
        self._ejections = 0

    def reconfigure(self, check: HealthCheckLike, outlier: OutlierLike) -> None:
        """On reload: new thresholds apply from the next result; state, counts and a running ejection are kept."""
        self._check, self._outlier = check, outlier

    def active_result(self, ok: bool, now: float) -> None:
        """`now` is unused: active state changes by counts alone (kept so both result kinds are called alike)."""
        if ok:
            self._active_failures = 0
            self._active_successes += 1
            if self._active_successes >= self._check.healthy_threshold:
                self._active_healthy = True
        else:
            self._active_successes = 0
            self._active_failures += 1
            if self._active_failures >= self._check.unhealthy_threshold:
                self._active_healthy = False

    def passive_result(self, ok: bool, now: float, may_eject: bool) -> bool:
        """Count a request's outcome; True when this failure ejected the backend."""
        if ok:
            self._passive_failures = 0
            return False
        if now < self._ejected_until:
            return False  # requests in flight when it was ejected: they must not extend or repeat the ejection
        self._passive_failures += 1
        if self._passive_failures < self._outlier.consecutive_failures or not may_eject:
            return False
        duration = self._outlier.ejection_s * 2.0 ** min(self._ejections, _MAX_DOUBLINGS)
        self._ejected_until = now + min(duration, self._outlier.max_ejection_s)
        self._ejections += 1
        self._passive_failures = 0
        return True

    @property
    def ejected_until(self) -> float:
        """When the running (or last) ejection ends; -inf if never ejected."""
        return self._ejected_until

    def state(self, now: float) -> State:
        if now < self._ejected_until:
            return "ejected"
        return "healthy" if self._active_healthy else "unhealthy"

    @property
    def ejections(self) -> int:
        """Total times ejected (a metric; also sets the next ejection's length)."""
        return self._ejections


def next_check_delay(check: HealthCheckLike, rng: random.Random) -> float:
    """interval_s ± jitter_percent, uniformly: spreads probes so many gateways do not hit a backend in step."""
    return check.interval_s * (1.0 + rng.uniform(-1.0, 1.0) * check.jitter_percent / 100.0)


def candidates(states: Sequence[tuple[T, State]], panic_threshold_percent: float) -> tuple[list[T], bool]:
    """The backends to balance over, and whether the pool is in panic (then it is all of them)."""
    healthy = [backend for backend, state in states if state == "healthy"]
    if not healthy:
        return [], False
    if len(healthy) * 100 < panic_threshold_percent * len(states):
        return [backend for backend, _ in states], True
    return healthy, False


def states_hold_until(healths: Sequence[BackendHealth], now: float) -> float:
    """Until when the states of `healths` stay as they are `now` unless a new result comes: the end of the
    earliest ejection still running (an ejection's end is the one change time alone makes), else +inf."""
    return min((health.ejected_until for health in healths if health.ejected_until > now), default=math.inf)


def may_eject(states: Sequence[State], max_ejected_percent: float) -> bool:
    """Whether one more backend of these may be ejected without passing max_ejected_percent of the pool."""
    ejected = sum(state == "ejected" for state in states)
    return (ejected + 1) * 100 <= max_ejected_percent * len(states)
