"""The retry budget as a table over a fake clock: retries stay within a share of recent requests plus a floor."""

from __future__ import annotations

from gateway.retry_budget import RetryBudget


def test_floor_allows_a_few_retries_on_a_quiet_pool() -> None:
    budget = RetryBudget(budget_percent=20, min_retries_per_s=0.5, window_s=10)
    allowed = [budget.try_retry(now=1.0) for _ in range(10)]
    assert allowed == [True] * 5 + [False] * 5  # 0.5/s over a 10 s window


def test_retries_are_a_share_of_requests() -> None:
    budget = RetryBudget(budget_percent=20, min_retries_per_s=0, window_s=10)
    for _ in range(100):
        budget.record_request(now=2.0)
    assert sum(budget.try_retry(now=2.5) for _ in range(50)) == 20


def test_old_traffic_leaves_the_window() -> None:
    budget = RetryBudget(budget_percent=50, min_retries_per_s=0, window_s=10)
    for _ in range(10):
        budget.record_request(now=0.0)
    assert sum(budget.try_retry(now=1.0) for _ in range(10)) == 5
    assert not budget.try_retry(now=9.9)
    assert not budget.try_retry(now=10.5)  # the requests left the window, the retries (at 1 s) not yet
    budget.record_request(now=11.5)  # now both have left: the budget is half of the new traffic
    budget.record_request(now=11.5)
    assert budget.try_retry(now=11.6) and not budget.try_retry(now=11.6)


def test_reconfigure_changes_the_share() -> None:
    budget = RetryBudget(budget_percent=0, min_retries_per_s=0)
    budget.record_request(now=0.0)
    assert not budget.try_retry(now=0.0)
    budget.reconfigure(budget_percent=100, min_retries_per_s=0)
    assert budget.try_retry(now=0.0)
