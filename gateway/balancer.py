"""Which backend of a pool serves the next request. Plain code, no I/O: the clock (`now`, seconds) and RNG are passed in.

How it works: the upstream layer keeps one `UpstreamLoad` per backend (requests in flight and a latency estimate)
and calls `start()` / `finish()` around every request. A balancer reads those loads and picks from the candidates
the health layer allows:
- `RoundRobin` rotates one counter over whatever candidate list it is given (index = counter % len), so every
  candidate gets an equal share, also after the list shrinks or grows.
- `LeastLatency` draws two distinct candidates and takes the cheaper (power of two choices, as in Finagle, linkerd2
  and Envoy). Cost = peak-EWMA latency × (in flight + 1), so a backend that turns slow or piles up requests loses
  traffic within a few requests, while the random pair keeps the choice spread out and avoids herding onto one
  backend.

`PeakEwma` (linkerd2's, from Finagle): between samples the estimate decays toward zero by exp(-elapsed/decay_s)
(tower's `decay`, as if zero-latency samples arrived), so a backend that stopped getting traffic because it was
slow is tried again after a while and can win its share back. A sample above the decayed estimate replaces it at
once, so a slowdown is seen immediately; a lower sample is blended in with weight 1 - exp(-elapsed/decay_s), so
recovery is gradual. After a sample the estimate is never below that sample.

Guarantees: `pick` returns an element of `candidates` (which must be non-empty); a failed request never lowers a
backend's estimate, so a backend failing fast does not look fast.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

T = TypeVar("T")


class PeakEwma:
    """Peak-sensitive EWMA of latency (Finagle / linkerd2 style)."""

    def __init__(self, decay_s: float = 10.0, initial_s: float = 0.001) -> None:
        self.decay_s = decay_s
        self._value = initial_s
        self._at: float | None = None  # time of the last sample; None: only the initial guess so far

    def observe(self, rtt_s: float, now: float) -> None:
        weight = self._decay(now)
        current = self._value * weight
        if self._at is None or rtt_s >= current:
            self._value = rtt_s  # the first sample replaces the guess; a peak is taken at once
        else:
            self._value = current * weight + rtt_s * (1.0 - weight)
        self._at = now

    def estimate(self, now: float) -> float:
        """Seconds; decays toward zero while no sample arrives, so an idle backend is probed again."""
        return self._value * self._decay(now)

    def _decay(self, now: float) -> float:
        """The weight of the estimate `now`: exp(-time since the last sample / decay_s); 1 before any sample."""
        return 1.0 if self._at is None else math.exp(-max(now - self._at, 0.0) / self.decay_s)


@dataclass(slots=True, eq=False)
class UpstreamLoad:
    """Mutable load state of one backend, owned by the upstream layer and read by the balancers."""

    in_flight: int = 0
    ewma: PeakEwma = field(default_factory=PeakEwma)
    requests: int = 0  # finished requests
    failures: int = 0

    def start(self) -> None:
        self.in_flight += 1

    def finish(self, rtt_s: float, ok: bool, now: float) -> None:
        self.in_flight -= 1
        self.requests += 1
        if not ok:
            self.failures += 1
        # A refused connection fails in microseconds: counting that as latency would draw traffic to a broken backend.
        if ok or rtt_s > self.ewma.estimate(now):
            self.ewma.observe(rtt_s, now)

    def cost(self, now: float) -> float:
        return self.ewma.estimate(now) * (self.in_flight + 1)


class RoundRobin:
    def __init__(self) -> None:
        self._counter = 0

    def pick(self, candidates: Sequence[T], load: Callable[[T], UpstreamLoad], now: float) -> T:
        """Ignores `load` and `now`; they keep both balancers interchangeable."""
        chosen = candidates[self._counter % len(candidates)]
        self._counter += 1
        return chosen


class LeastLatency:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[T], load: Callable[[T], UpstreamLoad], now: float) -> T:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:  # two distinct indexes, every pair equally likely
            second += 1
        a, b = candidates[first], candidates[second]
        return b if load(b).cost(now) < load(a).cost(now) else a


Balancer = RoundRobin | LeastLatency


def make_balancer(kind: Literal["round_robin", "least_latency"], rng: random.Random) -> Balancer:
    return RoundRobin() if kind == "round_robin" else LeastLatency(rng)
