"""Which pool, and which model version or label, a request goes to. Plain code, no I/O, the RNG passed in.

How it works: the table holds one route per model name, plus at most one "*" route for every other model. A
request's model picks its exact route first, else "*", else nothing (the caller answers 404). A version or label
named in the URL passes through unchanged: the client asked for it, so a split never overrides it. Otherwise the
route's weighted split draws one target (`rng.random()` against cumulative weights, so each target's share is its
weight over the total); a route without a split leaves version and label unset and the backend serves its latest.

Guarantees: `route` never raises for any model name, and a split only ever returns one of its own targets.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

WILDCARD = "*"


class SplitTargetLike(Protocol):
    """The fields of `gateway.config.SplitTarget` routing reads (exactly one of version/label is set)."""

    @property
    def weight(self) -> int: ...
    @property
    def version(self) -> int | None: ...
    @property
    def label(self) -> str | None: ...


class RouteLike(Protocol):
    """The fields of `gateway.config.Route` routing reads."""

    @property
    def model(self) -> str: ...
    @property
    def pool(self) -> str: ...
    @property
    def split(self) -> Sequence[SplitTargetLike]: ...


@dataclass(slots=True, init=False)  # made per request (see backend/inference.py's ModelCall)
class RouteDecision:
    pool: str
    version: int | None
    label: str | None
    route: str  # the route's model pattern ("half_plus_two" or "*"): a metrics label with bounded cardinality

    def __init__(self, pool: str, version: int | None, label: str | None, route: str) -> None:
        self.pool, self.version, self.label, self.route = pool, version, label, route


@dataclass(frozen=True, slots=True)
class _Entry:
    route: RouteLike
    cumulative: tuple[int, ...]  # running sums of the split weights; empty without a split


class RouteTable:
    def __init__(self, routes: Sequence[RouteLike]) -> None:
        # The config guarantees one route per model (and one "*"), so building a dict loses nothing.
        self._entries = {r.model: _Entry(r, tuple(itertools.accumulate(t.weight for t in r.split))) for r in routes}

    def route(self, model: str, version: int | None, label: str | None, rng: random.Random) -> RouteDecision | None:
        entry = self._entries.get(model) or self._entries.get(WILDCARD)
        if entry is None:
            return None
        rule = entry.route
        if version is not None or label is not None or not rule.split:
            return RouteDecision(rule.pool, version, label, rule.model)
        # random() < 1, and (1 - 2**-53) * n rounds below n for any integer n < 2**53: the index stays in range.
        target = rule.split[bisect.bisect_right(entry.cumulative, rng.random() * entry.cumulative[-1])]
        return RouteDecision(rule.pool, target.version, target.label, rule.model)
