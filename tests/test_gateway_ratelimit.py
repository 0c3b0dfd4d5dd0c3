"""Rate-limit decisions as tables over a fake clock (plain floats): token buckets, the three scopes, all-or-nothing
takes, the RateLimit header values, reloads and the bound on buckets."""

from __future__ import annotations

import types
from collections.abc import Mapping

import pytest

from gateway.config import Rate
from gateway.config import RateLimits as Limits
from gateway.ratelimit import Decision, RateLimiter, TokenBucket


NO_RATES: Mapping[str, Rate] = types.MappingProxyType({})


def admitted(limiter: RateLimiter, count: int, now: float, principal: str = "alice", model: str = "m",
             rate: Rate | None = None, model_rates: Mapping[str, Rate] = NO_RATES) -> int:
    return sum(limiter.check(principal, rate, model_rates, model, now).allowed for _ in range(count))


# --- TokenBucket ---------------------------------------------------------------------------------------------------


def test_bucket_gives_its_burst_then_the_steady_rate() -> None:
    bucket = TokenBucket(Rate(per_second=2, burst=3), now=0.0)
    # (now, taken?) in order: the burst at once, then one token every 0.5 s
    steps = [(0.0, True), (0.0, True), (0.0, True), (0.0, False), (0.4, False), (0.5, True), (0.5, False),
             (0.9, False), (1.0, True), (2.5, True), (2.5, True), (2.5, True), (2.5, False)]
    assert [(now, bucket.take(now)) for now, _ in steps] == steps


@pytest.mark.parametrize(
    ("takes_at_0", "now", "expected"),
    [
        (0, 0.0, 4.0),  # starts full
        (0, 100.0, 4.0),  # never above the burst
        (4, 0.0, 0.0),
        (4, 0.25, 0.5),
        (4, 1.5, 3.0),
        (4, 3.0, 4.0),
        (4, -5.0, 0.0),  # a clock stepping back earns nothing
    ],
)
def test_bucket_tokens(takes_at_0: int, now: float, expected: float) -> None:
    bucket = TokenBucket(Rate(per_second=2, burst=4), now=0.0)
    assert all(bucket.take(0.0) for _ in range(takes_at_0))
    assert bucket.tokens(now) == pytest.approx(expected)


def test_clock_stepping_back_does_not_earn_the_same_seconds_twice() -> None:
    bucket = TokenBucket(Rate(per_second=1, burst=10), now=0.0)
    assert all(bucket.take(0.0) for _ in range(10))
    assert bucket.take(2.0) and bucket.take(2.0) and not bucket.take(2.0)
    assert not bucket.take(1.0)  # back in time: no new tokens
    assert bucket.take(3.0) and not bucket.take(3.0)  # one second after 2.0, not two


def test_fractional_refills_add_up_to_a_token() -> None:
    bucket = TokenBucket(Rate(per_second=3, burst=1), now=0.0)
    assert bucket.take(0.0)
    for ninth in range(1, 28):  # 1/3 + 1/3 + 1/3 falls short of 1.0 in floats; the token is due all the same
        assert bucket.take(ninth / 9) == (ninth % 3 == 0)


@pytest.mark.parametrize(
    ("new", "expected_now", "expected_later"),
    [
        # drained from 10 to 4 at 0 s, retuned at 1 s (level then 5 at 1/s), read again at 3 s
        (Rate(per_second=1, burst=10), 5.0, 7.0),  # same rate: nothing changes
        (Rate(per_second=4, burst=10), 5.0, 10.0),  # faster refill from the retune on
        (Rate(per_second=1, burst=3), 3.0, 3.0),  # smaller burst: level capped, never reset to full
        (Rate(per_second=0.5, burst=20), 5.0, 6.0),  # bigger burst: the level stays, it does not jump to 20
    ],
)
def test_retune_keeps_the_level(new: Rate, expected_now: float, expected_later: float) -> None:
    bucket = TokenBucket(Rate(per_second=1, burst=10), now=0.0)
    assert all(bucket.take(0.0) for _ in range(6))
    bucket.retune(new, now=1.0)
    assert bucket.rate == new
    assert bucket.tokens(1.0) == pytest.approx(expected_now)
    assert bucket.tokens(3.0) == pytest.approx(expected_later)


# --- RateLimiter: admission ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("per_second", "burst"), [(10, 5), (100, 20), (50, 1), (7, 30), (1000, 1000)])
def test_offered_three_times_the_rate_admits_rate_times_seconds_plus_burst(per_second: float, burst: float) -> None:
    limiter = RateLimiter(Limits(default=Rate(per_second, burst)))
    offered = round(3 * per_second * 10)  # evenly over 10 simulated seconds
    count = sum(limiter.check("alice", None, NO_RATES, "m", i * 10 / offered).allowed for i in range(offered))
    assert count == pytest.approx(per_second * 10 + burst, rel=0.01)


def test_no_applicable_bucket_allows_without_headers() -> None:
    limiter = RateLimiter(Limits(models={"other": Rate(1, 1)}))
    for _ in range(100):
        assert limiter.check("alice", None, {"other": Rate(1, 1)}, "m", 0.0) == Decision(True, 0, 0, 0, 0, "")
    assert len(limiter) == 0


def test_default_applies_to_principals_without_their_own_rate() -> None:
    limiter = RateLimiter(Limits(default=Rate(per_second=1, burst=2)))
    assert admitted(limiter, 10, 0.0, principal="default") == 2
    assert admitted(limiter, 10, 0.0, principal="own", rate=Rate(per_second=1, burst=5)) == 5


def test_one_principal_limited_another_unaffected() -> None:
    limiter = RateLimiter(Limits(default=Rate(per_second=1, burst=3)))
    assert admitted(limiter, 10, 0.0, principal="noisy") == 3
    assert admitted(limiter, 3, 0.5, principal="quiet") == 3
    assert admitted(limiter, 10, 0.5, principal="noisy") == 0


def test_model_cap_is_shared_by_all_principals() -> None:
    limiter = RateLimiter(Limits(models={"big": Rate(per_second=1, burst=4)}))
    assert admitted(limiter, 3, 0.0, principal="alice", model="big") == 3
    assert admitted(limiter, 3, 0.0, principal="bob", model="big") == 1
    decision = limiter.check("carol", None, NO_RATES, "big", 0.0)
    assert (decision.allowed, decision.scope) == (False, "model")
    assert admitted(limiter, 3, 0.0, principal="carol", model="small") == 3  # other models are not capped


def test_principal_model_bucket_limits_one_model_of_one_principal() -> None:
    limiter = RateLimiter(Limits())
    rates = {"big": Rate(per_second=1, burst=2)}
    assert admitted(limiter, 5, 0.0, model="big", model_rates=rates) == 2
    assert limiter.check("alice", None, rates, "big", 0.0).scope == "principal_model"
    assert admitted(limiter, 5, 0.0, model="small", model_rates=rates) == 5  # its other models: no bucket
    assert admitted(limiter, 5, 0.0, principal="bob", model="big", model_rates=rates) == 2  # its own bucket


def test_refused_request_takes_from_no_bucket() -> None:
    """The model cap refuses: the principal's own budget must not drain, nor the cap for others."""
    limiter = RateLimiter(Limits(models={"capped": Rate(per_second=10, burst=1)}))
    mine = Rate(per_second=1, burst=5)
    assert admitted(limiter, 50, 0.0, model="capped", rate=mine) == 1  # one from both; 49 refused by the cap
    assert admitted(limiter, 10, 0.0, model="free", rate=mine) == 4  # 5 - 1: the refusals took nothing
    # the other way round: at 0.5 s the cap is full again, alice has half a token: she is refused...
    assert admitted(limiter, 10, 0.5, model="capped", rate=mine) == 0
    assert admitted(limiter, 10, 0.5, principal="bob", model="capped") == 1  # ...and the cap was not drained


# --- RateLimiter: header values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "requests", "now", "expected"),
    [
        # `requests` checks at 0 s first, then one more at `now`: its Decision
        (Rate(10, 5), 0, 0.0, Decision(True, 5, 4, 1, 0, "principal")),  # 1 token short: 0.1 s -> 1 s
        (Rate(10, 5), 4, 0.0, Decision(True, 5, 0, 1, 0, "principal")),  # 5 short: 0.5 s -> 1 s
        (Rate(10, 5), 5, 0.0, Decision(False, 5, 0, 1, 1, "principal")),
        (Rate(0.5, 2), 0, 0.0, Decision(True, 2, 1, 2, 0, "principal")),  # 1 token at 0.5/s: 2 s to full
        (Rate(0.5, 2), 1, 0.0, Decision(True, 2, 0, 4, 0, "principal")),
        (Rate(0.5, 2), 2, 0.0, Decision(False, 2, 0, 4, 2, "principal")),  # 2 s to a token, 4 s to full
        (Rate(0.5, 2), 2, 1.0, Decision(False, 2, 0, 3, 1, "principal")),  # 0.5 tokens: 1 s to one, 3 s to full
        (Rate(0.5, 2), 2, 1.9, Decision(False, 2, 0, 3, 1, "principal")),  # 0.2 s to a token: at least 1 s
        (Rate(0.5, 2), 2, 2.0, Decision(True, 2, 0, 4, 0, "principal")),
        (Rate(0.5, 2), 2, 3.0, Decision(True, 2, 0, 3, 0, "principal")),  # 1.5 left over 1, 0.5 after: floor 0
        (Rate(100, 200), 50, 0.2, Decision(True, 200, 169, 1, 0, "principal")),  # 150 + 20 - 1; 0.31 s -> 1 s
    ],
)
def test_header_values(rate: Rate, requests: int, now: float, expected: Decision) -> None:
    limiter = RateLimiter(Limits(default=rate))
    for _ in range(requests):
        limiter.check("alice", None, NO_RATES, "m", 0.0)
    assert limiter.check("alice", None, NO_RATES, "m", now) == expected


def test_headers_show_the_tightest_bucket() -> None:
    limiter = RateLimiter(Limits(default=Rate(100, 100), models={"m": Rate(1, 3)}))
    rates = {"m": Rate(2, 10)}
    assert limiter.check("alice", None, rates, "m", 0.0) == Decision(True, 3, 2, 1, 0, "model")
    assert limiter.check("alice", None, rates, "m", 0.0) == Decision(True, 3, 1, 2, 0, "model")
    assert limiter.check("alice", None, rates, "m", 0.0) == Decision(True, 3, 0, 3, 0, "model")
    # the model bucket refuses: it decides the headers and Retry-After
    assert limiter.check("alice", None, rates, "m", 0.0) == Decision(False, 3, 0, 3, 1, "model")
    # another model: the principal's bucket (97 left after 3 takes, 96 after this one) is the tightest
    assert limiter.check("alice", None, rates, "x", 0.0) == Decision(True, 100, 96, 1, 0, "principal")


def test_refusal_reports_the_bucket_that_waits_longest() -> None:
    limiter = RateLimiter(Limits(default=Rate(per_second=0.1, burst=1), models={"m": Rate(per_second=1, burst=1)}))
    assert limiter.check("alice", None, NO_RATES, "m", 0.0).allowed
    # both are empty: the model bucket has a token in 1 s, the principal's in 10 s
    assert limiter.check("alice", None, NO_RATES, "m", 0.0) == Decision(False, 1, 0, 10, 10, "principal")
    assert limiter.check("alice", None, NO_RATES, "m", 2.0) == Decision(False, 1, 0, 8, 8, "principal")


# --- RateLimiter: reload -------------------------------------------------------------------------------------------


def test_reconfigure_keeps_levels_of_unchanged_rates() -> None:
    limiter = RateLimiter(Limits(default=Rate(1, 5), models={"m": Rate(1, 5)}))
    assert admitted(limiter, 5, 0.0) == 5
    limiter.reconfigure(Limits(default=Rate(1, 5), models={"m": Rate(1, 5)}))  # a reload rebuilds equal values
    assert admitted(limiter, 5, 0.0) == 0  # not reset to full
    assert admitted(limiter, 5, 1.0) == 1


def test_reconfigure_retunes_changed_rates_without_refilling() -> None:
    limiter = RateLimiter(Limits(default=Rate(per_second=1, burst=10)))
    assert admitted(limiter, 8, 0.0) == 8  # 2 left
    limiter.reconfigure(Limits(default=Rate(per_second=10, burst=20)))
    assert admitted(limiter, 20, 0.0) == 2  # the bigger burst is not handed out at once
    assert admitted(limiter, 20, 1.0) == 10  # but it refills at the new rate
    limiter.reconfigure(Limits(default=Rate(per_second=1, burst=3)))
    assert admitted(limiter, 20, 100.0) == 3  # capped at the new burst


def test_principal_rate_change_is_retuned_not_reset() -> None:
    """A principal's own rate arrives with each request (a reload of its key): same rule as the limits."""
    limiter = RateLimiter(Limits())
    assert admitted(limiter, 10, 0.0, rate=Rate(1, 4)) == 4
    assert admitted(limiter, 10, 0.0, rate=Rate(1, 8)) == 0
    assert admitted(limiter, 10, 2.0, rate=Rate(1, 8)) == 2


def test_reconfigure_drops_buckets_whose_rate_is_gone() -> None:
    limiter = RateLimiter(Limits(default=Rate(1, 2), models={"a": Rate(1, 1), "b": Rate(1, 1)}))
    assert admitted(limiter, 1, 0.0, model="a") == 1
    assert admitted(limiter, 1, 0.0, model="b") == 1
    assert len(limiter) == 3  # alice, a, b
    limiter.reconfigure(Limits(default=Rate(1, 2), models={"b": Rate(1, 1)}))
    assert len(limiter) == 2  # the cap on "a" is gone
    assert admitted(limiter, 5, 0.0, principal="bob", model="a") == 2  # only bob's own bucket limits him
    limiter.reconfigure(Limits())
    assert admitted(limiter, 5, 0.0, model="b") == 5  # no default, no caps: alice's stale buckets are unused...
    assert len(limiter) == 1  # ...and dropped once seen (bob's stays until he returns or the bound takes it)


# --- RateLimiter: bound on buckets ---------------------------------------------------------------------------------


def test_bucket_count_is_bounded() -> None:
    limiter = RateLimiter(Limits(default=Rate(1, 5), models={"m": Rate(1000, 1000)}), max_buckets=50)
    for subject in range(1000):  # many JWT subjects, each seen once
        assert limiter.check(f"sub-{subject}", None, {"m": Rate(1, 5)}, "m", subject / 1000).allowed
        assert len(limiter) <= 50
    assert limiter.check("sub-999", None, {"m": Rate(1, 5)}, "m", 1.0).remaining == 3  # the latest one is kept


def test_full_buckets_are_dropped_before_busy_ones() -> None:
    limiter = RateLimiter(Limits(default=Rate(per_second=1, burst=5)), max_buckets=10)
    for idle in range(9):
        assert admitted(limiter, 1, 0.0, principal=f"idle-{idle}") == 1  # full again by 10 s
    assert admitted(limiter, 10, 10.0, principal="busy") == 5  # the tenth bucket: no eviction yet
    assert len(limiter) == 10
    assert admitted(limiter, 10, 10.0, principal="busy") == 0  # known buckets need no room
    assert len(limiter) == 10
    assert admitted(limiter, 1, 10.0, principal="new") == 1  # one more: the full ones go, not the empty "busy"
    assert len(limiter) == 2
    assert admitted(limiter, 10, 10.0, principal="busy") == 0  # its level was kept


def test_without_full_buckets_the_least_recently_used_go() -> None:
    limiter = RateLimiter(Limits(default=Rate(per_second=1, burst=5)), max_buckets=10)
    for principal in range(10):
        assert admitted(limiter, 1, 0.0, principal=f"p{principal}") == 1  # none full
    assert admitted(limiter, 1, 0.0, principal="p0") == 1  # p0 used again: p1 is now the least recent
    assert admitted(limiter, 1, 0.0, principal="new") == 1
    assert len(limiter) == 10
    assert limiter.check("p0", None, NO_RATES, "m", 0.0).remaining == 2  # kept: 5 - 3
    assert limiter.check("p1", None, NO_RATES, "m", 0.0).remaining == 4  # dropped, so new and full again
