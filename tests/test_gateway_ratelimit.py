"""Rate-limit decisions as tables over a fake clock (plain floats): token buckets, the three scopes, all-or-nothing
takes, the RateLimit header values, reloads and the bound on buckets. The limiter's tables run against both stores:
this process's buckets and the shared file the gateway's workers map (gateway.shared_buckets)."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from gateway.config import Rate
from gateway.config import RateLimits as Limits
from gateway.ratelimit import Decision, RateLimiter, TokenBucket
from gateway.shared_buckets import SharedBuckets

NO_RATES: Mapping[str, Rate] = types.MappingProxyType({})

MakeLimiter = Callable[..., RateLimiter]


@pytest.fixture(params=["local", "shared"])
def make_limiter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeLimiter]:
    """RateLimiter(limits, max_buckets=...) on this process's buckets, or on a shared bucket file of its own."""
    tables: list[SharedBuckets] = []

    def make(limits: Limits, max_buckets: int = 100_000) -> RateLimiter:
        if request.param == "local":
            return RateLimiter(limits, max_buckets)
        tables.append(SharedBuckets.create(tmp_path / f"buckets-{len(tables)}", capacity=1024))  # holds 768
        return RateLimiter(limits, max_buckets, store=tables[-1])

    yield make
    for table in tables:
        table.close()


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
def test_offered_three_times_the_rate_admits_rate_times_seconds_plus_burst(
    make_limiter: MakeLimiter, per_second: float, burst: float,
) -> None:
    limiter = make_limiter(Limits(default=Rate(per_second, burst)))
    offered = round(3 * per_second * 10)  # evenly over 10 simulated seconds
    count = sum(limiter.check("alice", None, NO_RATES, "m", i * 10 / offered).allowed for i in range(offered))
    assert count == pytest.approx(per_second * 10 + burst, rel=0.01)


def test_no_applicable_bucket_allows_without_headers(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(models={"other": Rate(1, 1)}))
    for _ in range(100):
        assert limiter.check("alice", None, {"other": Rate(1, 1)}, "m", 0.0) == Decision(True, 0, 0, 0, 0, "")
    assert len(limiter) == 0


def test_default_applies_to_principals_without_their_own_rate(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(per_second=1, burst=2)))
    assert admitted(limiter, 10, 0.0, principal="default") == 2
    assert admitted(limiter, 10, 0.0, principal="own", rate=Rate(per_second=1, burst=5)) == 5


def test_one_principal_limited_another_unaffected(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(per_second=1, burst=3)))
    assert admitted(limiter, 10, 0.0, principal="noisy") == 3
    assert admitted(limiter, 3, 0.5, principal="quiet") == 3
    assert admitted(limiter, 10, 0.5, principal="noisy") == 0


def test_model_cap_is_shared_by_all_principals(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(models={"big": Rate(per_second=1, burst=4)}))
    assert admitted(limiter, 3, 0.0, principal="alice", model="big") == 3
    assert admitted(limiter, 3, 0.0, principal="bob", model="big") == 1
    decision = limiter.check("carol", None, NO_RATES, "big", 0.0)
    assert (decision.allowed, decision.scope) == (False, "model")
    assert admitted(limiter, 3, 0.0, principal="carol", model="small") == 3  # other models are not capped


def test_principal_model_bucket_limits_one_model_of_one_principal(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits())
    rates = {"big": Rate(per_second=1, burst=2)}
    assert admitted(limiter, 5, 0.0, model="big", model_rates=rates) == 2
    assert limiter.check("alice", None, rates, "big", 0.0).scope == "principal_model"
    assert admitted(limiter, 5, 0.0, model="small", model_rates=rates) == 5  # its other models: no bucket
    assert admitted(limiter, 5, 0.0, principal="bob", model="big", model_rates=rates) == 2  # its own bucket


def test_refused_request_takes_from_no_bucket(make_limiter: MakeLimiter) -> None:
    """The model cap refuses: the principal's own budget must not drain, nor the cap for others."""
    limiter = make_limiter(Limits(models={"capped": Rate(per_second=10, burst=1)}))
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
def test_header_values(make_limiter: MakeLimiter, rate: Rate, requests: int, now: float, expected: Decision) -> None:
    limiter = make_limiter(Limits(default=rate))
    for _ in range(requests):
        limiter.check("alice", None, NO_RATES, "m", 0.0)
    assert limiter.check("alice", None, NO_RATES, "m", now) == expected


def test_headers_show_the_tightest_bucket(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(100, 100), models={"m": Rate(1, 3)}))
    rates = {"m": Rate(2, 10)}
    assert limiter.check("alice", None, rates, "m", 0.0) == Decision(True, 3, 2, 1, 0, "model")
    assert limiter.check("alice", None, rates, "m", 0.0) == Decision(True, 3, 1, 2, 0, "model")
    assert limiter.check("alice", None, rates, "m", 0.0) == Decision(True, 3, 0, 3, 0, "model")
    # the model bucket refuses: it decides the headers and Retry-After
    assert limiter.check("alice", None, rates, "m", 0.0) == Decision(False, 3, 0, 3, 1, "model")
    # another model: the principal's bucket (97 left after 3 takes, 96 after this one) is the tightest
    assert limiter.check("alice", None, rates, "x", 0.0) == Decision(True, 100, 96, 1, 0, "principal")


def test_refusal_reports_the_bucket_that_waits_longest(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(per_second=0.1, burst=1), models={"m": Rate(per_second=1, burst=1)}))
    assert limiter.check("alice", None, NO_RATES, "m", 0.0).allowed
    # both are empty: the model bucket has a token in 1 s, the principal's in 10 s
    assert limiter.check("alice", None, NO_RATES, "m", 0.0) == Decision(False, 1, 0, 10, 10, "principal")
    assert limiter.check("alice", None, NO_RATES, "m", 2.0) == Decision(False, 1, 0, 8, 8, "principal")


# --- RateLimiter: reload -------------------------------------------------------------------------------------------


def test_reconfigure_keeps_levels_of_unchanged_rates(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(1, 5), models={"m": Rate(1, 5)}))
    assert admitted(limiter, 5, 0.0) == 5
    limiter.reconfigure(Limits(default=Rate(1, 5), models={"m": Rate(1, 5)}))  # a reload rebuilds equal values
    assert admitted(limiter, 5, 0.0) == 0  # not reset to full
    assert admitted(limiter, 5, 1.0) == 1


def test_reconfigure_retunes_changed_rates_without_refilling(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(per_second=1, burst=10)))
    assert admitted(limiter, 8, 0.0) == 8  # 2 left
    limiter.reconfigure(Limits(default=Rate(per_second=10, burst=20)))
    assert admitted(limiter, 20, 0.0) == 2  # the bigger burst is not handed out at once
    assert admitted(limiter, 20, 1.0) == 10  # but it refills at the new rate
    limiter.reconfigure(Limits(default=Rate(per_second=1, burst=3)))
    assert admitted(limiter, 20, 100.0) == 3  # capped at the new burst


def test_principal_rate_change_is_retuned_not_reset(make_limiter: MakeLimiter) -> None:
    """A principal's own rate arrives with each request (a reload of its key): same rule as the limits."""
    limiter = make_limiter(Limits())
    assert admitted(limiter, 10, 0.0, rate=Rate(1, 4)) == 4
    assert admitted(limiter, 10, 0.0, rate=Rate(1, 8)) == 0
    assert admitted(limiter, 10, 2.0, rate=Rate(1, 8)) == 2


def test_reconfigure_drops_buckets_whose_rate_is_gone(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(1, 2), models={"a": Rate(1, 1), "b": Rate(1, 1)}))
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


def test_bucket_count_is_bounded(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(1, 5), models={"m": Rate(1000, 1000)}), max_buckets=50)
    for subject in range(1000):  # many JWT subjects, each seen once
        assert limiter.check(f"sub-{subject}", None, {"m": Rate(1, 5)}, "m", subject / 1000).allowed
        assert len(limiter) <= 50
    assert limiter.check("sub-999", None, {"m": Rate(1, 5)}, "m", 1.0).remaining == 3  # the latest one is kept


def test_full_buckets_are_dropped_before_busy_ones(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(per_second=1, burst=5)), max_buckets=10)
    for idle in range(9):
        assert admitted(limiter, 1, 0.0, principal=f"idle-{idle}") == 1  # full again by 10 s
    assert admitted(limiter, 10, 10.0, principal="busy") == 5  # the tenth bucket: no eviction yet
    assert len(limiter) == 10
    assert admitted(limiter, 10, 10.0, principal="busy") == 0  # known buckets need no room
    assert len(limiter) == 10
    assert admitted(limiter, 1, 10.0, principal="new") == 1  # one more: the full ones go, not the empty "busy"
    assert len(limiter) == 2
    assert admitted(limiter, 10, 10.0, principal="busy") == 0  # its level was kept


def test_without_full_buckets_the_least_recently_used_go(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(Limits(default=Rate(per_second=1, burst=5)), max_buckets=10)
    for principal in range(10):
        assert admitted(limiter, 1, 0.0, principal=f"p{principal}") == 1  # none full
    assert admitted(limiter, 1, 0.0, principal="p0") == 1  # p0 used again: p1 is now the least recent
    assert admitted(limiter, 1, 0.0, principal="new") == 1
    assert len(limiter) == 10
    assert limiter.check("p0", None, NO_RATES, "m", 0.0).remaining == 2  # kept: 5 - 3
    assert limiter.check("p1", None, NO_RATES, "m", 0.0).remaining == 4  # dropped, so new and full again


def test_an_eviction_makes_room_for_the_new_buckets_only(make_limiter: MakeLimiter) -> None:
    """At the bound, one new principal costs one bucket (the least recently used), not a tenth of them."""
    limiter = make_limiter(Limits(default=Rate(per_second=1, burst=5)), max_buckets=200)
    for principal in range(200):
        assert admitted(limiter, 1, 0.0, principal=f"p{principal}") == 1  # none full
    assert admitted(limiter, 1, 0.0, principal="new") == 1
    assert len(limiter) == 200
    assert limiter.check("p199", None, NO_RATES, "m", 0.0).remaining == 3  # the most recent one kept: 5 - 2


def test_an_eviction_looks_at_sixteen_buckets_not_all(make_limiter: MakeLimiter) -> None:
    """Every bucket is full again, yet one eviction drops only the 16 it looks at: its work does not grow with the
    bound (a pass over all of them stalled every request: 193 ms at 100k)."""
    limiter = make_limiter(Limits(default=Rate(per_second=1, burst=5)), max_buckets=100)
    for principal in range(100):
        assert admitted(limiter, 1, 0.0, principal=f"p{principal}") == 1  # full again by 10 s
    assert admitted(limiter, 1, 10.0, principal="new") == 1
    assert len(limiter) == 100 - 16 + 1


# --- RateLimiter: the shared file ----------------------------------------------------------------------------------


def test_shared_table_drops_full_buckets_first_then_the_least_recently_used(tmp_path: Path) -> None:
    """The bound here is the file's own (3/4 of 16 slots); evictions follow the in-process policy."""
    table = SharedBuckets.create(tmp_path / "buckets", capacity=16)
    limiter = RateLimiter(Limits(default=Rate(per_second=1, burst=5)), store=table)
    assert table.max_buckets == 12
    for idle in range(6):
        assert admitted(limiter, 1, 0.0, principal=f"idle-{idle}") == 1  # full again by 10 s
    for busy in range(6):
        assert admitted(limiter, 5, 10.0, principal=f"busy-{busy}") == 5  # empty at 10 s
    assert len(limiter) == 12
    assert admitted(limiter, 1, 10.0, principal="new") == 1  # one more: the six full ones go, no busy one
    assert len(limiter) == 7
    assert all(admitted(limiter, 1, 10.0, principal=f"busy-{busy}") == 0 for busy in range(6))  # levels kept
    for more in range(5):
        assert admitted(limiter, 1, 10.0, principal=f"more-{more}") == 1
    assert len(limiter) == 12  # none full now: "new" is the least recently used, then busy-0
    assert admitted(limiter, 1, 10.0, principal="last") == 1
    assert len(limiter) == 12
    assert admitted(limiter, 1, 10.0, principal="busy-1") == 0  # kept, still empty
    assert limiter.check("new", None, NO_RATES, "m", 10.0).remaining == 4  # evicted, so back full: 5 - 1, not 3
    assert len(limiter) == 12
    assert admitted(limiter, 1, 10.0, principal="busy-0") == 1  # the LRU one when "new" came back: full again
    table.close()


def test_shared_bucket_evicted_and_recreated_starts_full(tmp_path: Path) -> None:
    table = SharedBuckets.create(tmp_path / "buckets", capacity=1024)
    limiter = RateLimiter(Limits(default=Rate(per_second=1, burst=3)), max_buckets=2, store=table)
    assert admitted(limiter, 5, 0.0, principal="a") == 3
    assert admitted(limiter, 1, 0.0, principal="b") == 1
    assert admitted(limiter, 1, 0.0, principal="c") == 1  # the bound: "a", least recently used, goes
    assert len(limiter) == 2
    assert admitted(limiter, 5, 0.0, principal="a") == 3  # a new bucket, full
    table.close()


def test_reconfigure_in_one_worker_is_seen_by_another(tmp_path: Path) -> None:
    """Each worker reloads from its own config; they share the buckets, so one's drop is the other's."""
    path = tmp_path / "buckets"
    primary, worker = SharedBuckets.create(path), SharedBuckets.open(path)
    old = Limits(default=Rate(per_second=1, burst=10), models={"a": Rate(1, 2), "b": Rate(1, 2)})
    one, two = RateLimiter(old, store=primary), RateLimiter(old, store=worker)
    assert admitted(one, 8, 0.0, model="a") == 2  # the cap on "a"; alice has 8 left
    assert admitted(two, 8, 0.0, model="b") == 2  # the cap on "b"; alice has 6 left
    assert len(one) == len(two) == 3
    new = Limits(default=Rate(per_second=1, burst=10), models={"b": Rate(1, 2)})
    one.reconfigure(new)  # the reload reaches worker one first: the cap on "a" leaves the file
    assert len(two) == 2
    two.reconfigure(new)
    assert len(two) == 2
    assert admitted(two, 10, 0.0, model="a") == 6  # only alice's own bucket limits her now
    faster = Limits(default=Rate(per_second=10, burst=20), models={"b": Rate(1, 2)})
    one.reconfigure(faster)
    two.reconfigure(faster)
    assert admitted(one, 30, 0.0, model="x") == 0  # the shared level is kept, not refilled by the reload
    assert admitted(two, 30, 1.0, model="x") == 10  # and refills at the new rate
    back = Limits(default=Rate(per_second=10, burst=20), models={"a": Rate(1, 2), "b": Rate(1, 2)})
    one.reconfigure(back)
    two.reconfigure(back)
    assert admitted(two, 5, 1.5, principal="bob", model="a") == 2  # the cap on "a" is back: a new bucket, full
    primary.close()
    worker.close()
