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

Buckets are keyed by (scope, principal, model), created full on first use and bounded in number (`max_buckets`), so
a JWT subject flood cannot grow memory: a request that needs new buckets at the bound makes room by looking at the
16 least recently used; the full ones among them go (that loses nothing: one is recreated full), else the oldest.
An eviction so costs the same at any bound (a pass over every bucket stalled all requests for 193 ms at 100k).

Reload: `reconfigure` swaps the limits and drops the model buckets whose cap is gone. A bucket whose rate changed
(the default, a model cap, or a principal's own rate, which arrives with each request) is retuned on its next use:
it keeps its level, capped at the new burst, and refills at the new rate from then on; a reload never refills
a bucket. A bucket whose scope no longer has a rate is dropped when a request shows it (or by the bound).

Guarantees: never more than burst + per_second × t admitted per bucket over any t seconds; levels change only
through `check` / `take` with the `now` given; a clock that steps back adds no tokens.

Shared mode (`store=SharedBuckets`, for `workers: N`): the buckets live in a file every worker maps (see
`gateway.shared_buckets`), so a principal's 40/s is 40/s in total whichever worker its connections land on. A
`check` holds the file's lock throughout (one flock pair): it reads its buckets from their slots into
`TokenBucket`s, decides with the same code as above and writes them back, so the all-or-nothing take is atomic
across processes and the guarantees hold for the sum over all workers. `now` must be one clock for all of them:
time.monotonic() is system-wide on Linux; a worker whose reading lags another's earns nothing for the overlap. The
bound is the smaller of `max_buckets` and what the file holds (3/4 of its slots); eviction is the same policy on 16
live slots found from a random place in the file (Redis's sampled LRU: least recently used by a use counter in the
file), so it holds the lock as briefly as any check (a pass over the file, as before, held it 308 ms at 49,152
buckets, and so stalled every worker); only a table with fewer live slots than that, or damaged, gets one pass. A
reload runs in each worker from its own config: levels are shared and kept, and `reconfigure` drops the file's model
buckets whose cap is gone, so the first worker to reload drops them for all. Without a store the buckets are this
process's own, with no lock. The limiter does not own the store: whoever opened it closes it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from gateway.shared_buckets import SharedBuckets, Slot, by_use

Scope = Literal["principal", "principal_model", "model", ""]
_Key = tuple[Scope, str, str]  # (scope, principal, model)
_EVICTION_SAMPLE = 16  # buckets one eviction looks at (see "bounded in number" above)
_TAGS: Mapping[Scope, int] = {"principal": 1, "principal_model": 2, "model": 3}  # a scope's tag in the shared file

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


@dataclass(slots=True, init=False)  # made per request: its own __init__ runs compiled (see backend/inference.py's ModelCall)
class Decision:
    allowed: bool
    limit: int  # RateLimit-Limit: burst of the deciding bucket
    remaining: int  # RateLimit-Remaining: whole tokens left in it after this request
    reset_s: int  # RateLimit-Reset: whole seconds (ceil) until it is full
    retry_after_s: int  # Retry-After when refused (ceil, >= 1); 0 when allowed
    scope: Scope  # which bucket decided; "" when none applied

    def __init__(self, allowed: bool, limit: int, remaining: int, reset_s: int, retry_after_s: int,
                 scope: Scope) -> None:
        self.allowed, self.limit, self.remaining = allowed, limit, remaining
        self.reset_s, self.retry_after_s, self.scope = reset_s, retry_after_s, scope


_NO_LIMIT = Decision(allowed=True, limit=0, remaining=0, reset_s=0, retry_after_s=0, scope="")


class _StoredRate(NamedTuple):
    """The rate a shared bucket was last tuned to, as its slot holds it."""

    per_second: float
    burst: float


class TokenBucket:
    __slots__ = ("_at", "_level", "_rate")

    def __init__(self, rate: RateLike, now: float) -> None:
        """Starts full: a new client may send its burst at once."""
        self._rate = rate
        self._level = float(rate.burst)
        self._at = now

    @classmethod
    def restore(cls, rate: RateLike, level: float, at: float) -> TokenBucket:
        """A bucket as saved (a shared slot): `level` tokens at time `at`."""
        bucket = cls(rate, at)
        bucket._level = level
        return bucket

    @property
    def rate(self) -> RateLike:
        return self._rate

    @property
    def saved(self) -> tuple[float, float]:
        """(level, at): what `restore` takes back."""
        return self._level, self._at

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

    def follow(self, rate: RateLike, now: float) -> TokenBucket:
        """Retune if the rate's values changed (a reload rebuilds equal rates: those change nothing)."""
        if (self._rate.per_second, self._rate.burst) != (rate.per_second, rate.burst):
            self.retune(rate, now)
        return self

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


class _LocalBuckets:
    """This process's buckets, least recently used first: no lock, nothing to write back. An OrderedDict held, not
    extended: the module is compiled (mypyc), whose classes cannot extend it."""

    def __init__(self) -> None:
        self._buckets: OrderedDict[_Key, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: _Key) -> bool:
        return key in self._buckets

    def pop(self, key: _Key, default: None) -> None:
        self._buckets.pop(key, default)

    def bucket(self, key: _Key, rate: RateLike, now: float) -> TokenBucket:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = TokenBucket(rate, now)
            return bucket
        buckets.move_to_end(key)
        return bucket.follow(rate, now)

    def evict(self, now: float, target: int, protected: frozenset[_Key]) -> None:
        """Drop buckets, never the `protected` ones, until `target` are left (or only protected ones)."""
        buckets = self._buckets
        while len(buckets) > target:
            oldest = [(key, bucket) for key, bucket in itertools.islice(buckets.items(), _EVICTION_SAMPLE + len(protected))
                      if key not in protected][:_EVICTION_SAMPLE]
            if not oldest:
                return
            for key in [key for key, bucket in oldest if bucket.is_full(now)] or [oldest[0][0]]:
                del buckets[key]

    def drop_models(self, models: Mapping[str, RateLike]) -> None:
        for key in [key for key in self._buckets if key[0] == "model" and key[2] not in models]:
            del self._buckets[key]


class _SharedStore:
    """Buckets in the shared file, with the same methods as `_LocalBuckets`. Used under `lock` only: a check's
    buckets are read from their slots, and written back (removals done) by `flush` before the lock is released."""

    def __init__(self, table: SharedBuckets) -> None:
        self.table = table
        self.lock = table.lock
        self._hashes: dict[_Key, int] = {}
        self._found: dict[_Key, int] = {}  # slots `in` looked up this check, until slots move
        self._fetched: list[tuple[int, TokenBucket]] = []  # (slot, bucket) of this check
        self._removed: list[int] = []  # hashes; removed in `flush`: removal moves slots, the fetched ones included
        self._rng = random.Random()  # where eviction samples the table

    def __contains__(self, key: _Key) -> bool:
        slot = self._found[key] = self.table.find(self._hash(key))
        return slot >= 0

    def __len__(self) -> int:
        return len(self.table)

    def pop(self, key: _Key, default: None) -> None:
        self._removed.append(self._hash(key))

    def bucket(self, key: _Key, rate: RateLike, now: float) -> TokenBucket:
        table = self.table
        slot = self._found.pop(key, None)
        if slot is None:
            slot = table.find(self._hash(key))
        if slot < 0:
            slot = table.insert(self._hash(key), rate.burst, now, rate.per_second, rate.burst)
            bucket = TokenBucket(rate, now)
        else:
            level, at, per_second, burst = table.use(slot)
            bucket = TokenBucket.restore(_StoredRate(per_second, burst), level, at).follow(rate, now)
        self._fetched.append((slot, bucket))
        return bucket

    def flush(self) -> None:
        table = self.table
        for slot, bucket in self._fetched:
            table.write(slot, *bucket.saved, bucket.rate.per_second, bucket.rate.burst)
        for key_hash in self._removed:
            slot = table.find(key_hash)
            if slot >= 0:
                table.delete(slot)
        self._found.clear()
        self._fetched.clear()
        self._removed.clear()

    def evict(self, now: float, target: int, protected: frozenset[_Key]) -> None:
        kept = {self._hash(key) for key in protected}

        def full(slot: Slot) -> bool:
            return slot.key_hash not in kept and TokenBucket.restore(
                _StoredRate(slot.per_second, slot.burst), slot.tokens, slot.stamp).is_full(now)

        self._found.clear()
        table = self.table
        while len(table) > target:
            sample = table.sample(self._rng.randrange(table.capacity), _EVICTION_SAMPLE + len(kept))
            if len(sample) < _EVICTION_SAMPLE + len(kept):  # every live slot: one pass, which heals a drifted count
                table.drop(full, keep=target)
                return
            sample = [slot for slot in sample if slot.key_hash not in kept][:_EVICTION_SAMPLE]
            for slot in [slot for slot in sample if full(slot)] or [min(sample, key=by_use)]:
                index = table.find(slot.key_hash)  # found anew: each deletion may move the slots after it
                if index < 0:  # a slot its probe run cannot reach (damage): one pass heals it
                    table.drop(full, keep=target)
                    return
                table.delete(index)

    def drop_models(self, models: Mapping[str, RateLike]) -> None:
        kept = {self.table.key_hash(_TAGS["model"], "", model) for model in models}
        self.table.drop(lambda slot: SharedBuckets.tag(slot.key_hash) == _TAGS["model"] and slot.key_hash not in kept)

    def _hash(self, key: _Key) -> int:
        key_hash = self._hashes.get(key)
        if key_hash is None:
            if len(self._hashes) >= 4096:  # bounded like the buckets: recomputing is cheap
                self._hashes.clear()
            key_hash = self._hashes[key] = self.table.key_hash(_TAGS[key[0]], key[1], key[2])
        return key_hash


class RateLimiter:
    def __init__(self, limits: RateLimitsLike, max_buckets: int = 100_000, *, store: SharedBuckets | None = None
                 ) -> None:
        """`store`: keep the buckets in that shared file (every worker's limiter on one file shares them)."""
        self._limits = limits
        self._shared = None if store is None else _SharedStore(store)
        self._store: _LocalBuckets | _SharedStore = _LocalBuckets() if self._shared is None else self._shared
        self._max_buckets = max_buckets if store is None else min(max_buckets, store.max_buckets)

    def reconfigure(self, limits: RateLimitsLike) -> None:
        """On reload: levels are kept; changed rates are retuned on next use; model buckets whose cap is gone go."""
        self._limits = limits
        if self._shared is None:
            self._store.drop_models(limits.models)
            return
        with self._shared.lock:
            self._shared.drop_models(limits.models)

    def check(
        self, principal: str, principal_rate: RateLike | None, model_rates: Mapping[str, RateLike], model: str,
        now: float,
    ) -> Decision:
        """Admit the request and take one token from every applicable bucket, or refuse it and take none."""
        own = principal_rate if principal_rate is not None else self._limits.default
        own_for_model, model_cap = model_rates.get(model), self._limits.models.get(model)
        shared = self._shared
        if own is None and own_for_model is None and model_cap is None and shared is None and not self._store:
            return _NO_LIMIT  # no rate applies and no bucket is left to drop: a gateway without limits
        wanted: tuple[tuple[_Key, RateLike | None], ...] = (
            (("principal", principal, ""), own),
            (("principal_model", principal, model), own_for_model),
            (("model", "", model), model_cap),
        )
        if shared is None:
            return self._check(self._store, wanted, now)
        with shared.lock:
            try:
                return self._check(shared, wanted, now)
            finally:
                shared.flush()

    def __len__(self) -> int:
        """Buckets held (bounded by max_buckets); in shared mode, all workers' buckets."""
        if self._shared is None:
            return len(self._store)
        with self._shared.lock:
            return len(self._shared)

    def _check(self, store: _LocalBuckets | _SharedStore, wanted: tuple[tuple[_Key, RateLike | None], ...],
               now: float) -> Decision:
        new = sum(rate is not None and key not in store for key, rate in wanted)
        if len(store) + new > self._max_buckets:
            # before fetching, and never this request's own buckets (one dropped midway would be recreated past the
            # bound): room for its new ones, from the least recently used, full ones among them first (lossless)
            protected = frozenset(key for key, rate in wanted if rate is not None)
            store.evict(now, max(self._max_buckets - new, 0), protected)
        buckets: list[tuple[Scope, TokenBucket]] = []
        for key, rate in wanted:
            if rate is None:
                store.pop(key, None)  # this scope lost its rate (a reload): its old bucket is stale
            else:
                buckets.append((key[0], store.bucket(key, rate, now)))
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
