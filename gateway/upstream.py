"""Pools of backends at run time: each backend's connection pool, health and load, the active health checks, and
forwarding a request with bounded retries.

How it works: `Upstreams` keeps one `BackendRuntime` per backend address across reloads, so a backend present in
the old and the new config keeps its connections, health state and latency estimate. `build()` makes the pools of
a new config from it; backends that left are closed once the requests still using them finish (or after the
request timeout). Each backend has one health-check task (GET its readiness path on the interval with jitter).
`forward()` asks the pool for candidates (healthy ones, or all in panic mode; kept between requests until a result
changes a backend's state or a running ejection ends), lets the balancer pick, and sends;
a failure before a complete response (connect, reset) or a 502/503 from the backend is retried on a backend not
tried yet, while attempts, the deadline and the pool's retry budget allow. Every attempt feeds the balancer's load
and the passive outlier detection.

Guarantees: no task outlives `close()`; a request never waits past its deadline; a backend's own 4xx/5xx other
than 502/503 passes through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from gateway import errors
from gateway.balancer import LeastLatency, PeakEwma, RoundRobin, UpstreamLoad, make_balancer
from gateway.config import Backend, GatewayConfig, Pool
from gateway.health import BackendHealth, State, candidates, may_eject, next_check_delay, states_hold_until
from gateway.metrics import GatewayMetrics
from gateway.retry_budget import RetryBudget
from gateway.upstream_http import HttpPool, UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({502, 503})
T = TypeVar("T")


@dataclass(eq=False)
class BackendRuntime:
    """One backend's live state, shared by every pool and snapshot that names its address."""

    address: Backend
    http: HttpPool
    health: BackendHealth
    load: UpstreamLoad
    pool: str  # the pool it is in (a backend address belongs to one pool)
    checker: asyncio.Task[None] | None = None
    name: str = field(init=False)  # "host:port" of its REST address, as the config writes it

    def __post_init__(self) -> None:
        self.name = str(self.address.rest)

    def state(self, now: float) -> State:
        return self.health.state(now)


@dataclass(eq=False)
class PoolRuntime:
    config: Pool
    backends: tuple[BackendRuntime, ...]
    balancer: RoundRobin | LeastLatency
    budget: RetryBudget
    # The candidates of the last pick, kept while no backend's state can have changed: computed at `health_epoch`
    # (Upstreams counts state changes) and valid until `candidates_until` (the earliest running ejection's end).
    candidates: list[BackendRuntime] = field(default_factory=list)
    health_epoch: int = -1
    candidates_until: float = -math.inf

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(slots=True, init=False)  # made per request (see backend/inference.py's ModelCall)
class Attempts:
    """What forward() did, for the access log, even when it failed."""

    count: int
    upstream: str
    upstream_s: float
    tried: list[BackendRuntime]
    detail: str  # what went wrong, naming the backend: for the access log, never for the client

    def __init__(self) -> None:
        self.count, self.upstream, self.upstream_s, self.tried, self.detail = 0, "", 0.0, [], ""


class Upstreams:
    def __init__(self, metrics: GatewayMetrics, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock
        self._backends: dict[str, BackendRuntime] = {}
        self._pools: dict[str, PoolRuntime] = {}
        self._retiring: dict[asyncio.Task[None], BackendRuntime] = {}
        self._health_epoch = 0  # +1 whenever a result changes a backend's state: pools' kept candidates are stale

    def build(self, config: GatewayConfig) -> dict[str, PoolRuntime]:
        """The pools of `config`, reusing the state of every backend already known; starts checks for new ones.
        Call apply() once the snapshot holding them is in place."""
        pools: dict[str, PoolRuntime] = {}
        for pool in config.pools.values():
            runtimes = tuple(self._runtime(pool, backend) for backend in pool.backends)
            previous = self._pools.get(pool.name)
            if previous is not None and previous.config.balancer == pool.balancer:
                balancer, budget = previous.balancer, previous.budget
                budget.reconfigure(pool.retries.budget_percent, pool.retries.min_retries_per_s)
            else:
                balancer = make_balancer(pool.balancer, self._rng)
                budget = RetryBudget(pool.retries.budget_percent, pool.retries.min_retries_per_s)
            pools[pool.name] = PoolRuntime(pool, runtimes, balancer, budget)
        return pools

    def _runtime(self, pool: Pool, backend: Backend) -> BackendRuntime:
        key = str(backend.rest)
        runtime = self._backends.get(key)
        if runtime is None or runtime.pool != pool.name:
            runtime = BackendRuntime(address=backend,
                                     http=HttpPool(backend.rest.host, backend.rest.port,
                                                   connect_timeout_s=pool.health_check.timeout_s),
                                     health=BackendHealth(pool.health_check, pool.outlier),
                                     load=UpstreamLoad(ewma=PeakEwma(decay_s=pool.latency_decay_s)),
                                     pool=pool.name)
        else:
            runtime.address = backend
            runtime.health.reconfigure(pool.health_check, pool.outlier)
            runtime.load.ewma.decay_s = pool.latency_decay_s
        return runtime

    def apply(self, pools: Mapping[str, PoolRuntime], request_timeout_s: float) -> None:
        """Make `pools` the live set: start checks for new backends, retire those no pool names any more."""
        live = {backend.name: backend for pool in pools.values() for backend in pool.backends}
        for name, old in self._backends.items():
            if live.get(name) is not old:
                self._retire(old, request_timeout_s)
        for backend in live.values():
            if backend.checker is None:
                backend.checker = asyncio.create_task(self._check_forever(backend, pools[backend.pool].config),
                                                      name=f"health-check {backend.name}")
                self._metrics.set_state(pool=backend.pool, upstream=backend.name, state="healthy")
        self._backends, self._pools = live, dict(pools)

    def _retire(self, backend: BackendRuntime, grace_s: float) -> None:
        if backend.checker is not None:
            backend.checker.cancel()
        self._metrics.forget_upstream(pool=backend.pool, upstream=backend.name)
        task = asyncio.create_task(self._close_when_idle(backend, grace_s), name=f"retire {backend.name}")
        self._retiring[task] = backend
        task.add_done_callback(self._retiring.pop)

    async def _close_when_idle(self, backend: BackendRuntime, grace_s: float) -> None:
        """Requests that started on the old snapshot finish first (bounded by the request timeout). Polled, since a
        retired backend is rare and its requests end on their own: no per-request signal is worth the hot path."""
        if backend.checker is not None:
            await asyncio.gather(backend.checker, return_exceptions=True)
        deadline = self._clock() + grace_s
        while backend.load.in_flight and self._clock() < deadline:
            await asyncio.sleep(0.05)
        await backend.http.close()

    async def _check_forever(self, backend: BackendRuntime, pool: Pool) -> None:
        while True:
            check = pool.health_check
            ok = await self._probe(backend, check.path, check.timeout_s)
            self.active_result(backend, ok, self._clock())
            await asyncio.sleep(next_check_delay(check, self._rng))
            pool = self._pools[backend.pool].config if backend.pool in self._pools else pool

    def active_result(self, backend: BackendRuntime, ok: bool, now: float) -> None:
        """An active check's result; a change of state is logged and exported, and renews the pools' candidates."""
        before = backend.state(now)
        backend.health.active_result(ok, now)
        after = backend.state(now)
        if after != before:
            self._health_epoch += 1
            log.warning("backend %s (pool %s) is now %s", backend.name, backend.pool, after)
            self._metrics.set_state(pool=backend.pool, upstream=backend.name, state=after)

    @staticmethod
    async def _probe(backend: BackendRuntime, path: str, timeout_s: float) -> bool:
        try:
            response = await backend.http.request("GET", path, [("host", backend.name)], b"", timeout_s)
        except UpstreamError:
            return False
        return response.status == 200

    def forward(self, pool: PoolRuntime, method: str, path: str, headers: Sequence[tuple[str, str]],
                body: bytes, deadline: float, attempts: Attempts) -> Awaitable[UpstreamResponse]:
        """Send the HTTP request to a backend of `pool`, retrying as the module docstring says. A backend's own
        502/503 is returned as it is when no retry follows it. A plain function returning forward_with's coroutine:
        one coroutine less per request."""
        def send(backend: BackendRuntime, remaining_s: float) -> Awaitable[UpstreamResponse]:
            return backend.http.request(method, path, [*headers, ("host", backend.name)], body, remaining_s)

        return self.forward_with(pool, send, _backend_failed, deadline, attempts)

    async def forward_with(self, pool: PoolRuntime, send: Callable[[BackendRuntime, float], Awaitable[T]],
                           failed: Callable[[T], bool], deadline: float, attempts: Attempts) -> T:
        """Call `send(backend, remaining seconds)` on backends of `pool` picked by its balancer, retrying on another
        backend after an UpstreamError that allows it, or an answer `failed` says is the backend's failure, while
        attempts, the deadline and the pool's retry budget allow. The last answer is returned as it is when no
        retry follows it. Errors of our own say what happened in general terms; the backend and the cause go to
        `attempts.detail`, for the access log, not to the client."""
        budget, limit = pool.budget, pool.config.retries.attempts
        now = self._clock()  # read here and after each attempt (_finish returns it): not per step
        budget.record_request(now)
        answer: T | None = None
        error_of_ours: errors.GatewayError | None = None
        backend = self._pick(pool, attempts.tried, now)
        while backend is not None:
            remaining = deadline - now
            if remaining <= 0:
                raise errors.GatewayTimeout("Request timed out before a backend answered")
            attempts.count += 1
            attempts.tried.append(backend)
            attempts.upstream = backend.name
            started = now
            backend.load.start()
            try:
                answer, error_of_ours = await send(backend, remaining), None
            except UpstreamError as error:
                now = self._finish(pool, backend, started, ok=False, attempts=attempts)
                attempts.detail = f"backend {backend.name}: {error}"
                if error.kind == "timeout":
                    raise errors.GatewayTimeout("The backend did not answer in time") from None
                answer, error_of_ours = None, errors.BadGateway("The backend failed before it answered")
                if not error.retryable:
                    raise error_of_ours from None
            else:
                bad = failed(answer)
                now = self._finish(pool, backend, started, ok=not bad, attempts=attempts)
                if not bad:
                    return answer
            backend = self._pick(pool, attempts.tried, now) if attempts.count < limit else None
            if backend is not None and not budget.try_retry(now):
                self._metrics.retry_refused(pool.name)
                backend = None
            if backend is not None:
                self._metrics.retried(pool.name)
        if error_of_ours is not None:
            raise error_of_ours
        if answer is not None:
            return answer
        attempts.detail = f"no healthy backend in pool {pool.name}"
        raise errors.Unavailable("No healthy backend can serve this model now")

    def _pick(self, pool: PoolRuntime, tried: Sequence[BackendRuntime], now: float) -> BackendRuntime | None:
        if pool.health_epoch != self._health_epoch or now >= pool.candidates_until:
            pool.candidates, _panic = candidates([(backend, backend.state(now)) for backend in pool.backends],
                                                 pool.config.panic_threshold_percent)
            pool.health_epoch = self._health_epoch
            pool.candidates_until = states_hold_until([backend.health for backend in pool.backends], now)
        usable = pool.candidates
        fresh = [backend for backend in usable if backend not in tried] if tried else usable
        if not fresh:
            return None
        return pool.balancer.pick(fresh, _load_of, now)

    def _finish(self, pool: PoolRuntime, backend: BackendRuntime, started: float, *, ok: bool,
                attempts: Attempts) -> float:
        """Account the attempt that began at `started`; returns the time it ended."""
        now = self._clock()
        elapsed = now - started
        attempts.upstream_s += elapsed
        backend.load.finish(elapsed, ok, now)
        self._metrics.observe_attempt(pool=pool.name, upstream=backend.name, seconds=elapsed)
        room = not ok and may_eject([other.state(now) for other in pool.backends],
                                    pool.config.outlier.max_ejected_percent)
        if backend.health.passive_result(ok, now, room):
            self._health_epoch += 1
            log.warning("backend %s (pool %s) ejected after %d consecutive failures", backend.name, pool.name,
                        pool.config.outlier.consecutive_failures)
            self._metrics.ejected(pool=pool.name, upstream=backend.name)
            self._metrics.set_state(pool=pool.name, upstream=backend.name, state="ejected")
        return now

    def describe(self, now: float) -> dict[str, list[dict[str, object]]]:
        """GET /admin/backends: every pool's backends with their state and load."""
        return {name: [{"rest": backend.name, "grpc": None if backend.address.grpc is None
                        else str(backend.address.grpc), "state": backend.state(now),
                        "ewma_ms": round(backend.load.ewma.estimate(now) * 1000, 3),
                        "in_flight": backend.load.in_flight, "requests": backend.load.requests,
                        "failures": backend.load.failures, "ejections": backend.health.ejections,
                        "connections": {"open": backend.http.open, "idle": backend.http.idle}}
                       for backend in pool.backends]
                for name, pool in self._pools.items()}

    async def close(self) -> None:
        """Cancel every check, close every pool; retiring backends close too."""
        tasks = [backend.checker for backend in self._backends.values() if backend.checker is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        retiring = dict(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await asyncio.gather(*(backend.http.close() for backend in [*self._backends.values(), *retiring.values()]))
        self._backends.clear()


def _load_of(backend: BackendRuntime) -> UpstreamLoad:
    return backend.load


def _backend_failed(response: UpstreamResponse) -> bool:
    """A backend's own 502/503: retried on another backend like a failed connection."""
    return response.status in RETRYABLE_STATUSES
