"""The benchmarks run end to end: a real backend subprocess, real requests, results on disk. Timings are never
asserted (they depend on the machine); only that every loop ran, nothing failed and the report is complete. The
histogram and the HTTP response parser are plain code, tested directly."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.backend_process import REPO, BackendProcess
from bench.h2load import h2load_path, run_grpc_load
from bench.histogram import SUB_BUCKET_BITS, Histogram, bucket_bounds, bucket_index
from bench.http_connection import parse_head
from bench.latency import RequestFailed
from bench.load import Load
from bench.targets import grpc_predict, seeded_rows
from bench.wakeup import cold_pass_ratio, thread_wakeup_us

PERCENTILE_KEYS = {"p50", "p90", "p99", "p99.9"}


def run_bench(scenario: str, out: Path, seconds: str, *args: str, warmup: str = "0.1") -> tuple[str, dict]:
    """Run one benchmark as a user would; return what it printed and the report it wrote."""
    finished = subprocess.run(
        [sys.executable, "-m", "bench", scenario, "--seconds", seconds, "--warmup", warmup, "--out", str(out), *args],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout, json.loads(out.read_text())


def assert_wakeup_reported(printed: str, report: dict) -> None:
    """The latency benchmarks print and keep what a thread pays on the machine for having slept (bench/wakeup.py)."""
    figures = report["environment"]["thread_wakeup_us"]
    assert 0 < figures["p50"] <= figures["p90"] <= figures["p99"] and report["environment"]["cold_pass_ratio"] > 0
    assert "machine: a thread woken after 2 ms asleep answers in p50 " in printed
    assert "; a pass over 8 MB after 3 ms asleep takes " in printed


def test_the_machine_probes_leave_no_thread_or_descriptor_behind() -> None:
    threads, descriptors = threading.active_count(), len(os.listdir("/proc/self/fd"))
    figures = thread_wakeup_us(samples=20)
    assert set(figures) == {"p50", "p90", "p99"} and 0 < figures["p50"] <= figures["p90"] <= figures["p99"]
    assert cold_pass_ratio(samples=5) > 0
    assert (threading.active_count(), len(os.listdir("/proc/self/fd"))) == (threads, descriptors)


@pytest.mark.parametrize("value", [0, 1, 255, 256, 257, 511, 512, 1000, 123_456, 10**9, 2**40 + 12345, 2**63])
def test_every_value_lands_in_a_bucket_that_contains_it_and_is_under_one_percent_wide(value: int) -> None:
    low, high = bucket_bounds(bucket_index(value))
    assert low <= value <= high
    assert high - low <= max(value, 1) * 2 ** (1 - SUB_BUCKET_BITS)


def test_buckets_are_contiguous_and_ordered() -> None:
    previous_high = -1
    for index in range(20 * 2 ** SUB_BUCKET_BITS):
        low, high = bucket_bounds(index)
        assert low == previous_high + 1 and high >= low
        previous_high = high


def test_percentiles_are_within_the_bucket_error_of_the_exact_ones() -> None:
    rng = random.Random(7)
    samples = [int(rng.lognormvariate(14, 1.2)) for _ in range(20_000)]  # ~1 ms median, long tail, in ns
    histogram = Histogram()
    for sample in samples:
        histogram.record(sample)
    ordered = sorted(samples)
    for percent in (50, 90, 99, 99.9):
        exact = ordered[max(1, math.ceil(percent / 100 * len(ordered))) - 1]
        assert histogram.percentile(percent) == pytest.approx(exact, rel=2 ** -SUB_BUCKET_BITS)
    assert histogram.percentile(100) == max(samples) and histogram.count == len(samples)


def test_an_empty_histogram_has_no_percentiles_and_small_values_are_exact() -> None:
    histogram = Histogram()
    assert histogram.percentile(50) is None
    for value in (3, 5, 7, -2):
        histogram.record(value)
    assert [histogram.percentile(p) for p in (25, 50, 75, 100)] == [0, 3, 5, 7]


@pytest.mark.parametrize("head, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n", (200, 12, False)),
    (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nConnection: close\r\n\r\n", (404, 0, True)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", (200, 3, True)),
])
def test_a_response_head_gives_status_length_and_whether_the_server_closes(head: bytes, expected: tuple) -> None:
    assert parse_head(head) == expected


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\n\r\n", b"garbage\r\n\r\n"])
def test_a_response_the_generator_cannot_read_by_length_is_a_failure(head: bytes) -> None:
    with pytest.raises(RequestFailed):
        parse_head(head)


def test_rest_latency_runs_all_three_loops_without_errors(demo_models: Path, tmp_path: Path) -> None:
    printed, report = run_bench("rest-latency", tmp_path / "rest-latency.json", "1")
    assert set(report["results"]) == {"rest", "in_process", "in_process_json"}
    for name, result in report["results"].items():
        assert result["count"] > 0, name
        assert result["errors"] == 0, (name, result["first_error"])
        assert set(result["latency_us"]) == PERCENTILE_KEYS
    assert report["results"]["rest"]["connections"] == 1  # one keep-alive connection for the whole run
    assert set(report["ratios"]) == {"rest_over_in_process", "rest_over_in_process_json"}
    assert "(a)/(b)" in printed


def test_grpc_vs_rest_runs_every_case_on_both_protocols_without_errors(demo_models: Path, tmp_path: Path) -> None:
    printed, report = run_bench("grpc-vs-rest", tmp_path / "grpc-vs-rest.json", "0.5")
    assert set(report["cases"]) == {"half_plus_two", "mlp_1", "mlp_32"}
    for case, entry in report["cases"].items():
        assert set(entry["results"]) == {"rest", "grpc"}, case
        for protocol, result in entry["results"].items():
            assert result["count"] > 0, (case, protocol)
            assert result["errors"] == 0, (case, protocol, result["first_error"])
            assert set(result["latency_us"]) == PERCENTILE_KEYS
        assert entry["results"]["rest"]["connections"] == 1
        assert set(entry["ratios"]) == {"grpc_over_rest_requests_per_s", "grpc_over_rest_p50"}
    assert report["cases"]["mlp_32"]["input_shape"] == [32, 784]
    assert "gRPC/REST, mlp v1, 32 rows" in printed


@pytest.fixture(scope="module")
def mlp_backend(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendProcess]:
    log = tmp_path_factory.mktemp("load") / "backend.log"
    with BackendProcess(["--model_name=mlp", f"--model_base_path={demo_models / 'mlp'}"], log) as backend:
        yield backend.wait_ready()


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_load_runs_a_closed_and_an_open_loop_without_errors(mlp_backend: BackendProcess, protocol: str,
                                                            tmp_path: Path) -> None:
    url = mlp_backend.url if protocol == "rest" else f"grpc://127.0.0.1:{mlp_backend.grpc_port}"
    out = tmp_path / "load.json"
    printed, report = run_bench("load", out, "0.5", "--url", url, "--model", "mlp", "--rows", "2",
                                "--concurrency", "3", "--rate", "40", "--max-in-flight", "4")
    assert report["target"]["protocol"] == ("REST" if protocol == "rest" else "gRPC")
    assert report["target"]["rows"] == 2
    closed, open_ = report["runs"]
    assert (closed["mode"], closed["concurrency"], open_["mode"], open_["rate"]) == ("closed", 3, "open", 40)
    for run in report["runs"]:
        assert run["count"] > 0 and run["errors"] == 0, run["first_error"]
        assert set(run["latency_us"]) == PERCENTILE_KEYS
        assert run["rows_per_s"] == 2 * run["requests_per_s"]
        assert 0 <= run["generator_cpu"]
    assert closed["connections"] == (3 if protocol == "rest" else 1)  # keep-alive held; gRPC: one channel
    assert set(open_["send_lag_us"]) == PERCENTILE_KEYS and "unsent" in open_
    assert out.with_suffix(".png").stat().st_size > 0
    assert "open loop, 40/s, at most 4 in flight" in printed


def test_load_drives_a_plain_get_path(mlp_backend: BackendProcess, tmp_path: Path) -> None:
    _, report = run_bench("load", tmp_path / "health.json", "0.3", "--url", mlp_backend.url,
                          "--path", "/v2/health/live", "--concurrency", "2")
    (run,) = report["runs"]
    assert report["target"]["method"] == "GET" and run["count"] > 0 and run["errors"] == 0


def test_backend_efficiency_quick_measures_every_part_or_says_why_not(demo_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "backend-efficiency.json"
    # No warm-up: the Keras baseline takes seconds to drain one, and timings are not checked here.
    printed, report = run_bench("backend-efficiency", out, "0.5", "--quick", warmup="0")
    keys = {(result["part"], result["key"]) for result in report["results"]}
    predicts = {"rest_1x64", "grpc_1x64"}
    assert {("a", "batch_1"), ("a", "batch_64"), ("d", "rest_1x64"), ("e", "health_0x64")} <= keys
    assert {("c", key) for key in predicts} <= keys
    if "b" in report["skipped"]:  # until the backend implements --enable_batching
        assert "does not support yet" in report["skipped"]["b"] and "(b) batching: skipped" in printed
        assert "f" in report["skipped"] and report["latency_target"] is None
    else:
        assert {("b", key) for key in predicts} | {("f", "rest_1_half_rate")} <= keys
        assert set(report["ratios"]["b_over_d_requests_per_s"]) == {"rest_1x64"}
        assert {"rate", "p99_us", "bound_us", "met"} <= set(report["latency_target"])  # met or not: a report
        assert "(f) latency target: p99" in printed
        assert report["latency_target"]["batch_after_idle"]["after_idle_us"] > 0
        assert "(f) on this machine an in-process batch of 8 rows takes p50" in printed
        assert len(report["rounds"]) == 3 and set(report["share_targets"]) == {"rest_1x64"}
        assert all(entry["errors"] == {"rest_1x64": 0, "rest_1_half_rate": 0} for entry in report["rounds"])
        assert len(report["latency_target"]["rounds_p99_us"]) == 3
        assert "judged on the median p99 of 3 interleaved rounds" in printed
        share = report["share_targets"]["rest_1x64"]
        assert len(share["rounds"]) == 3 and share["target"] == 0.25 and isinstance(share["met"], bool)
        assert "(b) REST, 1 row x 64: rows/s / ceiling, median of 3 interleaved rounds" in printed
    for result in report["results"]:
        assert result["count"] > 0 and result["errors"] == 0, (result["label"], result["first_error"])
        assert set(result["latency_us"]) == PERCENTILE_KEYS
    served = [result for result in report["results"] if result["part"] != "a"]
    assert all(0 <= result["host_steal"] <= 1 for result in served)  # Linux: /proc/stat tells
    assert report["ceiling"]["key"] in {"batch_1", "batch_64"}
    assert set(report["ratios"]["c_over_d_requests_per_s"]) == {"rest_1x64"}
    assert out.with_suffix(".png").stat().st_size > 0
    assert "vs (a)" in printed and "(c)/(d) requests/s" in printed
    assert_wakeup_reported(printed, report)
    grpc_rows = [result for result in served if result["key"].startswith("grpc")]
    assert grpc_rows and {result["generator"] for result in grpc_rows} == {"h2load" if h2load_path() else "bench.load"}


needs_h2load = pytest.mark.skipif(h2load_path() is None,
                                  reason="h2load is not installed (apt-get install nghttp2-client)")


@needs_h2load
def test_h2load_drives_grpc_predicts_and_counts_only_real_answers(mlp_backend: BackendProcess) -> None:
    target = grpc_predict(f"grpc://127.0.0.1:{mlp_backend.grpc_port}", "mlp", None, "x", seeded_rows(2, (784,)))
    result = run_grpc_load(target, Load(4, None, 0.5, 0.2), "h2load", h2load_path())
    assert result["generator"] == "h2load" and result["connections"] == 1
    assert result["count"] > 0 and result["errors"] == 0, result["error_kinds"]
    assert set(result["latency_us"]) == PERCENTILE_KEYS and result["latency_us"]["p50"] > 0
    assert result["rows_per_s"] == 2 * result["requests_per_s"] and 0 <= result["generator_cpu"]


@needs_h2load
def test_h2load_counts_calls_the_server_refuses_as_errors(demo_models: Path, tmp_path: Path) -> None:
    """gRPC's status comes in trailers, which h2load does not read: a refused call must still count as an error."""
    parameters = tmp_path / "batching.txt"
    parameters.write_text("max_batch_size { value: 1 }\nbatch_timeout_micros { value: 0 }\n"
                          "max_enqueued_batches { value: 1 }\nnum_batch_threads { value: 1 }\n")
    flags = ["--model_name=mlp", f"--model_base_path={demo_models / 'mlp'}", "--enable_batching",
             f"--batching_parameters_file={parameters}"]
    with BackendProcess(flags, tmp_path / "backend.log") as backend:
        target = grpc_predict(f"grpc://127.0.0.1:{backend.wait_ready().grpc_port}", "mlp", None, "x",
                              seeded_rows(1, (784,)))
        result = run_grpc_load(target, Load(32, None, 0.5, 0), "h2load, full queue", h2load_path())
    assert result["generator"] == "h2load"
    assert result["errors"] > 0 and set(result["error_kinds"]) == {"gRPC status not OK (no response message)"}


@needs_h2load
def test_a_request_the_server_refuses_outright_runs_on_bench_load_which_names_the_status(
        mlp_backend: BackendProcess) -> None:
    target = grpc_predict(f"grpc://127.0.0.1:{mlp_backend.grpc_port}", "no_such_model", None, "x",
                          seeded_rows(1, (784,)))
    result = run_grpc_load(target, Load(2, None, 0.3, 0), "unknown model", h2load_path())
    assert result["generator"] == "bench.load" and result["count"] == 0
    assert result["errors"] > 0 and set(result["error_kinds"]) == {"gRPC NOT_FOUND"}


@pytest.mark.parametrize("nginx", ["found", "missing"])
def test_gateway_overhead_measures_direct_gateway_and_nginx_or_says_why_not(demo_models: Path, tmp_path: Path,
                                                                           nginx: str) -> None:
    out = tmp_path / "gateway-overhead.json"
    # "missing" names an nginx that is not there, so the skip is tested also where nginx is installed.
    extra = ("--nginx", str(tmp_path / "no-nginx")) if nginx == "missing" else ()
    printed, report = run_bench("gateway-overhead", out, "0.5", "--rounds", "2", *extra)
    contenders = {result["contender"] for result in report["results"]}
    if "nginx" in report["skipped"]:  # nginx not installed here, or "missing"
        assert contenders == {"direct", "gateway", "gateway_auth", "gateway_2", "direct_grpc", "gateway_grpc"}
        assert report["targets"]["throughput"]["met"] is None and report["targets"]["grpc"]["gateway_over_nginx"] is None
        assert "(c) nginx, https: skipped: " in printed
    else:
        assert nginx == "found" and contenders == {"direct", "gateway", "gateway_auth", "gateway_2", "nginx",
                                                   "direct_grpc", "gateway_grpc", "nginx_grpc"}
        assert report["targets"]["grpc"]["gateway_over_nginx"] > 0
        assert report["nginx"]["version"] and report["targets"]["throughput"]["met"] in (True, False)
        assert report["nginx_access_log_lines"] > 0  # nginx logs each request, as the gateway does
    assert {result["key"] for result in report["results"]} == {f"{name}_{n}" for name in contenders for n in (1, 32)}
    for result in report["results"]:
        assert result["count"] > 0 and result["errors"] == 0, (result["label"], result["first_error"])
        assert set(result["latency_us"]) == PERCENTILE_KEYS
        # keep-alive held, through the proxies too; gRPC multiplexes every call on its one channel
        assert result["connections"] == (1 if result["contender"].endswith("grpc") else result["concurrency"])
        assert 0 <= result["host_steal"] <= 1
    schemes = {result["contender"]: result["url"].partition(":")[0] for result in report["results"]}
    assert schemes["direct"] == "http" and schemes["direct_grpc"] == "grpc" and schemes["gateway_grpc"] == "grpcs"
    assert {schemes[name] for name in contenders if not name.endswith("grpc") and name != "direct"} == {"https"}
    assert report["targets"]["grpc"]["gateway_over_direct"] > 0 and "gRPC at 32: gateway / direct = " in printed
    assert report["gateway_access_log_lines"] > 0  # the gateway really served, and logged
    assert {"ratio", "target", "met"} <= set(report["targets"]["throughput"])
    assert {"gateway_added_ms", "nginx_added_ms", "target_ms", "met"} <= set(report["targets"]["added_p50"])
    assert report["targets"]["added_p50"]["met"] in (True, False)
    # the targets' interleaved rounds (2 here): both loops on direct, the gateway and nginx (when found) in each
    interleaved = {"direct", "gateway"} | ({"nginx"} & contenders)
    assert [set(figures) for figures in report["rounds"]] == [{f"{name}_{n}" for name in interleaved
                                                               for n in (1, 32)}] * 2
    assert all(figure["errors"] == 0 and figure["requests_per_s"] > 0 for figures in report["rounds"]
               for figure in figures.values())
    added = report["targets"]["added_p50"]
    assert len(added["gateway_rounds_ms"]) == 2 and added["gateway_added_ms"] is not None
    assert len(report["targets"]["throughput"]["rounds"]) == 2
    assert out.with_suffix(".png").stat().st_size > 0
    assert "gateway throughput / nginx throughput at 32, median of 2 interleaved rounds = " in printed
    cpu = report["targets"]["proxy_cpu"]
    assert cpu["gateway_us"] > 0 and len(cpu["gateway_rounds_us"]) == 2 and "proxy CPU per request at 32, " in printed
    assert cpu["nginx_us"] > 0 if "nginx" in contenders else cpu["nginx_us"] is None
    assert "gateway added p50 at 1 connection = gateway p50 - direct p50, median of 2 interleaved rounds = " in printed
    assert report["targets"]["workers"]["two_over_one"] > 0 and "2 gateway workers / 1: throughput at 32 = " in printed
    assert report["targets"]["auth"]["throughput_ratio"] is not None  # (d): every request was authenticated
    assert "auth + rate limits on / off: throughput at 32 = " in printed
    assert_wakeup_reported(printed, report)


def test_degraded_backend_runs_capacity_then_each_balancer_and_nginx_or_says_why_not(demo_models: Path,
                                                                                     tmp_path: Path) -> None:
    out = tmp_path / "degraded-backend.json"
    printed, report = run_bench("degraded-backend", out, "0.5")
    contenders = [result["contender"] for result in report["results"]]
    if "nginx" in report["skipped"]:
        assert contenders == ["capacity", "least_latency", "round_robin"] and report["target"]["met"] is None
        assert "nginx not installed" in report["skipped"]["nginx"]
    else:
        assert contenders == ["capacity", "least_latency", "round_robin", "nginx"]
        assert report["target"]["met"] in (True, False)
    capacity, *open_loops = report["results"]
    assert (capacity["mode"], capacity["concurrency"]) == ("closed", 32)
    assert report["rate"] == max(1, round(0.4 * capacity["requests_per_s"]))
    for result in open_loops:
        assert (result["mode"], result["rate"], result["concurrency"]) == ("open", report["rate"], 64)
    for result in report["results"]:
        assert result["count"] > 0 and result["errors"] == 0, (result["label"], result["first_error"])
        assert set(result["latency_us"]) == PERCENTILE_KEYS and 0 <= result["host_steal"] <= 1
    assert report["delays_ms"] == [20, 0] and report["slow_backend"] == report["backends"][0]
    for result in report["results"][:3]:  # through the gateway: what its admin API said
        assert result["balancer"] == ("round_robin" if result["contender"] == "capacity" else result["contender"])
        assert set(result["upstream_requests"]) == set(report["backends"]) == set(result["upstream_ewma_ms"])
        assert sum(result["upstream_requests"].values()) >= result["count"] and 0 <= result["slow_share"] <= 1
    assert {"ratio", "bound", "met", "least_latency_p99_us", "nginx_p99_us"} <= set(report["target"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert "least_latency p99 / nginx p99 = " in printed
    assert_wakeup_reported(printed, report)
