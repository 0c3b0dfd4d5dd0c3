"""The backend's Prometheus metrics, declared here and nowhere else, on a registry passed in (tests read it back).

Two sets of names:
- TF Serving's own, so its dashboards carry over: the same label names and values, units (microseconds), buckets
  and meaning. Their exact names, such as `:tensorflow:serving:request_count`, cannot pass `promtool check
  metrics`: colons are reserved for recording rules, and a counter must end in `_total`. So each one is exposed
  under one mechanical rename: the leading colon goes, the other colons become underscores, and a counter gains
  `_total` (`:tensorflow:cc:saved_model:load_attempt_count` is `tensorflow_cc_saved_model_load_attempt_count_total`).
  A dashboard needs that rename, or one `metric_relabel_configs` rule per metric on the scrape, and nothing else.
  As in TF Serving, `request_count` and `request_latency` count predict, classify and regress only, and
  `request_latency` and `load_latency` successful calls only; the label `model_path` is a version's directory.
  Unlike TF Serving, which records gRPC calls only, REST calls count too (`entrypoint="REST"`).
- tfgate's own, `tfgate_backend_*`, in base units, with what TF Serving lacks: every API and outcome, the version
  that served, requests in flight, load failures and the versions available.

prometheus-client adds a `_created` sample to every counter and histogram series, and can turn that off only for
the whole process. In the text format each is one more gauge series that nothing reads (TF Serving has none), so
the metrics live on a private registry that is exposed through the caller's without them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from backend.loop_metrics import GaugeCount, Labels, LoopCounter, LoopGauge, LoopHistogram, LoopMetrics

ENTRYPOINTS = ("REST", "GRPC")

# The APIs TF Serving's request metrics cover, and the label value it gives each.
_TF_SERVING_APIS = {"predict": "Predict", "classify": "Classify", "regress": "Regress"}
# TF's Buckets::Exponential(10, 1.8, 33) in microseconds (10 µs to ~24 minutes), rounded to the six significant
# digits TF Serving prints, so `le` reads as in its exposition ("58.32", "1.27482e+06"; only whole numbers gain
# a ".0").
_TF_SERVING_MICROS_BUCKETS = tuple(float(f"{10 * 1.8 ** i:.6g}") for i in range(33))
_REQUEST_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LOAD_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BATCH_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_MICROS_PER_SECOND = 1e6


class BackendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._registry = CollectorRegistry() if registry is None else registry
        own = CollectorRegistry()
        # The request path's metrics: lock-free, on the event loop thread (backend/loop_metrics.py).
        self._tf_request_count = LoopCounter(
            "tensorflow_serving_request_count", "TF Serving's :tensorflow:serving:request_count: requests "
            "to predict, classify and regress, by gRPC status code name.", ["model_name", "status"])
        self._tf_request_latency = LoopHistogram(
            "tensorflow_serving_request_latency", "TF Serving's :tensorflow:serving:request_latency: wall time in "
            "microseconds of successful predict, classify and regress requests.",
            ["model_name", "API", "entrypoint"], _TF_SERVING_MICROS_BUCKETS)
        self._requests = LoopCounter(
            "tfgate_backend_requests", "Requests by model, version served (empty when none was), API, "
            "entrypoint and gRPC status code name.", ["model", "version", "api", "entrypoint", "code"])
        self._request_seconds = LoopHistogram(
            "tfgate_backend_request_duration_seconds", "Time to answer a request, whatever its outcome.",
            ["model", "api", "entrypoint"], _REQUEST_SECONDS_BUCKETS)
        self._in_flight = LoopGauge("tfgate_backend_in_flight_requests", "Requests being served now.", ["entrypoint"])
        self._batch_rows = LoopHistogram(
            "tfgate_backend_batch_size_rows", "Rows of real requests in each batch run (padding excluded).",
            ["model"], _BATCH_ROWS_BUCKETS)
        self._batch_padding = LoopCounter(
            "tfgate_backend_batch_padding_rows", "Rows added to batches to reach an allowed batch size.", ["model"])
        self._batch_queue_seconds = LoopHistogram(
            "tfgate_backend_batch_queue_seconds", "Time a request waited in its batching queue.",
            ["model"], _BATCH_SECONDS_BUCKETS)
        self._batch_run_seconds = LoopHistogram(
            "tfgate_backend_batch_run_seconds", "Time each batch took on its batch thread: merging the requests, "
            "the TensorFlow run (padding included) and splitting the outputs.", ["model"], _BATCH_SECONDS_BUCKETS)
        own.register(LoopMetrics(self._tf_request_count, self._tf_request_latency, self._requests,
                                 self._request_seconds, self._in_flight, self._batch_rows, self._batch_padding,
                                 self._batch_queue_seconds, self._batch_run_seconds))
        # Updated from executor threads (loads): prometheus-client's locked metrics.
        self._tf_load_attempts = Counter(
            "tensorflow_cc_saved_model_load_attempt_count_total", "TF's :tensorflow:cc:saved_model:load_attempt_count: "
            "attempts to load a SavedModel version, by outcome (success or fail).",
            ["model_path", "status"], registry=own)
        self._tf_load_latency = Counter(
            "tensorflow_cc_saved_model_load_latency_total", "TF's :tensorflow:cc:saved_model:load_latency: "
            "microseconds spent in successful loads of a SavedModel version.",
            ["model_path"], registry=own)
        self._tf_warmup_latency = Histogram(
            "tensorflow_serving_model_warmup_latency", "TF Serving's :tensorflow:serving:model_warmup_latency: "
            "wall time in microseconds of replaying a version's warm-up requests.",
            ["model_path", "status"], buckets=_TF_SERVING_MICROS_BUCKETS, registry=own)
        self._load_seconds = Histogram(
            "tfgate_backend_model_load_duration_seconds", "Time to load a model version, warm-up included, of "
            "loads that succeeded.", ["model"], buckets=_LOAD_SECONDS_BUCKETS, registry=own)
        self._load_failures = Counter(
            "tfgate_backend_model_load_failures_total", "Attempts to load a model version that failed.",
            ["model"], registry=own)
        self._versions_available = Gauge(
            "tfgate_backend_model_versions_available", "Versions of a model that serve requests now.",
            ["model"], registry=own)
        self._registry.register(_WithoutCreated(own))

        self._by_model = ((self._load_seconds, "model"), (self._load_failures, "model"),
                          (self._versions_available, "model"))
        self._loop_by_model = ((self._requests, "model"), (self._request_seconds, "model"),
                               (self._batch_rows, "model"), (self._batch_padding, "model"),
                               (self._batch_queue_seconds, "model"), (self._batch_run_seconds, "model"),
                               (self._tf_request_count, "model_name"),
                               (self._tf_request_latency, "model_name"))
        self._by_path = (self._tf_load_attempts, self._tf_load_latency, self._tf_warmup_latency)
        self._paths: dict[str, set[str]] = {}  # model -> version directories seen, for forget_model
        self._paths_lock = threading.Lock()  # loads are observed on executor threads
        self._request_labels: dict[tuple[str, int | None, str, str, str], _RequestLabels] = {}
        # Models the config names: the only names a request's series carry. A name a client made up is "", or a
        # flood of made-up names would make a series each, without bound, in memory and in every scrape.
        self._configured: set[str] = set()
        self._in_flight_counts = {entrypoint: GaugeCount(self._in_flight, (entrypoint,)) for entrypoint in ENTRYPOINTS}
        for entrypoint in ENTRYPOINTS:  # exported at 0 from the start: alerts see 0, not no data
            self._in_flight.set((entrypoint,), 0)

    def observe_request(self, *, model: str, version: int | None, api: str, entrypoint: str, code: str,
                        seconds: float) -> None:
        """One finished request. `api` is predict, classify, regress, multi_inference, get_model_metadata or
        get_model_status; `entrypoint` one of ENTRYPOINTS; `code` a gRPC status code name ("OK", "NOT_FOUND", ...);
        `model` "" when the request named none, or one the config does not (see set_available_versions).
        """
        if model not in self._configured:
            model = ""
        key = (model, version, api, entrypoint, code)
        labels = self._request_labels.get(key)
        if labels is None:
            labels = self._request_labels[key] = _request_labels(*key)
        self._requests.inc(labels.requests)
        self._request_seconds.observe(labels.duration, seconds)
        if labels.tf_count is not None:
            self._tf_request_count.inc(labels.tf_count)
        if labels.tf_latency is not None:
            self._tf_request_latency.observe(labels.tf_latency, seconds * _MICROS_PER_SECOND)

    def in_flight(self, entrypoint: str) -> GaugeCount:
        """`with metrics.in_flight(entrypoint):` counts a request as in flight until the block exits, however it
        exits."""
        return self._in_flight_counts[entrypoint]

    def observe_load(self, *, model: str, version: int, path: str, seconds: float, ok: bool) -> None:
        """One attempt to load `version` of `model` from `path`, its directory; a retry is another attempt."""
        with self._paths_lock:
            self._paths.setdefault(model, set()).add(path)
        self._tf_load_attempts.labels(path, "success" if ok else "fail").inc()
        if ok:
            self._tf_load_latency.labels(path).inc(seconds * _MICROS_PER_SECOND)
            self._load_seconds.labels(model).observe(seconds)
        else:
            self._load_failures.labels(model).inc()

    def observe_warmup(self, *, path: str, seconds: float) -> None:
        """A warm-up that completed; one that fails fails its load, which observe_load counts."""
        self._tf_warmup_latency.labels(path, "OK").observe(seconds * _MICROS_PER_SECOND)

    def observe_batch(self, *, model: str, rows: int, padded_rows: int, queue_seconds: Sequence[float],
                      run_seconds: float) -> None:
        """One batch run: its real rows, its padded size, how long each of its requests waited, and how long it ran
        (queue time against run time is what batch_timeout_micros and max_batch_size trade)."""
        labels = (model,)
        self._batch_rows.observe(labels, rows)
        self._batch_run_seconds.observe(labels, run_seconds)
        if padded_rows > rows:
            self._batch_padding.inc(labels, padded_rows - rows)
        for seconds in queue_seconds:
            self._batch_queue_seconds.observe(labels, seconds)

    def set_available_versions(self, model: str, count: int) -> None:
        """Called for every configured model at each sync, so it also says which models are configured."""
        self._configured.add(model)
        self._versions_available.labels(model).set(count)

    def forget_model(self, model: str) -> None:
        """Stops exporting every series of a model that left the config, its versions' directories included."""
        self._configured.discard(model)
        for metric, label in self._by_model:
            metric.remove_by_labels({label: model})
        for family, label in self._loop_by_model:
            family.remove_matching(label, model)
        self._request_labels = {key: labels for key, labels in self._request_labels.items() if key[0] != model}
        with self._paths_lock:
            paths = self._paths.pop(model, set())
        for path in paths:
            for metric in self._by_path:
                metric.remove_by_labels({"model_path": path})

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus' text format, and the Content-Type to send it with."""
        return generate_latest(self._registry), CONTENT_TYPE_LATEST


@dataclass(frozen=True, slots=True)
class _RequestLabels:
    """The label tuples one kind of request updates, built once per kind."""

    requests: Labels
    duration: Labels
    tf_count: Labels | None  # None: not an API TF Serving counts
    tf_latency: Labels | None  # None: not counted, or not OK


def _request_labels(model: str, version: int | None, api: str, entrypoint: str, code: str) -> _RequestLabels:
    tf_api = _TF_SERVING_APIS.get(api)
    return _RequestLabels(requests=(model, "" if version is None else str(version), api, entrypoint, code),
                          duration=(model, api, entrypoint),
                          tf_count=None if tf_api is None else (model, code),
                          tf_latency=None if tf_api is None or code != "OK" else (model, tf_api, entrypoint))


class _WithoutCreated:
    """A collector serving another registry's metrics without their `_created` samples."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():  # fresh objects on every collect, so trimming them is safe
            family.samples = [sample for sample in family.samples if sample.name != family.name + "_created"]
            yield family

    describe = collect  # the caller's registry then refuses a second BackendMetrics (duplicate names)
