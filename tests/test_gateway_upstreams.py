"""gateway/upstream.py's forwarding decisions with a fake clock and a `send` that stands in for the backend call:
which backend each attempt goes to while a backend is ejected, and after its ejection ends (the pool's candidates
are kept between requests, so these check they are renewed when they must be)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import yaml

from gateway import errors
from gateway.certs import CertPaths
from gateway.config import parse_config
from gateway.metrics import GatewayMetrics
from gateway.upstream import Attempts, BackendRuntime, PoolRuntime, Upstreams

FAILING, SOUND = "127.0.0.1:1", "127.0.0.1:2"
EJECTION_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def setup(certs: CertPaths) -> AsyncIterator[tuple[Upstreams, PoolRuntime, Clock]]:
    """A pool of FAILING and SOUND on a fake clock; its health-check tasks are cancelled afterwards."""
    document = {
        "listen": {"https": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "tls": {"cert": str(certs.server_cert), "key": str(certs.server_key)},
        "pools": {"cpu": {"balancer": "round_robin",
                          "outlier": {"consecutive_failures": 1, "ejection_s": EJECTION_S, "max_ejected_percent": 50},
                          "retries": {"attempts": 1},
                          "backends": [{"rest": FAILING}, {"rest": SOUND}]}},
        "routes": [{"model": "*", "pool": "cpu"}],
    }
    clock = Clock()
    upstreams = Upstreams(GatewayMetrics(), random.Random(0), clock)
    try:
        yield upstreams, upstreams.build(parse_config(yaml.safe_dump(document)))["cpu"], clock
    finally:
        await upstreams.close()


async def forward(upstreams: Upstreams, pool: PoolRuntime, clock: Clock) -> str:
    """One request: the name of the backend it went to (FAILING's answers count as its failures)."""
    async def send(backend: BackendRuntime, remaining_s: float) -> str:
        return backend.name

    return await upstreams.forward_with(pool, send, lambda answer: answer == FAILING, clock() + 5, Attempts())


async def test_an_ejected_backend_gets_no_request_until_its_ejection_ends(
        setup: tuple[Upstreams, PoolRuntime, Clock]) -> None:
    upstreams, pool, clock = setup
    first = [await forward(upstreams, pool, clock) for _ in range(2)]
    assert sorted(first) == [FAILING, SOUND]  # round robin over both; FAILING's failure ejects it
    assert pool.backends[0].state(clock()) == "ejected"
    assert {await forward(upstreams, pool, clock) for _ in range(6)} == {SOUND}
    clock.now += EJECTION_S - 0.001
    assert await forward(upstreams, pool, clock) == SOUND
    clock.now += 0.002  # the ejection is over: FAILING is a candidate again, with no health result in between
    assert FAILING in {await forward(upstreams, pool, clock) for _ in range(2)}


async def test_kept_candidates_are_renewed_when_an_active_check_changes_a_state(
        setup: tuple[Upstreams, PoolRuntime, Clock]) -> None:
    upstreams, pool, clock = setup
    while await forward(upstreams, pool, clock) != FAILING:
        pass
    assert await forward(upstreams, pool, clock) == SOUND  # the only candidate, kept for the next requests
    sound = pool.backends[1]
    while sound.state(clock()) == "healthy":  # active checks take the other one out too
        upstreams.active_result(sound, False, clock())
    with pytest.raises(errors.Unavailable):  # the candidates kept from before must not outlive that
        await forward(upstreams, pool, clock)
