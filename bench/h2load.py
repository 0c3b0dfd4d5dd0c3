"""h2load (Debian's nghttp2-client) as the gRPC load generator for closed loops on plaintext gRPC, where installed.

Why: the load generator shares the machine's two cores with the server it measures. bench.load's gRPC caller is the
official stub on grpc.aio, which costs ~30% of a core at ~800 calls/s and paces calls through its own event loop;
h2load, in C, costs 4-5%. Against the batching backend on the demo MLP, alternating runs in one backend process
(3 each): 1 row x 64 calls, 774-886 calls/s with bench.load against 899-1,475 with h2load; 8 rows x 32,
305-506 against 346-912. The rows measure the server, not the client.

How: the PredictRequest is written once as a gRPC message (a flag byte, a 4-byte length, the bytes) and POSTed over
one HTTP/2 connection per channel, `concurrency / channels` streams on each; a warm-up run comes first and is
dropped. Latencies come from h2load's per-request log into the histogram bench.load uses, so the summary has
bench.load's keys (`generator` says which made it), and the CPU is h2load's own, from the kernel's account of it.

h2load knows HTTP statuses, not gRPC's, which come in trailers: a failed call is an HTTP 200 with no response
message. So the official client makes one call first, and its response's size is what every successful call
returns (the same request, the same answer); the data h2load received over that size is the count of calls that
answered, and the rest are errors. Their latencies stay among the samples (the log cannot tell them apart), but any
error fails the run as it does with bench.load.
"""

from __future__ import annotations

import math
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.histogram import Histogram
from bench.latency import RequestFailed, latency_us
from bench.load import Load, run_load
from bench.progress import Progress
from bench.rest_client import loopback_address
from bench.targets import GRPC_SCHEMES, GrpcTarget, Target

H2LOAD_MISSING = "h2load not installed: apt-get install nghttp2-client"
_INACTIVITY_TIMEOUT_S = 10  # a connection that gets nothing for this long is dropped: a hung server ends the run
_PATH = "/tensorflow.serving.PredictionService/Predict"
_NOT_OK = "gRPC status not OK (no response message)"


def h2load_path() -> str | None:
    return shutil.which("h2load")


def run_grpc_load(target: Target, load: Load, label: str, h2load: str | None) -> dict[str, Any]:
    """With h2load (its path), a closed loop on plaintext gRPC runs on it; anything else on bench.load, as does a
    request the server refuses (bench.load then reports its errors by status code)."""
    if h2load is not None and isinstance(target, GrpcTarget) and target.url.startswith("grpc:") and load.rate is None:
        answer_bytes = _answer_bytes(target)
        if answer_bytes is not None:
            return run_h2load(h2load, target, load, label, answer_bytes)
    return {**run_load(target, load, label), "generator": "bench.load"}


def _answer_bytes(target: GrpcTarget) -> int | None:
    """The size on the wire of the answer the official client gets to the target's request; None if refused."""
    from bench.grpc_client import PredictClient  # TensorFlow, only when gRPC is used

    client = PredictClient(loopback_address(target.url, GRPC_SCHEMES)[1], target.request)
    try:
        return len(_framed(client.predict().SerializeToString()))
    except RequestFailed:
        return None
    finally:
        client.close()


def run_h2load(h2load: str, target: GrpcTarget, load: Load, label: str, answer_bytes: int) -> dict[str, Any]:
    """A warm-up run, then the measured one; the measured run's summary. `answer_bytes`: the size of one framed
    successful response (see _answer_bytes)."""
    host, port = loopback_address(target.url, GRPC_SCHEMES)
    request = _framed(target.request.SerializeToString())
    channels = min(target.channels, load.concurrency)
    with tempfile.TemporaryDirectory(prefix="tfgate-h2load-") as workdir:
        body, log = Path(workdir) / "request", Path(workdir) / "requests.log"
        body.write_bytes(request)
        command = [h2load, f"-c{channels}", f"-m{math.ceil(load.concurrency / channels)}", "-d", str(body),
                   "-H", "content-type: application/grpc", "-H", "te: trailers",
                   f"--connection-inactivity-timeout={_INACTIVITY_TIMEOUT_S}", f"http://{host}:{port}{_PATH}"]
        if load.warmup_s > 0:
            _run(command, load.warmup_s, None, Progress(f"{label} warm-up", load.warmup_s))
        report, cpu_s = _run(command, load.seconds, log, Progress(label, load.seconds))
        histogram = Histogram()
        for line in log.read_text().splitlines():
            histogram.record(int(line.split("\t")[2]) * 1000)  # start time, HTTP status, duration in µs
    answered = min(report["data_bytes"] // answer_bytes, report["succeeded"])
    kinds = {_NOT_OK: report["succeeded"] - answered, "HTTP/2 request failed": report["done"] - report["succeeded"]}
    kinds = {kind: count for kind, count in kinds.items() if count}
    rate = answered / load.seconds
    return {"mode": "closed", "concurrency": load.concurrency, "rate": None, "rows_per_request": target.rows,
            "count": answered, "errors": sum(kinds.values()), "error_kinds": kinds,
            "first_error": next(iter(kinds), None), "elapsed_s": load.seconds, "requests_per_s": rate,
            "latency_us": latency_us(histogram), "generator_cpu": cpu_s / load.seconds, "connections": channels,
            "rows_per_s": rate * target.rows, "generator": "h2load"}


def _framed(message: bytes) -> bytes:
    """A gRPC message on the wire: not compressed (0), its length (4 bytes, big-endian), the message."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def _run(command: list[str], seconds: float, log: Path | None, progress: Progress) -> tuple[dict[str, int], float]:
    """One timed h2load run: its counts (requests done and succeeded, DATA bytes received) and its CPU seconds."""
    timed = [*command[:1], f"--duration={max(1, round(seconds * 1000))}ms",
             *([f"--log-file={log}"] if log is not None else []), *command[1:]]
    cpu_before, started = _reaped_children_cpu_s(), time.monotonic()
    with subprocess.Popen(timed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        while True:
            try:
                out, err = process.communicate(timeout=progress.interval_ns / 1e9)
                break
            except subprocess.TimeoutExpired:
                progress.update(min(time.monotonic() - started, seconds), 0, 0)
    cpu_s = _reaped_children_cpu_s() - cpu_before
    report = _parse_report(out)
    if process.returncode != 0 or report is None:
        raise RuntimeError(f"h2load failed (exit status {process.returncode}): {(err or out).strip()[-500:]}")
    progress.done(seconds, report["done"], report["done"] - report["succeeded"])
    return report, cpu_s


def _parse_report(out: str) -> dict[str, int] | None:
    """From h2load's summary: "requests: N total, N started, D done, S succeeded, ..." and "traffic: ... , X (B)
    data"; None when either line is missing."""
    counts: dict[str, int] = {}
    for line in out.splitlines():
        if line.startswith("requests:"):
            for part in line.removeprefix("requests:").split(","):
                number, _, name = part.strip().partition(" ")
                counts[name] = int(number)
        elif line.startswith("traffic:"):
            counts["data_bytes"] = int(line.rpartition("(")[2].partition(")")[0])
    if not {"done", "succeeded", "data_bytes"} <= counts.keys():
        return None
    return counts


def _reaped_children_cpu_s() -> float:
    """User + system CPU of this process's reaped children (so not the servers it started and still runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
