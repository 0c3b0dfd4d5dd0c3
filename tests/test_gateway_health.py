"""Health decisions as tables with a fake clock: active thresholds, outlier ejection, panic, check jitter."""

from __future__ import annotations

import math
import random

import pytest

from gateway.config import HealthCheck, Outlier
from gateway.health import BackendHealth, State, candidates, may_eject, next_check_delay, states_hold_until


def test_starts_healthy() -> None:
    health = BackendHealth(HealthCheck(), Outlier())
    assert health.state(0.0) == "healthy"
    assert health.ejections == 0


@pytest.mark.parametrize(
    ("unhealthy_threshold", "healthy_threshold", "results", "expected"),
    [
        (2, 1, "FFT", ["healthy", "unhealthy", "healthy"]),
        (1, 1, "FTF", ["unhealthy", "healthy", "unhealthy"]),
        # a success in between restarts the failure count
        (3, 2, "FFTFFFTT", ["healthy"] * 5 + ["unhealthy", "unhealthy", "healthy"]),
        # a failure in between restarts the success count
        (1, 3, "FTTFTTT", ["unhealthy"] * 6 + ["healthy"]),
        (2, 2, "TTTT", ["healthy"] * 4),
    ],
)
def test_active_thresholds(
    unhealthy_threshold: int, healthy_threshold: int, results: str, expected: list[State]
) -> None:
    health = BackendHealth(
        HealthCheck(unhealthy_threshold=unhealthy_threshold, healthy_threshold=healthy_threshold), Outlier()
    )
    states = []
    for now, result in enumerate(results):
        health.active_result(result == "T", float(now))
        states.append(health.state(float(now)))
    assert states == expected


@pytest.mark.parametrize(
    ("results", "ejected_at"),
    [
        # request outcomes at t = 0, 1, 2, ... with consecutive_failures = 3; the index of the failure that ejects
        ("FFF", [2]),
        ("FFTFF", []),  # a success resets the count
        ("FFTFFF", [5]),
        ("TFFFTTT", [3]),
        ("FF" + "T" * 20 + "FF", []),
    ],
)
def test_passive_ejection_after_consecutive_failures(results: str, ejected_at: list[int]) -> None:
    health = BackendHealth(HealthCheck(), Outlier(consecutive_failures=3, ejection_s=1000))
    ejected = [now for now, result in enumerate(results) if health.passive_result(result == "T", float(now), True)]
    assert ejected == ejected_at
    assert health.state(float(len(results))) == ("ejected" if ejected_at else "healthy")


def test_ejection_time_doubles_up_to_the_cap() -> None:
    health = BackendHealth(HealthCheck(), Outlier(consecutive_failures=2, ejection_s=30, max_ejection_s=200))
    now = 0.0
    durations = []
    for _ in range(6):
        assert not health.passive_result(False, now, may_eject=True)
        assert health.passive_result(False, now, may_eject=True)
        start = now
        while health.state(now) == "ejected":
            now += 1.0
        durations.append(now - start)
    assert durations == [30, 60, 120, 200, 200, 200]
    assert health.ejections == 6


@pytest.mark.parametrize(
    ("at", "expected"),
    [(99.0, "ejected"), (99.999, "ejected"), (100.0, "healthy"), (1e9, "healthy")],
)
def test_ejection_ends_when_its_time_passes(at: float, expected: State) -> None:
    health = BackendHealth(HealthCheck(), Outlier(consecutive_failures=1, ejection_s=30))
    assert health.passive_result(False, 70.0, may_eject=True)
    assert health.state(at) == expected


def test_ejected_backend_returns_to_its_active_state() -> None:
    health = BackendHealth(HealthCheck(unhealthy_threshold=1), Outlier(consecutive_failures=1, ejection_s=30))
    assert health.passive_result(False, 0.0, may_eject=True)
    health.active_result(False, 10.0)  # probes keep running during the ejection
    assert health.state(10.0) == "ejected"
    assert health.state(30.0) == "unhealthy"
    health.active_result(True, 31.0)
    assert health.state(31.0) == "healthy"


def test_failures_while_ejected_neither_extend_nor_repeat_the_ejection() -> None:
    health = BackendHealth(HealthCheck(), Outlier(consecutive_failures=2, ejection_s=30))
    health.passive_result(False, 0.0, True)
    assert health.passive_result(False, 0.0, True)
    # requests that were in flight come back failed during the ejection
    assert not any(health.passive_result(False, t, True) for t in (1.0, 2.0, 3.0, 29.0))
    assert health.state(30.0) == "healthy"
    assert health.ejections == 1
    # counting starts again after the ejection: one failure is not enough
    assert not health.passive_result(False, 31.0, True)
    assert health.passive_result(False, 32.0, True)
    assert health.state(32.0 + 59.0) == "ejected"  # second ejection: 60 s


def test_ejection_waits_for_may_eject() -> None:
    health = BackendHealth(HealthCheck(), Outlier(consecutive_failures=2))
    assert not health.passive_result(False, 0.0, may_eject=False)
    assert not health.passive_result(False, 1.0, may_eject=False)
    assert not health.passive_result(False, 2.0, may_eject=False)
    assert health.state(2.0) == "healthy"
    assert health.passive_result(False, 3.0, may_eject=True)  # the pool has room again: the streak still counts
    assert health.state(3.0) == "ejected"


def test_reconfigure_keeps_state_and_applies_new_thresholds() -> None:
    health = BackendHealth(HealthCheck(unhealthy_threshold=3), Outlier(consecutive_failures=1, ejection_s=10))
    assert health.passive_result(False, 0.0, True)  # ejected until 10
    health.active_result(False, 1.0)  # 1 of 3 active failures
    health.reconfigure(HealthCheck(unhealthy_threshold=2), Outlier(consecutive_failures=1, ejection_s=100))
    assert health.state(9.0) == "ejected"  # the running ejection keeps its end
    assert health.state(10.0) == "healthy"
    assert health.ejections == 1
    health.active_result(False, 11.0)  # 2 of (now) 2
    assert health.state(11.0) == "unhealthy"
    health.active_result(True, 12.0)
    assert health.passive_result(False, 20.0, True)  # second ejection: new ejection_s × 2
    assert health.state(219.0) == "ejected"
    assert health.state(220.0) == "healthy"


@pytest.mark.parametrize(
    ("interval", "jitter"),
    [(2.0, 10.0), (5.0, 50.0), (1.0, 100.0)],
)
def test_next_check_delay_within_jitter(interval: float, jitter: float) -> None:
    rng = random.Random(7)
    delays = [next_check_delay(HealthCheck(interval_s=interval, jitter_percent=jitter), rng) for _ in range(2000)]
    low, high = interval * (1 - jitter / 100), interval * (1 + jitter / 100)
    assert all(low <= d <= high for d in delays)
    spread = high - low
    assert min(delays) < low + spread * 0.05 and max(delays) > high - spread * 0.05  # both sides are used
    assert sum(delays) / len(delays) == pytest.approx(interval, rel=0.03)


def test_next_check_delay_without_jitter_is_the_interval() -> None:
    rng = random.Random(0)
    assert {next_check_delay(HealthCheck(interval_s=3.0, jitter_percent=0), rng) for _ in range(50)} == {3.0}


@pytest.mark.parametrize(
    ("states", "panic_threshold", "expected"),
    [
        ("HHH", 50, ("abc", False)),
        ("", 50, ("", False)),
        ("UEU", 50, ("", False)),  # none healthy: nothing, the caller answers 503
        ("UUU", 0, ("", False)),
        ("HUHE", 50, ("ac", False)),  # 50 % healthy is not below 50
        ("HUUE", 50, ("abcd", True)),  # 25 % < 50: panic, all of them
        ("HUUE", 25, ("a", False)),
        ("HUUE", 0, ("a", False)),  # panic disabled
        ("UHHH", 100, ("abcd", True)),
        ("EH", 51, ("ab", True)),
    ],
)
def test_candidates(states: str, panic_threshold: float, expected: tuple[str, bool]) -> None:
    names = "abcd"
    by_letter: dict[str, State] = {"H": "healthy", "U": "unhealthy", "E": "ejected"}
    pairs = [(names[i], by_letter[s]) for i, s in enumerate(states)]
    chosen, panic = candidates(pairs, panic_threshold)
    assert ("".join(chosen), panic) == expected


@pytest.mark.parametrize(
    ("ejected", "total", "max_percent", "expected"),
    [
        (0, 0, 50, False),
        (0, 2, 50, True),  # 1 of 2 = 50 %
        (1, 2, 50, False),
        (0, 10, 10, True),
        (1, 10, 10, False),
        (1, 10, 20, True),
        (1, 2, 100, True),
        (2, 2, 100, False),  # nothing left to eject
        (0, 3, 0, False),  # ejection disabled
        (0, 3, 33.4, True),
        (0, 3, 33.3, False),
    ],
)
def test_may_eject(ejected: int, total: int, max_percent: float, expected: bool) -> None:
    states: list[State] = ["ejected" if i < ejected else "healthy" for i in range(total)]
    assert may_eject(states, max_percent) is expected


def test_states_hold_until_the_earliest_running_ejection_ends() -> None:
    outlier = Outlier(consecutive_failures=1, ejection_s=10.0)
    steady, early, late, over = (BackendHealth(HealthCheck(), outlier) for _ in range(4))
    assert states_hold_until([steady], 0.0) == math.inf  # never ejected: only a new result changes it
    late.passive_result(False, 5.0, True)  # ejected until 15
    early.passive_result(False, 2.0, True)  # until 12
    over.passive_result(False, -20.0, True)  # until -10: over by now
    assert states_hold_until([steady, late, early, over], 3.0) == 12.0
    assert states_hold_until([steady, late, early, over], 12.0) == 15.0  # at its end, `early` is healthy again
    assert early.state(12.0) == "healthy"
