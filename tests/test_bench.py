"""The benchmarks run end to end: a real backend subprocess, real requests, results on disk. Timings are never
asserted (they depend on the machine); only that every loop ran, nothing failed and the report is complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.backend_process import REPO


def run_bench(scenario: str, out: Path, seconds: str) -> tuple[str, dict]:
    """Run one benchmark as a user would; return what it printed and the report it wrote."""
    finished = subprocess.run(
        [sys.executable, "-m", "bench", scenario, "--seconds", seconds, "--warmup", "0.1", "--out", str(out)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout, json.loads(out.read_text())


def test_rest_latency_runs_all_three_loops_without_errors(demo_models: Path, tmp_path: Path) -> None:
    printed, report = run_bench("rest-latency", tmp_path / "rest-latency.json", "1")
    assert set(report["results"]) == {"rest", "in_process", "in_process_json"}
    for name, result in report["results"].items():
        assert result["count"] > 0, name
        assert result["errors"] == 0, (name, result["first_error"])
        assert set(result["latency_us"]) == {"p50", "p90", "p99"}
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
            assert set(result["latency_us"]) == {"p50", "p90", "p99"}
        assert entry["results"]["rest"]["connections"] == 1
        assert set(entry["ratios"]) == {"grpc_over_rest_requests_per_s", "grpc_over_rest_p50"}
    assert report["cases"]["mlp_32"]["input_shape"] == [32, 784]
    assert "gRPC/REST, mlp v1, 32 rows" in printed
