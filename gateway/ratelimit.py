"""Rate limits: token buckets per principal, per principal-and-model and per model. Plain code, no I/O: `now`
(seconds, float) is passed in.

How it works: a `TokenBucket` holds up to `burst` tokens and refills at `per_second`; a full bucket lets an idle
client send `burst` requests at once, then `per_second` on average. Up to three buckets apply to one request:
- "principal": the principal's own rate (`principal_rate`), else `RateLimits.default`, else none;
- "principal_model": the principal's rate for this exact model (`model_rates[model]`), else none;
- "model": the model's cap across all principals (`RateLimits.models[model]`), else none.
A request is admitted only if every applicable bucket has a token, and then one token is taken from each. The take
is all-or-nothing: a refused request takes nothing, so a principal hammering a capped model does not drain its own
budget for other models, nor a model's cap for other principals.

The `Decision` carries the values of the IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers), all
about one bucket, the one that decided: when admitted, the tightest (fewest tokens left); when refused, the refusing
bucket that waits longest for a token (the request cannot pass before that one has a token).
- RateLimit-Limit = that bucket's burst (the most the client may send at once);
- RateLimit-Remaining = whole tokens left in it after this request;
- RateLimit-Reset = whole seconds (rounded up) until it is full again;
- Retry-After (refused only) = whole seconds (rounded up, at least 1) until it has a token.

Buckets are keyed by (scope, principal, model), created full on first use and bounded in number (`max_buckets`):
when the bound is reached, full buckets are dropped first (that loses nothing: one is recreated full), then the
least recently used, down to 90% of the bound, so evictions are rare and a JWT subject flood cannot grow memory.

Reload: `reconfigure` swaps the limits and drops the model buckets whose cap is gone. A bucket whose rate changed
(the default, a model cap, or a principal's own rate, which arrives with each request) is retuned on its next use:
it keeps its level, capped at the new burst, and refills at the new rate from then on; a reload never refills
a bucket. A bucket whose scope no longer has a rate is dropped when a request shows it (or by the bound).

Guarantees: never more than burst + per_second × t admitted per bucket over any t seconds; levels change only
through `check` / `take` with the `now` given; a clock that steps back adds no tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

Scope = Literal["principal", "principal_model", "model", ""]

# Refills add float fractions (1/3 + 1/3 + 1/3 < 1.0): without this slack a token that is due would be refused.
_EPSILON = 1e-9


class RateLike(Protocol):
    """The fields of `gateway.config.Rate` a bucket reads (per_second > 0 and burst >= 1: the config checks)."""

    @property
    def per_second(self) -> float: ...
    @property
    def burst(self) -> float: ...


class RateLimitsLike(Protocol):
    """The fields of `gateway.config.RateLimits` the limiter reads."""

    @property
    def default(self) -> RateLike | None: ...
    @property
    def models(self) -> Mapping[str, RateLike]: ...


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int  # RateLimit-Limit: burst of the deciding bucket
    remaining: int  # RateLimit-Remaining: whole tokens left in it after this request
    reset_s: int  # RateLimit-Reset: whole seconds (ceil) until it is full
    retry_after_s: int  # Retry-After when refused (ceil, >= 1); 0 when allowed
    scope: Scope  # which bucket decided; "" when none applied


_NO_LIMIT = Decision(allowed=True, limit=0, remaining=0, reset_s=0, retry_after_s=0, scope="")


class TokenBucket:
    def __init__(self, rate: RateLike, now: float) -> None:
        """Starts full: a new client may send its burst at once."""
        self._rate = rate
        self._level = float(rate.burst)
        self._at = now

    @property
    def rate(self) -> RateLike:
        return self._rate

    def tokens(self, now: float) -> float:
        return min(self._rate.burst, self._level + max(now - self._at, 0.0) * self._rate.per_second)

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._level < 1.0 - _EPSILON:
            return False
        self._level = max(self._level - 1.0, 0.0)
        return True

    def retune(self, rate: RateLike, now: float) -> None:
        """A new rate from `now`: the level earned so far is kept (capped at the new burst), never reset to full."""
        self._refill(now)
        self._rate = rate
        self._level = min(self._level, rate.burst)

    def is_full(self, now: float) -> bool:
        return self.tokens(now) >= self._rate.burst - _EPSILON

    def decision(self, allowed: bool, scope: Scope, now: float) -> Decision:
        """The header values this bucket shows at `now` (after any take)."""
        tokens = self.tokens(now)
        per_second = self._rate.per_second
        return Decision(
            allowed=allowed,
            limit=math.floor(self._rate.burst + _EPSILON),
            remaining=math.floor(tokens + _EPSILON),
            reset_s=_ceil_s((self._rate.burst - tokens) / per_second),
            retry_after_s=0 if allowed else max(_ceil_s((1.0 - tokens) / per_second), 1),
            scope=scope,
        )

    def _refill(self, now: float) -> None:
        self._level = self.tokens(now)
        self._at = max(self._at, now)  # a clock stepping back must not earn the same seconds twice


def _ceil_s(seconds: float) -> int:
    return max(math.ceil(seconds - _EPSILON), 0)


class RateLimiter:
    def __init__(self, limits: RateLimitsLike, max_buckets: int = 100_000) -> None:
        self._limits = limits
        self._max_buckets = max_buckets
        # (scope, principal, model) -> bucket, least recently used first
        self._buckets: OrderedDict[tuple[Scope, str, str], TokenBucket] = OrderedDict()

    def reconfigure(self, limits: RateLimitsLike) -> None:
        """On reload: levels are kept; changed rates are retuned on next use; model buckets whose cap is gone go."""
        self._limits = limits
        for key in [key for key in self._buckets if key[0] == "model" and key[2] not in limits.models]:
            del self._buckets[key]

    def check(
        self, principal: str, principal_rate: RateLike | None, model_rates: Mapping[str, RateLike], model: str,
        now: float,
    ) -> Decision:
        """Admit the request and take one token from every applicable bucket, or refuse it and take none."""
        wanted: tuple[tuple[tuple[Scope, str, str], RateLike | None], ...] = (
            (("principal", principal, ""), principal_rate if principal_rate is not None else self._limits.default),
            (("principal_model", principal, model), model_rates.get(model)),
            (("model", "", model), self._limits.models.get(model)),
        )
        new = sum(rate is not None and key not in self._buckets for key, rate in wanted)
        if len(self._buckets) + new > self._max_buckets:
            self._evict(now, room=new)  # before fetching: a bucket of this request must not be dropped midway
        buckets: list[tuple[Scope, TokenBucket]] = []
        for key, rate in wanted:
            if rate is None:
                self._buckets.pop(key, None)  # this scope lost its rate (a reload): its old bucket is stale
            else:
                buckets.append((key[0], self._bucket(key, rate, now)))
        if not buckets:
            return _NO_LIMIT
        refusing = [(scope, bucket) for scope, bucket in buckets if bucket.tokens(now) < 1.0 - _EPSILON]
        if refusing:
            scope, bucket = max(refusing, key=lambda item: (1.0 - item[1].tokens(now)) / item[1].rate.per_second)
            return bucket.decision(False, scope, now)
        for _, bucket in buckets:
            bucket.take(now)
        scope, bucket = min(buckets, key=lambda item: item[1].tokens(now))
        return bucket.decision(True, scope, now)

    def __len__(self) -> int:
        """Buckets held (bounded by max_buckets)."""
        return len(self._buckets)

    def _bucket(self, key: tuple[Scope, str, str], rate: RateLike, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, now)
            return bucket
        self._buckets.move_to_end(key)
        if (bucket.rate.per_second, bucket.rate.burst) != (rate.per_second, rate.burst):
            bucket.retune(rate, now)
        return bucket

    def _evict(self, now: float, room: int) -> None:
        """Drop full buckets (lossless), then the least recently used, down to 90% of the bound (less `room`)."""
        for key in [key for key, bucket in self._buckets.items() if bucket.is_full(now)]:
            del self._buckets[key]
        target = max(self._max_buckets - max(self._max_buckets // 10, room), 0)
        while len(self._buckets) > target:
            self._buckets.popitem(last=False)
