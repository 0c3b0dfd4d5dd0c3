"""Balancer decisions with a fake clock (plain floats) and seeded RNGs: peak EWMA, round robin, P2C by cost."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from gateway.balancer import Balancer, LeastLatency, PeakEwma, RoundRobin, UpstreamLoad, make_balancer

MS = 0.001


# --- PeakEwma ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("now", [0.0, 5.0, 1e6])
def test_estimate_without_samples_is_the_initial_guess(now: float) -> None:
    assert PeakEwma(initial_s=0.25).estimate(now) == 0.25
    assert PeakEwma().estimate(now) == MS


@pytest.mark.parametrize("first", [0.5 * MS, 7 * MS])
def test_first_sample_replaces_the_initial_guess(first: float) -> None:
    ewma = PeakEwma(initial_s=MS)
    ewma.observe(first, now=100.0)
    assert ewma.estimate(100.0) == first


@pytest.mark.parametrize(
    ("samples", "at", "expected"),
    [
        # (rtt, time) samples, then the estimate at `at`; decay_s = 10
        ([(1 * MS, 0.0), (20 * MS, 0.001)], 0.001, 20 * MS),  # a peak is taken at once, however soon
        # a lower sample is blended into the decayed estimate: 20 ms × e⁻¹ is 7.4 ms, its weight e⁻¹ again
        ([(20 * MS, 0.0), (1 * MS, 10.0)], 10.0, 20 * MS * math.exp(-2) + 1 * MS * (1 - math.exp(-1))),
        ([(20 * MS, 0.0), (1 * MS, 0.0)], 0.0, 20 * MS),  # no time passed: a lower sample has no weight yet
        ([(20 * MS, 0.0), (1 * MS, 1e6)], 1e6, 1 * MS),  # long after: the old peak is gone
        ([(20 * MS, 0.0), (5 * MS, 20.0)], 20.0, 5 * MS),  # above the decayed 2.7 ms: a peak again
        ([(20 * MS, 0.0)], 10.0, 20 * MS * math.exp(-1)),  # no news decays toward zero
        ([(20 * MS, 0.0)], 20.0, 20 * MS * math.exp(-2)),
    ],
)
def test_peak_ewma(samples: list[tuple[float, float]], at: float, expected: float) -> None:
    ewma = PeakEwma(decay_s=10.0)
    for rtt, now in samples:
        ewma.observe(rtt, now)
    assert ewma.estimate(at) == pytest.approx(expected, rel=1e-12)


def test_lower_samples_pull_the_estimate_down_gradually() -> None:
    ewma = PeakEwma(decay_s=10.0)
    ewma.observe(20 * MS, 0.0)
    seen = []
    for second in range(1, 61):
        ewma.observe(1 * MS, float(second))
        seen.append(ewma.estimate(float(second)))
    assert all(a >= b >= 1 * MS for a, b in itertools.pairwise(seen))  # falling, never below the samples
    assert seen[0] > 15 * MS  # one second after the peak it still dominates
    assert seen[-1] == 1 * MS


# --- UpstreamLoad --------------------------------------------------------------------------------------------------


def test_load_counts_and_cost() -> None:
    load = UpstreamLoad(ewma=PeakEwma(decay_s=10.0, initial_s=2 * MS))
    assert load.cost(0.0) == 2 * MS
    load.start()
    load.start()
    assert (load.in_flight, load.requests) == (2, 0)
    assert load.cost(0.0) == pytest.approx(3 * 2 * MS)  # estimate × (in flight + 1)
    load.finish(4 * MS, ok=True, now=1.0)
    load.finish(1 * MS, ok=False, now=1.0)
    assert (load.in_flight, load.requests, load.failures) == (0, 2, 1)
    assert load.cost(1.0) == pytest.approx(4 * MS)


@pytest.mark.parametrize(
    ("rtt", "ok", "expected"),
    [
        (0.1 * MS, True, 10 * MS * math.exp(-0.2) + 0.1 * MS * (1 - math.exp(-0.1))),  # success pulls it down
        (0.1 * MS, False, 10 * MS * math.exp(-0.1)),  # a fast failure (connection refused) is not a latency sample
        (30.0, False, 30.0),  # a slow failure (timeout) is a peak
    ],
)
def test_failures_never_lower_the_estimate(rtt: float, ok: bool, expected: float) -> None:
    load = UpstreamLoad(ewma=PeakEwma(decay_s=10.0))
    load.start()
    load.finish(10 * MS, ok=True, now=0.0)
    load.start()
    load.finish(rtt, ok=ok, now=1.0)
    assert load.ewma.estimate(1.0) == pytest.approx(expected, rel=1e-12)


# --- RoundRobin ----------------------------------------------------------------------------------------------------


def no_load(name: str) -> UpstreamLoad:
    raise AssertionError("round robin must not read load")


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_round_robin_is_exactly_even(k: int) -> None:
    balancer = RoundRobin()
    names = [f"b{i}" for i in range(k)]
    counts = Counter(balancer.pick(names, no_load, 0.0) for _ in range(k * 100))
    assert counts == Counter({name: 100 for name in names})


@pytest.mark.parametrize(
    "phases",
    [
        ["abc", "ab", "abc"],  # one ejected, then back
        ["ab", "abcd", "a", "dc"],  # grows, shrinks to one, changes members
        ["abcde", "bd", "abcde"],
    ],
)
def test_round_robin_stays_fair_when_candidates_change(phases: list[str]) -> None:
    balancer = RoundRobin()
    balancer.pick(["x", "y", "z"], no_load, 0.0)  # a counter mid-rotation: fairness must not depend on its start
    for members in phases:
        candidates = list(members)
        counts = Counter(balancer.pick(candidates, no_load, 0.0) for _ in range(len(candidates) * 50))
        assert counts == Counter({c: 50 for c in candidates})


# --- LeastLatency (P2C) --------------------------------------------------------------------------------------------


class Fleet:
    """Sequential requests on a fake clock: each pick runs one request of the backend's current latency."""

    def __init__(self, names: Sequence[str], balancer: Balancer, latency_s: float = 1 * MS) -> None:
        self.loads = {name: UpstreamLoad() for name in names}
        self.latency = {name: latency_s for name in names}
        self.balancer = balancer
        self.now = 0.0

    def run(self, picks: int, candidates: Sequence[str] | None = None) -> Counter[str]:
        counts: Counter[str] = Counter()
        for _ in range(picks):
            chosen = self.balancer.pick(candidates or list(self.loads), self.loads.__getitem__, self.now)
            counts[chosen] += 1
            self.loads[chosen].start()
            self.now += self.latency[chosen]
            self.loads[chosen].finish(self.latency[chosen], ok=True, now=self.now)
        return counts


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_p2c_shuns_a_slow_backend_and_takes_it_back_after_it_heals(seed: int) -> None:
    fleet = Fleet(["a", "b", "c"], LeastLatency(random.Random(seed)))
    warm = fleet.run(600)
    assert all(count / 600 == pytest.approx(1 / 3, abs=0.05) for count in warm.values())

    fleet.latency["c"] = 20 * MS  # c turns slow
    slow = fleet.run(1000)
    assert slow["c"] / 1000 < 0.15

    fleet.latency["c"] = 1 * MS  # c heals; without traffic only time brings its estimate down
    fleet.now += 60.0
    healed = fleet.run(3000)
    assert healed["c"] / 3000 == pytest.approx(1 / 3, abs=0.05)


def test_p2c_a_slow_backend_is_probed_again_while_still_slow() -> None:
    fleet = Fleet(["a", "b"], LeastLatency(random.Random(5)))
    fleet.run(100)
    fleet.latency["b"] = 20 * MS
    fleet.run(100)
    fleet.now += 60.0  # b's estimate decayed below a's: one probe, which sees 20 ms again
    probe = fleet.run(200)
    assert 1 <= probe["b"] <= 2


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        # (estimate, in flight) per backend; cost = estimate × (in flight + 1)
        ((1 * MS, 0), (1 * MS, 3), "a"),
        ((1 * MS, 3), (1 * MS, 0), "b"),
        ((5 * MS, 0), (1 * MS, 3), "b"),  # 5 ms vs 4 ms
        ((3 * MS, 0), (1 * MS, 3), "a"),  # 3 ms vs 4 ms
        ((20 * MS, 0), (1 * MS, 0), "b"),
    ],
)
@pytest.mark.parametrize("seed", range(5))
def test_p2c_cost_weighs_in_flight(a: tuple[float, int], b: tuple[float, int], winner: str, seed: int) -> None:
    loads = {}
    for name, (estimate, in_flight) in {"a": a, "b": b}.items():
        loads[name] = UpstreamLoad(ewma=PeakEwma(initial_s=estimate))
        for _ in range(in_flight):
            loads[name].start()
    # with two candidates P2C always compares both, so the cheaper wins whatever the draw
    assert LeastLatency(random.Random(seed)).pick(["a", "b"], loads.__getitem__, 0.0) == winner


def test_p2c_concurrent_requests_spread_by_in_flight() -> None:
    """Requests that pile up on one backend (all equally fast) push new picks to the others."""
    loads = {name: UpstreamLoad() for name in "abcd"}
    balancer = LeastLatency(random.Random(11))
    counts: Counter[str] = Counter()
    for _ in range(40):  # 40 requests started, none finished
        chosen = balancer.pick(list(loads), loads.__getitem__, 0.0)
        loads[chosen].start()
        counts[chosen] += 1
    assert max(counts.values()) - min(counts.values()) <= 2


@pytest.mark.parametrize("kind", ["round_robin", "least_latency"])
@pytest.mark.parametrize("seed", range(3))
def test_never_picks_outside_candidates(kind: str, seed: int) -> None:
    rng = random.Random(seed)
    balancer = make_balancer(kind, random.Random(seed))  # type: ignore[arg-type]
    pool = [f"b{i}" for i in range(8)]
    loads = {name: UpstreamLoad(ewma=PeakEwma(initial_s=rng.uniform(0.1, 50) * MS)) for name in pool}
    for step in range(2000):
        candidates = rng.sample(pool, rng.randint(1, len(pool)))
        chosen = balancer.pick(candidates, loads.__getitem__, step * MS)
        assert chosen in candidates
        loads[chosen].start()
        if rng.random() < 0.7:
            loads[chosen].finish(rng.uniform(0.1, 50) * MS, ok=rng.random() < 0.9, now=step * MS)


@pytest.mark.parametrize("balancer", [RoundRobin(), LeastLatency(random.Random(0))])
def test_one_candidate_is_picked(balancer: Balancer) -> None:
    loads = {"only": UpstreamLoad(), "other": UpstreamLoad()}
    assert all(balancer.pick(["only"], loads.__getitem__, float(t)) == "only" for t in range(10))


def test_make_balancer() -> None:
    assert isinstance(make_balancer("round_robin", random.Random(0)), RoundRobin)
    assert isinstance(make_balancer("least_latency", random.Random(0)), LeastLatency)
