"""Backend metrics read back from their registry, linted by promtool, and the monitoring config that turns them on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from backend.metrics import BackendMetrics
from backend.monitoring_config import (
    DEFAULT_PROMETHEUS_PATH,
    MonitoringConfigError,
    PrometheusSettings,
    parse_monitoring_config,
    read_monitoring_config,
)

MODEL = "half_plus_two"
V1, V2 = f"/models/{MODEL}/1", f"/models/{MODEL}/2"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> BackendMetrics:
    """A backend that served a few requests, loaded v1, failed v2 once, and has a second model."""
    metrics = BackendMetrics(registry)
    metrics.set_available_versions(MODEL, 1)  # the models are configured before requests name them
    metrics.set_available_versions("other", 1)
    metrics.observe_request(model=MODEL, version=1, api="predict", entrypoint="REST", code="OK", seconds=0.004)
    metrics.observe_request(model=MODEL, version=1, api="predict", entrypoint="REST", code="OK", seconds=0.006)
    metrics.observe_request(model=MODEL, version=None, api="classify", entrypoint="GRPC", code="INVALID_ARGUMENT",
                            seconds=0.001)
    metrics.observe_request(model="", version=None, api="get_model_status", entrypoint="REST", code="NOT_FOUND",
                            seconds=0.0002)
    metrics.observe_request(model="other", version=7, api="regress", entrypoint="GRPC", code="OK", seconds=0.002)
    metrics.observe_load(model=MODEL, version=1, path=V1, seconds=1.5, ok=True)
    metrics.observe_load(model=MODEL, version=2, path=V2, seconds=0.25, ok=False)
    metrics.observe_load(model="other", version=7, path="/models/other/7", seconds=0.5, ok=True)
    metrics.observe_warmup(path=V1, seconds=0.3)
    return metrics


def test_a_model_the_config_does_not_name_is_counted_without_its_name(registry: CollectorRegistry,
                                                                      metrics: BackendMetrics) -> None:
    """Made-up names (typos, or a flood of them) share one series instead of making one each; a model removed
    from the config is counted the same from then on."""
    for made_up in ("nope", 'evil"\nname', "x" * 1000):
        metrics.observe_request(model=made_up, version=None, api="predict", entrypoint="REST", code="NOT_FOUND",
                                seconds=0.0001)
    metrics.forget_model("other")
    metrics.observe_request(model="other", version=None, api="predict", entrypoint="GRPC", code="NOT_FOUND",
                            seconds=0.0001)
    samples = [sample for family in registry.collect() if family.name == "tfgate_backend_requests"
               for sample in family.samples if sample.name.endswith("_total")]
    assert {sample.labels["model"] for sample in samples} == {MODEL, ""}
    assert registry.get_sample_value("tfgate_backend_requests_total", {
        "model": "", "version": "", "api": "predict", "entrypoint": "REST", "code": "NOT_FOUND"}) == 3
    assert registry.get_sample_value("tensorflow_serving_request_count_total",
                                     {"model_name": "", "status": "NOT_FOUND"}) == 4


def test_requests_count_by_model_version_api_entrypoint_and_code(registry: CollectorRegistry,
                                                                 metrics: BackendMetrics) -> None:
    def requests(**labels: str) -> float | None:
        return registry.get_sample_value("tfgate_backend_requests_total", labels)

    assert requests(model=MODEL, version="1", api="predict", entrypoint="REST", code="OK") == 2
    assert requests(model=MODEL, version="", api="classify", entrypoint="GRPC", code="INVALID_ARGUMENT") == 1
    assert requests(model="", version="", api="get_model_status", entrypoint="REST", code="NOT_FOUND") == 1
    duration = {"model": MODEL, "api": "predict", "entrypoint": "REST"}
    assert registry.get_sample_value("tfgate_backend_request_duration_seconds_count", duration) == 2
    assert registry.get_sample_value("tfgate_backend_request_duration_seconds_sum", duration) == pytest.approx(0.01)


def test_tf_serving_request_metrics_keep_its_labels_units_and_scope(registry: CollectorRegistry,
                                                                    metrics: BackendMetrics) -> None:
    def count(status: str, model: str = MODEL) -> float | None:
        return registry.get_sample_value("tensorflow_serving_request_count_total",
                                         {"model_name": model, "status": status})

    assert (count("OK"), count("INVALID_ARGUMENT"), count("NOT_FOUND", model="")) == (2, 1, None)
    latency = {"model_name": MODEL, "API": "Predict", "entrypoint": "REST"}
    assert registry.get_sample_value("tensorflow_serving_request_latency_count", latency) == 2
    assert registry.get_sample_value("tensorflow_serving_request_latency_sum", latency) == pytest.approx(10_000)
    assert registry.get_sample_value("tensorflow_serving_request_latency_count",
                                     {"model_name": MODEL, "API": "Classify", "entrypoint": "GRPC"}) is None
    assert registry.get_sample_value("tensorflow_serving_request_latency_bucket",
                                     {**latency, "le": "10.0"}) == 0  # TF Serving's first bucket: 10 µs


def test_loads_and_warmups(registry: CollectorRegistry, metrics: BackendMetrics) -> None:
    def attempts(path: str, status: str) -> float | None:
        return registry.get_sample_value("tensorflow_cc_saved_model_load_attempt_count_total",
                                         {"model_path": path, "status": status})

    assert (attempts(V1, "success"), attempts(V2, "fail"), attempts(V2, "success")) == (1, 1, None)
    assert registry.get_sample_value("tensorflow_cc_saved_model_load_latency_total",
                                     {"model_path": V1}) == pytest.approx(1_500_000)
    assert registry.get_sample_value("tensorflow_cc_saved_model_load_latency_total", {"model_path": V2}) is None
    assert registry.get_sample_value("tensorflow_serving_model_warmup_latency_sum",
                                     {"model_path": V1, "status": "OK"}) == pytest.approx(300_000)
    assert registry.get_sample_value("tfgate_backend_model_load_duration_seconds_sum", {"model": MODEL}) == 1.5
    assert registry.get_sample_value("tfgate_backend_model_load_failures_total", {"model": MODEL}) == 1
    assert registry.get_sample_value("tfgate_backend_model_versions_available", {"model": MODEL}) == 1


def test_in_flight_goes_back_down_even_on_error(registry: CollectorRegistry, metrics: BackendMetrics) -> None:
    def in_flight(entrypoint: str) -> float | None:
        return registry.get_sample_value("tfgate_backend_in_flight_requests", {"entrypoint": entrypoint})

    assert (in_flight("REST"), in_flight("GRPC")) == (0, 0)  # exported before the first request
    with metrics.in_flight("REST"), metrics.in_flight("REST"), metrics.in_flight("GRPC"):
        assert (in_flight("REST"), in_flight("GRPC")) == (2, 1)
    with pytest.raises(RuntimeError), metrics.in_flight("GRPC"):
        raise RuntimeError("handler failed")
    assert (in_flight("REST"), in_flight("GRPC")) == (0, 0)


def test_forget_model_drops_its_series_and_keeps_the_others(registry: CollectorRegistry,
                                                            metrics: BackendMetrics) -> None:
    metrics.forget_model(MODEL)
    body = metrics.exposition()[0].decode()
    assert f'"{MODEL}"' not in body and f'"{V1}"' not in body and f'"{V2}"' not in body
    assert registry.get_sample_value("tfgate_backend_model_versions_available", {"model": "other"}) == 1
    assert registry.get_sample_value("tensorflow_cc_saved_model_load_attempt_count_total",
                                     {"model_path": "/models/other/7", "status": "success"}) == 1
    metrics.forget_model("never-configured")


def test_each_instance_owns_its_registry_and_exposes_no_created_samples(registry: CollectorRegistry,
                                                                        metrics: BackendMetrics) -> None:
    BackendMetrics()
    BackendMetrics()  # two defaults: two fresh registries, nothing on the global one
    assert not [family for family in REGISTRY.collect() if family.name.startswith(("tfgate_", "tensorflow_"))]
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        BackendMetrics(registry)
    body, content_type = metrics.exposition()
    assert b"_created" not in body
    assert content_type.startswith("text/plain; version=")


def _promtool() -> str:
    """promtool's path; CI installs it, so there its absence fails instead of skipping."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (Debian package prometheus); .ci/run should install it")
        pytest.skip("promtool is not installed (apt-get install --no-install-recommends prometheus)")
    return promtool


@pytest.mark.parametrize("populated", [True, False], ids=["populated", "fresh"])
def test_exposition_passes_promtool(populated: bool, request: pytest.FixtureRequest) -> None:
    promtool = _promtool()
    metrics: BackendMetrics = request.getfixturevalue("metrics") if populated else BackendMetrics()
    body, _ = metrics.exposition()
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


@pytest.mark.parametrize("text, expected", [
    ('prometheus_config { enable: true path: "/models/metrics" }', PrometheusSettings(True, "/models/metrics")),
    ("prometheus_config { enable: true }", PrometheusSettings(True, DEFAULT_PROMETHEUS_PATH)),
    ('prometheus_config { enable: true, path: "" }', PrometheusSettings(True, DEFAULT_PROMETHEUS_PATH)),
    ('prometheus_config { enable: false path: "ignored" }', PrometheusSettings(False, DEFAULT_PROMETHEUS_PATH)),
    ("", PrometheusSettings(False, DEFAULT_PROMETHEUS_PATH)),
])
def test_monitoring_config(text: str, expected: PrometheusSettings) -> None:
    assert parse_monitoring_config(text) == expected


@pytest.mark.parametrize("text, message", [
    ('prometheus_config { enable: true path: "metrics" }', "must start with '/'"),
    ("prometheus_config { enable: yes }", "Expected \"true\" or \"false\""),
    ("prometheus_config { port: 9090 }", "no field named \"port\""),
    ("prometheus_config { enable: true", "Expected \"}\""),
])
def test_bad_monitoring_configs_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(MonitoringConfigError, match=message):
        parse_monitoring_config(text)


def test_monitoring_config_file(tmp_path: Path) -> None:
    path = tmp_path / "monitoring.config"
    path.write_text("prometheus_config {\n  enable: true\n  path: /metrics\n}\n")
    with pytest.raises(MonitoringConfigError, match=f"^{re.escape(str(path))}: 3:9 "):  # the file and line at fault
        read_monitoring_config(path)
    path.write_text('prometheus_config {\n  enable: true\n  path: "/metrics"\n}\n')
    assert read_monitoring_config(path) == PrometheusSettings(True, "/metrics")
    with pytest.raises(MonitoringConfigError, match="cannot read monitoring config file .*absent"):
        read_monitoring_config(tmp_path / "absent")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(MonitoringConfigError, match="is not UTF-8 text"):
        read_monitoring_config(path)
