"""The lock-free request-path metrics expose exactly what prometheus-client's own classes would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from backend.loop_metrics import LoopCounter, LoopGauge, LoopHistogram, LoopMetrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)
OBSERVED = (0.0005, 0.001, 0.05, 0.1, 3.0, 0.01)


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


def test_same_exposition_as_prometheus_client() -> None:
    reference = CollectorRegistry()
    counter = Counter("requests_total", "Requests.", ["model", "code"], registry=reference)
    histogram = Histogram("latency_seconds", "Latency.", ["model"], buckets=BUCKETS, registry=reference)
    gauge = Gauge("in_flight", "In flight.", ["entrypoint"], registry=reference)
    ours = CollectorRegistry()
    loop_counter = LoopCounter("requests", "Requests.", ["model", "code"])
    loop_histogram = LoopHistogram("latency_seconds", "Latency.", ["model"], BUCKETS)
    loop_gauge = LoopGauge("in_flight", "In flight.", ["entrypoint"])
    ours.register(LoopMetrics(loop_counter, loop_histogram, loop_gauge))
    for value in OBSERVED:
        counter.labels("m", "OK").inc()
        loop_counter.inc(("m", "OK"))
        histogram.labels("m").observe(value)
        loop_histogram.observe(("m",), value)
    counter.labels("m", "NOT_FOUND").inc(2)
    loop_counter.inc(("m", "NOT_FOUND"), 2)
    gauge.labels("REST").inc()
    loop_gauge.add(("REST",), 1)
    assert _without_created(generate_latest(ours)) == _without_created(generate_latest(reference))


def test_the_series_of_a_label_value_can_be_removed() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("requests", "Requests.", ["model", "code"])
    registry.register(LoopMetrics(counter))
    for labels in (("a", "OK"), ("a", "INTERNAL"), ("b", "OK")):
        counter.inc(labels)
    counter.remove_matching("model", "a")
    text = generate_latest(registry).decode()
    assert 'requests_total{code="OK",model="b"} 1.0' in text and 'model="a"' not in text
