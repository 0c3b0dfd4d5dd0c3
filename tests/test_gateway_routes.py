"""Route table decisions as tables: exact match, "*", pass-through of explicit versions/labels, weighted splits."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from gateway.routes import RouteDecision, RouteTable


@dataclass(frozen=True, slots=True)
class SplitTarget:
    weight: int
    version: int | None = None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    pool: str
    split: tuple[SplitTarget, ...] = ()


TABLE = RouteTable(
    [
        Route("half_plus_two", "gpu", (SplitTarget(90, version=1), SplitTarget(10, version=2))),
        Route("canary", "cpu", (SplitTarget(1, label="stable"), SplitTarget(1, label="canary"))),
        Route("plain", "cpu"),
        Route("*", "default"),
    ]
)


@pytest.mark.parametrize(
    ("model", "version", "label", "expected"),
    [
        # explicit version or label: the split is ignored, the request's choice passes through
        ("half_plus_two", 7, None, RouteDecision("gpu", 7, None, "half_plus_two")),
        ("half_plus_two", None, "beta", RouteDecision("gpu", None, "beta", "half_plus_two")),
        ("canary", 0, None, RouteDecision("cpu", 0, None, "canary")),
        # no split: the backend serves its latest
        ("plain", None, None, RouteDecision("cpu", None, None, "plain")),
        ("plain", 3, None, RouteDecision("cpu", 3, None, "plain")),
        # any other model falls to "*", whose pattern is the metrics label
        ("resnet", None, None, RouteDecision("default", None, None, "*")),
        ("resnet", 2, None, RouteDecision("default", 2, None, "*")),
        ("Half_plus_two", None, "x", RouteDecision("default", None, "x", "*")),  # names are case-sensitive
    ],
)
def test_route_decisions(model: str, version: int | None, label: str | None, expected: RouteDecision) -> None:
    assert TABLE.route(model, version, label, random.Random(0)) == expected


def test_exact_match_beats_wildcard_whatever_the_order() -> None:
    table = RouteTable([Route("*", "default"), Route("m", "special")])
    assert table.route("m", None, None, random.Random(0)) == RouteDecision("special", None, None, "m")
    assert table.route("other", None, None, random.Random(0)) == RouteDecision("default", None, None, "*")


@pytest.mark.parametrize("routes", [[], [Route("m", "cpu")]])
def test_unknown_model_without_wildcard_is_none(routes: list[Route]) -> None:
    assert RouteTable(routes).route("unknown", None, None, random.Random(0)) is None
    assert RouteTable(routes).route("unknown", 1, None, random.Random(0)) is None


def draws(table: RouteTable, model: str, n: int, seed: int) -> Counter[tuple[int | None, str | None]]:
    rng = random.Random(seed)
    counts: Counter[tuple[int | None, str | None]] = Counter()
    for _ in range(n):
        decision = table.route(model, None, None, rng)
        assert decision is not None
        counts[decision.version, decision.label] += 1
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_split_shares(seed: int) -> None:
    n = 10_000
    counts = draws(TABLE, "half_plus_two", n, seed)
    assert set(counts) == {(1, None), (2, None)}
    assert counts[1, None] / n == pytest.approx(0.9, abs=0.02)
    labels = draws(TABLE, "canary", n, seed)
    assert set(labels) == {(None, "stable"), (None, "canary")}
    assert labels[None, "stable"] / n == pytest.approx(0.5, abs=0.02)


def test_split_with_three_targets_and_unequal_weights() -> None:
    table = RouteTable(
        [Route("m", "p", (SplitTarget(1, version=1), SplitTarget(3, version=2), SplitTarget(6, label="L")))]
    )
    n = 10_000
    counts = draws(table, "m", n, seed=42)
    assert counts[1, None] / n == pytest.approx(0.1, abs=0.02)
    assert counts[2, None] / n == pytest.approx(0.3, abs=0.02)
    assert counts[None, "L"] / n == pytest.approx(0.6, abs=0.02)


class FixedDraw(random.Random):
    """A Random whose random() returns given values: pins the edges of the cumulative weights."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("draw", "version"),
    [(0.0, 1), (0.8999, 1), (0.9, 2), (0.99999, 2), (1.0 - 2**-53, 2)],
)
def test_split_boundaries(draw: float, version: int) -> None:
    decision = TABLE.route("half_plus_two", None, None, FixedDraw(draw))
    assert decision is not None and decision.version == version


def test_single_target_split_always_picks_it() -> None:
    table = RouteTable([Route("m", "p", (SplitTarget(5, label="only"),))])
    assert draws(table, "m", 100, seed=3) == Counter({(None, "only"): 100})


def test_same_seed_same_choices() -> None:
    assert draws(TABLE, "half_plus_two", 500, seed=9) == draws(TABLE, "half_plus_two", 500, seed=9)
