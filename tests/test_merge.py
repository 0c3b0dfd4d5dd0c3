"""Workers' expositions and /admin/backends documents merged into the whole gateway's (gateway/merge.py)."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import ExitStack
from typing import Any

import prometheus_client.metrics
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.merge import merge_backends, merge_expositions
from gateway.metrics import GatewayMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """Every sample of an exposition, re-parsed: (name, sorted labels) → value."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(samples: Samples, name: str, labels: dict[str, str]) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _families(text: str) -> list[str]:
    return [family.name for family in text_string_to_metric_families(text)]


def _buckets(text: str, family: str) -> list[tuple[str, float]]:
    """A histogram's (le, count) as written, in order."""
    return [(sample.labels["le"], sample.value) for metric in text_string_to_metric_families(text)
            if metric.name == family for sample in metric.samples if sample.name == f"{family}_bucket"]


CREATED = (2000.0, 1000.0)  # worker 1's metrics were created first


def _exposition(monkeypatch: pytest.MonkeyPatch, worker: int) -> str:
    """Worker 0's or worker 1's: the same metrics, different traffic; only worker 1 has `retries`."""
    registry, first = CollectorRegistry(), worker == 0
    with monkeypatch.context() as patch:
        patch.setattr(prometheus_client.metrics.time, "time", lambda: CREATED[worker])
        jobs = Counter("jobs", "Jobs done.", ["queue"], registry=registry)
        in_flight = Gauge("jobs_in_flight", "Jobs being done.", registry=registry)
        up = Gauge("queue_up", "1 if the queue is up.", ["queue"], registry=registry)
        seconds = Histogram("job_seconds", "Time per job.", ["queue"], buckets=(0.1, 1.0, 5.0), registry=registry)
        payload = Summary("job_payload_bytes", "Payload per job.", registry=registry)
        for queue, amount in ({"b": 1, "a": 3} if first else {"c": 5, "a": 2}).items():
            jobs.labels(queue).inc(amount)
        in_flight.set(2 if first else 3)
        for queue, value in ({"a": 1, "b": 0, "d": 0} if first else {"a": 0, "b": 1, "d": 0}).items():
            up.labels(queue).set(value)
        for duration in (0.05, 0.5, 3.0) if first else (0.5, 10.0):
            seconds.labels("a").observe(duration)
            payload.observe(100)
        if not first:
            Counter("retries", "Jobs retried.", registry=registry).inc(4)
    return generate_latest(registry).decode()


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two workers' expositions from prometheus_client's own metrics."""
    return [_exposition(monkeypatch, worker) for worker in (0, 1)]


@pytest.fixture
def gateway() -> list[str]:
    """Two GatewayMetrics scraped mid-request: 1 + 2 requests in flight; only worker 1 knows upstream u2."""
    first, second = GatewayMetrics(), GatewayMetrics()
    for seconds in (0.004, 0.02):
        first.observe_request(model="m", route="predict", status=200, upstream="u1", seconds=seconds)
        first.observe_attempt(pool="p", upstream="u1", seconds=seconds)
    first.observe_request(model="m", route="predict", status=503, upstream="", seconds=0.3)
    second.observe_request(model="m", route="predict", status=200, upstream="u2", seconds=0.0007)
    second.observe_attempt(pool="p", upstream="u2", seconds=0.0007)
    first.set_state(pool="p", upstream="u1", state="ejected")
    second.set_state(pool="p", upstream="u1", state="healthy")
    second.set_state(pool="p", upstream="u2", state="unhealthy")
    second.reloaded(False)
    with ExitStack() as stack:
        for metrics in (first, second, second):
            stack.enter_context(metrics.in_flight)
        return [metrics.exposition()[0].decode() for metrics in (first, second)]


@pytest.mark.parametrize("name, labels, expected", [
    ("jobs_total", {"queue": "a"}, 5),  # counters add up
    ("jobs_total", {"queue": "b"}, 1),
    ("jobs_total", {"queue": "c"}, 5),  # a series only worker 1 has
    ("jobs_created", {"queue": "a"}, 1000),  # the earliest
    ("jobs_in_flight", {}, 5),  # `_in_flight` gauges add up
    ("queue_up", {"queue": "a"}, 1),  # other gauges: the maximum
    ("queue_up", {"queue": "b"}, 1),
    ("queue_up", {"queue": "d"}, 0),
    ("job_seconds_bucket", {"queue": "a", "le": "0.1"}, 1),
    ("job_seconds_bucket", {"queue": "a", "le": "1.0"}, 3),
    ("job_seconds_bucket", {"queue": "a", "le": "5.0"}, 4),
    ("job_seconds_bucket", {"queue": "a", "le": "+Inf"}, 5),
    ("job_seconds_count", {"queue": "a"}, 5),
    ("job_seconds_sum", {"queue": "a"}, 14.05),
    ("job_seconds_created", {"queue": "a"}, 1000),
    ("job_payload_bytes_count", {}, 5),  # summaries add up
    ("job_payload_bytes_sum", {}, 500),
    ("retries_total", {}, 4),  # a family only worker 1 has
])
def test_prometheus_client_metrics(plain: list[str], name: str, labels: dict[str, str], expected: float) -> None:
    assert _value(_samples(merge_expositions(plain)), name, labels) == pytest.approx(expected)


REQUEST = {"model": "m", "route": "predict"}
ATTEMPT = {"pool": "p", "upstream": "u1"}


@pytest.mark.parametrize("name, labels, expected", [
    ("tfgate_gateway_requests_total", {**REQUEST, "code": "200", "upstream": "u1", "protocol": "rest"}, 2),
    ("tfgate_gateway_requests_total", {**REQUEST, "code": "503", "upstream": "", "protocol": "rest"}, 1),
    ("tfgate_gateway_requests_total", {**REQUEST, "code": "200", "upstream": "u2", "protocol": "rest"}, 1),
    ("tfgate_gateway_request_duration_seconds_count", REQUEST, 4),
    ("tfgate_gateway_request_duration_seconds_sum", REQUEST, 0.3247),
    ("tfgate_gateway_request_duration_seconds_bucket", {**REQUEST, "le": "0.001"}, 1),
    ("tfgate_gateway_request_duration_seconds_bucket", {**REQUEST, "le": "0.005"}, 2),
    ("tfgate_gateway_request_duration_seconds_bucket", {**REQUEST, "le": "0.025"}, 3),
    ("tfgate_gateway_request_duration_seconds_bucket", {**REQUEST, "le": "+Inf"}, 4),
    ("tfgate_gateway_upstream_duration_seconds_count", ATTEMPT, 2),
    ("tfgate_gateway_upstream_duration_seconds_count", {"pool": "p", "upstream": "u2"}, 1),
    ("tfgate_gateway_requests_in_flight", {}, 3),
    ("tfgate_gateway_upstream_state", {**ATTEMPT, "state": "ejected"}, 1),  # some worker sees it ejected
    ("tfgate_gateway_upstream_state", {**ATTEMPT, "state": "healthy"}, 1),  # and some healthy
    ("tfgate_gateway_upstream_state", {**ATTEMPT, "state": "unhealthy"}, 0),
    ("tfgate_gateway_upstream_state", {"pool": "p", "upstream": "u2", "state": "unhealthy"}, 1),
    ("tfgate_gateway_config_reloads_total", {"result": "failure"}, 1),
    ("tfgate_gateway_config_reloads_total", {"result": "success"}, 0),
    ("tfgate_gateway_config_last_reload_successful", {}, 1),
])
def test_gateway_metrics(gateway: list[str], name: str, labels: dict[str, str], expected: float) -> None:
    assert _value(_samples(merge_expositions(gateway)), name, labels) == pytest.approx(expected)


@pytest.mark.parametrize("workers", ["plain", "gateway"])
def test_output_passes_promtool(workers: str, request: pytest.FixtureRequest) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install --no-install-recommends prometheus)")
    merged = merge_expositions(request.getfixturevalue(workers))
    result = subprocess.run([promtool, "check", "metrics"], input=merged, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("workers", ["plain", "gateway"])
def test_one_worker_comes_back_unchanged(workers: str, request: pytest.FixtureRequest) -> None:
    for text in request.getfixturevalue(workers):
        assert merge_expositions([text]) == text


def test_order_is_first_seen(plain: list[str]) -> None:
    merged = merge_expositions(plain)
    assert _families(merged) == [*_families(plain[0]), "retries", "retries_created"]
    jobs = [sample.labels["queue"] for family in text_string_to_metric_families(merged) if family.name == "jobs"
            for sample in family.samples]
    assert jobs == ["b", "a", "c"]


def _histogram(buckets: tuple[float, ...], observations: tuple[float, ...]) -> str:
    registry = CollectorRegistry()
    histogram = Histogram("wait_seconds", "Waits.", buckets=buckets, registry=registry)
    for value in observations:
        histogram.observe(value)
    return generate_latest(registry).decode()


def test_buckets_ascend_and_stay_cumulative_across_layouts() -> None:
    """Worker 1 lacks worker 0's bounds and the other way round: each counts there what it has below."""
    merged = merge_expositions([_histogram((1.0, 5.0), (0.7, 3.0)), _histogram((0.5, 2.0), (0.2, 1.5, 7.0))])
    assert _buckets(merged, "wait_seconds") == [("0.5", 1), ("1.0", 2), ("2.0", 3), ("5.0", 4), ("+Inf", 5)]
    assert _value(_samples(merged), "wait_seconds_count", {}) == 5


def test_summary_quantiles_take_the_maximum() -> None:
    def worker(p50: float, count: int) -> str:
        return (f'# HELP rpc_seconds RPCs.\n# TYPE rpc_seconds summary\nrpc_seconds{{quantile="0.5"}} {p50}\n'
                f'rpc_seconds_count {count}\nrpc_seconds_sum {count * p50}\n')

    samples = _samples(merge_expositions([worker(0.2, 3), worker(0.1, 4)]))
    assert _value(samples, "rpc_seconds", {"quantile": "0.5"}) == 0.2
    assert _value(samples, "rpc_seconds_count", {}) == 7


@pytest.mark.parametrize("texts", [[], [""], ["", ""]], ids=["none", "one-empty", "two-empty"])
def test_nothing_to_merge(texts: list[str]) -> None:
    assert merge_expositions(texts) == ""


@pytest.mark.parametrize("bad", [
    "garbage",
    'jobs_total{queue=a} 1\n',
    "# HELP w W.\n# TYPE w histogram\nw_bucket 1\nw_count 1\nw_sum 1\n",  # a bucket without `le`
    '# HELP w W.\n# TYPE w histogram\nw_bucket{le="soon"} 1\nw_count 1\nw_sum 1\n',
    "# HELP retries R.\n# TYPE retries gauge\nretries 1\n",  # worker 1 says counter
    "# HELP retries_total R.\n# TYPE retries_total gauge\nretries_total 1\n",  # worker 1's counter writes it
], ids=["garbage", "unquoted-label", "bucket-without-le", "bad-le", "type-conflict", "sample-in-two-families"])
def test_bad_worker_is_named(plain: list[str], bad: str) -> None:
    with pytest.raises(ValueError, match="^worker 2: "):
        merge_expositions([*plain, bad])


def _backend(rest: str, state: str = "healthy", *, ewma_ms: float = 1.0, in_flight: int = 0, requests: int = 0,
             failures: int = 0, ejections: int = 0, open: int = 0, idle: int = 0) -> dict[str, Any]:
    return {"rest": rest, "grpc": f"{rest}:8500", "state": state, "ewma_ms": ewma_ms, "in_flight": in_flight,
            "requests": requests, "failures": failures, "ejections": ejections,
            "connections": {"open": open, "idle": idle}}


def test_backends_add_up_per_pool_and_backend() -> None:
    first = {"pools": {"cpu": [_backend("a:8501", ewma_ms=2.5, in_flight=1, requests=10, failures=1, open=2, idle=1),
                               _backend("b:8501", "unhealthy", requests=4, failures=4, ejections=1, open=1)],
                       "gpu": [_backend("g:8501", requests=7, open=1, idle=1)]},
             "fleet": {"cpu": []}}
    second = {"pools": {"cpu": [_backend("b:8501", "ejected", ewma_ms=9.0, requests=1, failures=1, ejections=2),
                                _backend("a:8501", ewma_ms=1.25, in_flight=2, requests=5, open=3, idle=2),
                                _backend("c:8501", requests=3, open=1)]}}  # c: added by a reload worker 0 missed
    assert merge_backends([first, second]) == {"workers": 2, "pools": {
        "cpu": [_backend("a:8501", ewma_ms=2.5, in_flight=3, requests=15, failures=1, open=5, idle=3),
                _backend("b:8501", "ejected", ewma_ms=9.0, requests=5, failures=5, ejections=3, open=1),
                _backend("c:8501", requests=3, open=1)],
        "gpu": [_backend("g:8501", requests=7, open=1, idle=1)]}}
    assert list(merge_backends([second, first])["pools"]) == ["cpu", "gpu"]


@pytest.mark.parametrize("states, expected", [
    (["healthy", "healthy"], "healthy"),
    (["healthy", "unhealthy"], "unhealthy"),
    (["unhealthy", "ejected", "healthy"], "ejected"),
    (["ejected", "unhealthy"], "ejected"),
    (["ejected"], "ejected"),
])
def test_backend_state_is_the_worst(states: list[str], expected: str) -> None:
    merged = merge_backends([{"pools": {"cpu": [_backend("a:8501", state)]}} for state in states])
    assert merged["pools"]["cpu"][0]["state"] == expected


@pytest.mark.parametrize("documents, workers", [
    ([], 0),
    ([{"pools": {}}], 1),
    ([{"pools": {"cpu": [_backend("a:8501")]}}] * 3, 3),
])
def test_backends_count_workers(documents: list[dict[str, Any]], workers: int) -> None:
    assert merge_backends(documents)["workers"] == workers


def test_first_only_families_come_from_the_first_text(plain: list[str]) -> None:
    """The primary's own families (its config generation) are not added to the workers' copies of them."""
    merged = _samples(merge_expositions(plain, first_only=("jobs", "retries")))
    assert _value(merged, "jobs_total", {"queue": "a"}) == 3  # worker 0's alone, not 3 + 2
    assert ("jobs_total", (("queue", "c"),)) not in merged  # only worker 1 had it
    assert not any(name.startswith("retries") for name, _ in merged)  # only worker 1 has the family
    assert _value(merged, "jobs_in_flight", {}) == 2  # it starts with "jobs" too: they are name prefixes
    assert _value(merged, "job_seconds_count", {"queue": "a"}) == 5  # other families still add up (3 + 2)
