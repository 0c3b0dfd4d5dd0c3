"""`backend-efficiency`: how much of TensorFlow's own throughput the tfgate backend delivers, with and without
batching, against a hand-written Keras server, all on the demo `mlp` (784→1024→1024→10) in one run.

  (a) in-process   backend.inference.predict on the loaded signature at batch sizes 1…256: the best rows/s is
                   the ceiling every other row is divided by ("vs (a)")
  (b) batching     `python -m backend --enable_batching` with --batching-parameters (default: max_batch_size 64,
                   batch_timeout_micros 2000, num_batch_threads 2): 64 concurrent 1-row requests, and 32 concurrent
                   8-row requests, each over REST and gRPC
  (c) no batching  the same backend and loads without --enable_batching
  (d) Keras        bench.keras_baseline (aiohttp + `model.predict` per request), the same REST loads
  (e) generator    the REST load generator against the backend's GET /v2/health/live: its own ceiling in
                   requests/s, so a row near it is limited by the client, not the server
  (f) latency      the issue's target, "p99 at 50% of the max sustainable rate <= 3 x batch_timeout_micros + one
      target       batch's compute time": an open loop of 1-row REST requests to the batching backend at half the
                   requests/s (b) measured for "REST, 1 row x 64" in this run; one batch's compute is the (a) p50
                   at the batch size closest to max_batch_size. Reported as met or not, never asserted; beside
                   it, an in-process batch of 8 rows back to back and right after 2 ms idle, as a half-loaded
                   server's batches run (bench/wakeup.py says why the two differ on a shared machine)
Loads but (f)'s are closed loops, each --seconds after --warmup: REST from bench.load (one keep-alive connection per
request in flight), gRPC on one channel from h2load where it is installed (--grpc-generator; bench/h2load.py says
why: the official client on grpc.aio costs ~30% of a core and caps what the server shows), else from bench.load;
the "generator" column says which. Servers run one at a time on loopback and are always stopped. A
backend that refuses --enable_batching at start ("does not support yet") makes (b), and so (f), skipped parts, with
that reason. --quick measures fewer parts (batch sizes 1 and 64; 1-row loads only), for tests. Also printed:
(b)/(d) in requests/s, "gen CPU", the load generator's own share of one core during each row (it shares the 2
cores), and "server CPU", the server's (all its threads; 200% is both cores), so a row can be read as limited by
the machine or by waiting; "steal", the machine's CPU time its hypervisor gave to other guests during the row (a
row with more than ~1% is from a noisy moment: its latencies say more about the neighbours than about tfgate).
The issue's share targets for (b) (REST 1 row x 64 >= 0.25 of the ceiling, REST and gRPC 8 rows x 32 >= 0.5) come
from --rounds interleaved rounds (default 3) run while the batching backend is up: each round measures the ceiling
at the best batch size of (a) and then each of those loads for --seconds / --rounds, and each target is the median
of its per-round ratios, so a slow spell of the machine spoils one round rather than one side of a ratio. Each
round also runs (f)'s open loop at half its own REST 1 x 64 rate, and (f) is judged on the median of those p99s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from backend.batching_config import BatchingParameters, parse_batching_parameters
from backend.demo_models import ensure_demo_models
from bench.backend_process import HOST, BackendProcess, ServerExited, ServerProcess, free_port
from bench.closed_loop import measure
from bench.h2load import H2LOAD_MISSING, h2load_path, run_grpc_load
from bench.latency import RequestFailed
from bench.load import Load
from bench.options import add_loop_options, positive_int
from bench.plot import plot_latency
from bench.proxies import CpuMeter
from bench.report import (
    Column,
    environment,
    format_ratios,
    format_table,
    latency_column,
    number,
    print_errors,
    ratio,
    share_column,
    write_json,
)
from bench.targets import RestTarget, Target, grpc_predict, rest_predict, seeded_rows
from bench.wakeup import IDLE_S, describe_wakeup, median_ns

MODEL, VERSION, INPUT, FEATURES, CLASSES = "mlp", 1, "x", 784, 10  # backend/demo_models.py
BATCH_SIZES, QUICK_BATCH_SIZES = (1, 8, 32, 64, 128, 256), (1, 64)
BATCHING_PARAMETERS = """max_batch_size { value: 64 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 2 }
"""
UNSUPPORTED = "does not support yet"  # what the backend says, and exits, when a TF Serving flag is not implemented
HEALTH_PATH = "/v2/health/live"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "backend-efficiency.json"
PARTS = {"a": "in-process", "b": "batching", "c": "no batching", "d": "Keras", "e": "generator",
         "f": "latency target"}
COLUMNS = (
    Column("rows/s", 10, lambda result: number(result["rows_per_s"])),
    Column("requests/s", 12, lambda result: number(result["requests_per_s"])),
    *(latency_column(key, "ms") for key in ("p50", "p99", "p99.9")),
    Column("vs (a)", 8, lambda result: number(result.get("vs_in_process"), 3)),
    Column("generator", 11, lambda result: result.get("generator", "-")),
    share_column("gen CPU", "generator_cpu", 9),
    share_column("server CPU", "server_cpu", 12),
    share_column("steal", "host_steal", 7),
    Column("errors", 8, lambda result: str(result["errors"])),
)


@dataclass(frozen=True, slots=True)
class Case:
    """One closed-loop load on a server: a predict of `rows` rows (or the health probe), `concurrency` in flight."""

    protocol: str  # "rest", "grpc" or "health"
    rows: int
    concurrency: int

    @property
    def key(self) -> str:
        return f"{self.protocol}_{self.rows}x{self.concurrency}"

    @property
    def label(self) -> str:
        if self.protocol == "health":
            return f"REST GET {HEALTH_PATH} x {self.concurrency}"
        return f"{'REST' if self.protocol == 'rest' else 'gRPC'}, {self.rows} row{'s' * (self.rows > 1)} x " \
               f"{self.concurrency}"


PREDICT_CASES = (Case("rest", 1, 64), Case("grpc", 1, 64), Case("rest", 8, 32), Case("grpc", 8, 32))
MAX_RATE_CASE = PREDICT_CASES[0]  # (b)'s requests/s on it is the "max sustainable rate" of (f)
HALF_RATE_KEY = "rest_1_half_rate"
HEALTH_CASE = Case("health", 0, 64)
# The Keras server answers 64 queued requests one model.predict at a time: ~4 s at p50 when the machine is quiet,
# past the usual 10 s drain when it is not (CI: 25 timeouts at 26-42% steal). Slow is what (d) measures, not an error.
KERAS_DRAIN_S = 60.0
# The targets for (b), as shares of the in-process ceiling, measured in interleaved rounds (see _rounds).
SHARE_TARGETS = {"rest_1x64": 0.25, "rest_8x32": 0.5, "grpc_8x32": 0.5}
# About what one batch holds at (f)'s rate: half the max rate (~2,600-3,800 requests/s here) times the 2 ms timeout.
IDLE_BATCH_ROWS = 8


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("backend-efficiency", help="backend (batching or not) vs in-process TF vs Keras",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_options(parser, DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="fewer parts (for tests)")
    parser.add_argument("--batching-parameters", type=Path,
                        help="BatchingParameters text file for (b) (default: the one described above)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="processes of the tfgate backend in (b) and (c): its --workers (default 1)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="interleaved rounds of the ceiling and (b)'s targeted loads (default 3)")
    parser.add_argument("--grpc-generator", choices=("auto", "h2load", "python"), default="auto",
                        help="what drives the gRPC loads: h2load (nghttp2-client), bench.load's official client on "
                             "grpc.aio, or h2load where installed (default)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the table, write the JSON and PNG; exit status 1 if any request failed."""
    h2load = None if args.grpc_generator == "python" else h2load_path()
    if args.grpc_generator == "h2load" and h2load is None:
        print(H2LOAD_MISSING, file=sys.stderr)
        return 2
    models_dir = ensure_demo_models()
    base_path = models_dir / MODEL
    cases = PREDICT_CASES[:2] if args.quick else PREDICT_CASES
    batching = args.batching_parameters.read_text() if args.batching_parameters else BATCHING_PARAMETERS
    parameters = parse_batching_parameters(batching, str(args.batching_parameters or "--batching-parameters"))
    results, ceiling_call = _in_process(base_path / str(VERSION), QUICK_BATCH_SIZES if args.quick else BATCH_SIZES,
                                        args)
    best_batch = max(results, key=lambda result: result["rows_per_s"])["rows"]
    after_idle = _batch_after_idle(ceiling_call(IDLE_BATCH_ROWS))
    skipped: dict[str, str] = {}
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tfgate-bench-") as workdir:
        work = Path(workdir)
        (work / "batching.txt").write_text(batching)
        plain = [f"--model_name={MODEL}", f"--model_base_path={base_path}", f"--workers={args.workers}"]
        batched = [*plain, "--enable_batching", f"--batching_parameters_file={work / 'batching.txt'}"]
        with BackendProcess(batched, work / "batching.log") as backend:
            try:
                backend.wait_ready()
            except ServerExited as exited:
                skipped["b"] = _unsupported(exited)
                skipped["f"] = "needs (b)'s max sustainable rate"
            else:
                results += _serve("b", backend, cases, args, h2load)
                max_rate = _find(results, "b", MAX_RATE_CASE.key)["requests_per_s"]
                if max_rate:
                    results.append(_half_rate(backend, max_rate, args.seconds, args.warmup))
                else:
                    skipped["f"] = f"(b) {MAX_RATE_CASE.label} completed no request"
                rounds = _rounds(backend, ceiling_call(best_batch), best_batch,
                                 [case for case in cases if case.key in SHARE_TARGETS], args, h2load)
        with BackendProcess(plain, work / "backend.log") as backend:
            results += _serve("c", backend.wait_ready(), cases, args, h2load)
            results += _serve("e", backend, [HEALTH_CASE], args)
        port = free_port()
        with ServerProcess("bench.keras_baseline", [f"--model_base_path={base_path}", f"--rest_api_port={port}"],
                           port, work / "keras.log") as keras:
            results += _serve("d", keras.wait_ready(), [case for case in cases if case.protocol == "rest"], args,
                              drain_s=KERAS_DRAIN_S)
    results.sort(key=lambda result: result["part"])
    ceiling = max((result for result in results if result["part"] == "a"), key=lambda result: result["rows_per_s"])
    for result in results:
        result["vs_in_process"] = ratio(result["rows_per_s"], ceiling["rows_per_s"]) if result["rows"] else None
    ratios = {f"{part}_over_d_requests_per_s": _ratios_to_keras(results, part) for part in ("b", "c")}
    target = None
    if "f" not in skipped:
        target = {**_latency_target(results, rounds, parameters), "batch_after_idle": after_idle}
    share_targets = _share_targets(rounds)
    machine = environment()
    write_json(args.out, {
        "benchmark": "backend-efficiency", "model": MODEL, "version": VERSION, "seconds": args.seconds,
        "warmup_s": args.warmup, "quick": args.quick, "workers": args.workers, "batching_parameters": batching,
        "environment": machine,
        "ceiling": {"key": ceiling["key"], "rows_per_s": ceiling["rows_per_s"]}, "results": results,
        "skipped": skipped, "ratios": ratios, "latency_target": target, "rounds": rounds,
        "share_targets": share_targets})
    _plot(args.out.with_suffix(".png"), results, ceiling)
    _print_report(args, results, skipped, ratios, ceiling, target)
    print(describe_wakeup(machine))
    for key, figures in share_targets.items():
        print(_describe_share_target(key, figures))
    failed = any(result["errors"] for result in results) or any(any(entry["errors"].values()) for entry in rounds)
    return 1 if failed else 0


def _in_process(version_dir: Path, batch_sizes: Iterable[int], args: argparse.Namespace
                ) -> tuple[list[dict[str, Any]], Callable[[int], Callable[[], None]]]:
    """(a): the bare core at each batch size, in this process, before any server runs; and what makes the same
    call at a batch size, for the rounds."""
    # TensorFlow: imported here so `--help` never pays for it.
    from backend.servable import load_servable, session_config
    from bench.in_process import predict_call

    # The backend's own Session threading at default flags: all cores per op, ops in the calling thread.
    servable = load_servable(MODEL, VERSION, version_dir, tags=("serve",), session_config=session_config(0, 0))

    def call_at(batch: int) -> Callable[[], None]:
        return predict_call(servable, {INPUT: seeded_rows(batch, (FEATURES,))}, _check_shape(batch))

    results = []
    for batch in batch_sizes:
        label = _label("a", f"predict, batch {batch}")
        summary = measure(label, call_at(batch), args.seconds, args.warmup).summary()
        results.append({"part": "a", "key": f"batch_{batch}", "label": label, "rows": batch, **summary,
                        "rows_per_s": summary["requests_per_s"] * batch})
    return results, call_at


def _batch_after_idle(call: Callable[[], None], samples: int = 150) -> dict[str, float]:
    """The same in-process batch back to back and right after an idle moment (bench/wakeup.py says why they differ):
    a half-loaded server starts most of its batches after one, while (f)'s bound counts the back-to-back time."""
    return {"rows": IDLE_BATCH_ROWS, "idle_ms": IDLE_S * 1e3, "back_to_back_us": median_ns(call, 0.0, samples) / 1e3,
            "after_idle_us": median_ns(call, IDLE_S, samples) / 1e3}


def _rounds(backend: BackendProcess, ceiling_call: Callable[[], None], batch: int, cases: list[Case],
            args: argparse.Namespace, h2load: str | None) -> list[dict[str, Any]]:
    """Interleaved rounds for the issue's share-of-ceiling targets: in each, the ceiling (in-process, at the best
    batch size) and then each targeted load on the batching backend, for --seconds / --rounds each, so a slow spell
    of this shared machine (its speed varies ~3x within minutes) moves both sides of one round's ratios. After
    REST 1 x 64, the round runs (f)'s open loop at half the rate it just measured."""
    share_s = args.seconds / args.rounds
    rounds = []
    for index in range(args.rounds):
        tag = f"round {index + 1}/{args.rounds}"
        ceiling = measure(_label("a", f"{tag}, batch {batch}"), ceiling_call, share_s, args.warmup).summary()
        ceiling_rows = ceiling["requests_per_s"] * batch
        shares, errors, entry = {}, {}, {"ceiling_rows_per_s": ceiling_rows}
        for case in cases:
            result = _run("b", backend, case, Load(case.concurrency, None, share_s, args.warmup), case.key,
                          f"{tag}, {case.label}", h2load)
            shares[case.key], errors[case.key] = ratio(result["rows_per_s"], ceiling_rows), result["errors"]
            if case == MAX_RATE_CASE and result["requests_per_s"]:
                half = _half_rate(backend, result["requests_per_s"], share_s, args.warmup, f"{tag}, ")
                entry["half_rate_p99_us"], errors[HALF_RATE_KEY] = half["latency_us"]["p99"], half["errors"]
        rounds.append({**entry, "vs_in_process": shares, "errors": errors})
    return rounds


def _share_targets(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per targeted load: the median over rounds of its share of the ceiling, against the issue's target."""
    targets = {}
    for key, target in SHARE_TARGETS.items():
        shares = [entry["vs_in_process"][key] for entry in rounds if entry["vs_in_process"].get(key) is not None]
        if shares:
            median = statistics.median(shares)
            targets[key] = {"median": median, "rounds": shares, "target": target, "met": median >= target}
    return targets


def _describe_share_target(key: str, figures: dict[str, Any]) -> str:
    rounds = ", ".join(f"{share:.3f}" for share in figures["rounds"])
    verdict = "met" if figures["met"] else "NOT met"
    label = next(case.label for case in PREDICT_CASES if case.key == key)
    return (f"(b) {label}: rows/s / ceiling, median of {len(figures['rounds'])} interleaved rounds = "
            f"{figures['median']:.3f} (rounds: {rounds}; target >= {figures['target']:g}): {verdict}")


def _check_shape(batch: int) -> Callable[[dict[str, np.ndarray]], None]:
    def check(outputs: dict[str, np.ndarray]) -> None:
        if outputs["probabilities"].shape != (batch, CLASSES):
            raise RequestFailed("wrong outputs", f"probabilities of shape {outputs['probabilities'].shape}")

    return check


def _serve(part: str, server: ServerProcess, cases: Iterable[Case], args: argparse.Namespace,
           h2load: str | None = None, drain_s: float = 10.0) -> list[dict[str, Any]]:
    """Each case's closed loop; gRPC ones on `h2load` when given (its path); requests still in flight when a loop
    ends get `drain_s` to finish before they count as errors."""
    return [_run(part, server, case, Load(case.concurrency, None, args.seconds, args.warmup, drain_s), case.key,
                 case.label, h2load) for case in cases]


def _half_rate(backend: BackendProcess, max_rate: float, seconds: float, warmup_s: float,
               prefix: str = "") -> dict[str, Any]:
    """(f): an open loop, so a stalled batch shows up as queueing latency instead of slowing the load down."""
    load = Load(MAX_RATE_CASE.concurrency, max_rate / 2, seconds, warmup_s)
    return _run("f", backend, MAX_RATE_CASE, load, HALF_RATE_KEY, f"{prefix}REST, 1 row, {load.describe()}")


def _run(part: str, server: ServerProcess, case: Case, load: Load, key: str, text: str,
         h2load: str | None = None) -> dict[str, Any]:
    label = _label(part, text)
    with CpuMeter({"server_cpu": server}) as cpu:
        summary = run_grpc_load(_target(server, case), load, label, h2load)
    return {"part": part, "key": key, "label": label, "rows": case.rows, **summary, **cpu.shares}


def _find(results: list[dict[str, Any]], part: str, key: str) -> dict[str, Any]:
    return next(result for result in results if result["part"] == part and result["key"] == key)


def _latency_target(results: list[dict[str, Any]], rounds: list[dict[str, Any]],
                    parameters: BatchingParameters) -> dict[str, Any]:
    """(f) against its bound, 3 x batch_timeout + one batch's compute. The verdict is the median p99 of the rounds'
    own (f) loops (each at half that round's REST 1 x 64 rate) where there are any, else the table's p99; `met` is
    None when a figure is missing."""
    measured = _find(results, "f", HALF_RATE_KEY)
    # The closest measured size stands in for a full batch; on a tie the larger one, so the bound is not too tight.
    compute = min((result for result in results if result["part"] == "a"),
                  key=lambda result: (abs(result["rows"] - parameters.max_batch_size), -result["rows"]))
    compute_us, p99_us = compute["latency_us"]["p50"], measured["latency_us"]["p99"]
    bound_us = None if compute_us is None else 3 * parameters.batch_timeout_micros + compute_us
    rounds_p99_us = [entry["half_rate_p99_us"] for entry in rounds if entry.get("half_rate_p99_us") is not None]
    judged_us = statistics.median(rounds_p99_us) if rounds_p99_us else p99_us
    return {"rate": measured["rate"], "max_sustainable_key": MAX_RATE_CASE.key,
            "max_sustainable_requests_per_s": _find(results, "b", MAX_RATE_CASE.key)["requests_per_s"],
            "p99_us": p99_us, "batch_timeout_us": parameters.batch_timeout_micros,
            "batch_compute_key": compute["key"], "batch_compute_us": compute_us, "bound_us": bound_us,
            "rounds_p99_us": rounds_p99_us, "judged_p99_us": judged_us,
            "met": None if judged_us is None or bound_us is None else judged_us <= bound_us}


def _target(server: ServerProcess, case: Case) -> Target:
    if case.protocol == "health":
        return RestTarget(server.url, HEALTH_PATH)
    x = seeded_rows(case.rows, (FEATURES,))
    if case.protocol == "grpc":
        assert isinstance(server, BackendProcess)
        return grpc_predict(f"grpc://{HOST}:{server.grpc_port}", MODEL, None, INPUT, x)
    return rest_predict(server.url, MODEL, None, x)


def _label(part: str, text: str) -> str:
    return f"({part}) {PARTS[part]}, {text}"


def _unsupported(exited: ServerExited) -> str:
    """The backend's own reason for refusing batching; any other exit is a real failure and is raised."""
    for line in exited.log.splitlines():
        if UNSUPPORTED in line:
            return line.strip()
    raise exited


def _ratios_to_keras(results: list[dict[str, Any]], part: str) -> dict[str, float | None]:
    """Per REST load measured in both `part` and (d): the ratio of their requests/s."""
    keras = {result["key"]: result for result in results if result["part"] == "d"}
    return {result["key"]: ratio(result["requests_per_s"], keras[result["key"]]["requests_per_s"])
            for result in results if result["part"] == part and result["key"] in keras}


def _plot(path: Path, results: list[dict[str, Any]], ceiling: dict[str, Any]) -> None:
    series: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        if result["rows"]:
            protocol = "" if result["part"] == "a" else (", REST" if result["key"].startswith("rest") else ", gRPC")
            series.setdefault(f"({result['part']}) {PARTS[result['part']]}{protocol}", []).append(result)
    plot_latency(path, f"backend-efficiency: {MODEL}, latency vs rows/s", series, "rows_per_s", "rows/s",
                 lambda result: result["key"].partition("_")[2].replace("_", " "),
                 (f"(a) ceiling, {ceiling['key'].replace('_', ' ')}", ceiling["rows_per_s"]), log_x=True)


def _print_report(args: argparse.Namespace, results: list[dict[str, Any]], skipped: dict[str, str],
                  ratios: dict[str, dict[str, float | None]], ceiling: dict[str, Any],
                  target: dict[str, Any] | None) -> None:
    workers = f", tfgate backend with --workers={args.workers}" if args.workers > 1 else ""
    print(f"\nbackend-efficiency: {MODEL} ({FEATURES}→1024→1024→{CLASSES}){workers}, {args.seconds:g} s per row "
          f"after {args.warmup:g} s warm-up; closed loops, 'x N' = N requests in flight; latency in ms; "
          f"vs (a) = rows/s over the in-process ceiling ({ceiling['key'].replace('_', ' ')}: "
          f"{ceiling['rows_per_s']:.1f} rows/s)")
    print(format_table([((result["label"],), result) for result in results], headers=("part",), columns=COLUMNS))
    for part, reason in skipped.items():
        print(f"({part}) {PARTS[part]}: skipped: {reason}")
    for part in ("b", "c"):
        title = f"({part})/(d) requests/s"
        print(format_ratios(title, ratios[f"{part}_over_d_requests_per_s"]) if part not in skipped
              else f"{title}: - ({part}) skipped")
    health = next(result for result in results if result["part"] == "e")
    if health["generator_cpu"]:
        print(f"(e) generator: {health['requests_per_s']:.0f} requests/s on {health['generator_cpu']:.0%} of a core, "
              f"so about {health['requests_per_s'] / health['generator_cpu']:.0f} requests/s per core of its own")
    if target:
        print(_describe_target(target))
    print_errors((result["label"], result) for result in results)
    print(f"results: {args.out}", file=sys.stderr)


def _describe_target(target: dict[str, Any]) -> str:
    def ms(value_us: float | None) -> str:
        return number(None if value_us is None else value_us / 1e3, 2)

    verdict = {True: "met", False: "NOT met", None: "unknown"}[target["met"]]
    idle = target["batch_after_idle"]
    return (f"(f) latency target: p99 {ms(target['p99_us'])} ms at {target['rate']:.0f} requests/s (50% of (b) "
            f"{target['max_sustainable_key']}) vs 3 x {ms(target['batch_timeout_us'])} ms batch timeout + "
            f"{ms(target['batch_compute_us'])} ms (a) {target['batch_compute_key']} p50 = "
            f"{ms(target['bound_us'])} ms; judged on {_judged(target)}: {verdict}\n"
            f"(f) on this machine an in-process batch of {idle['rows']} rows takes p50 {ms(idle['back_to_back_us'])} "
            f"ms back to back and {ms(idle['after_idle_us'])} ms right after {idle['idle_ms']:g} ms idle, as most of "
            f"a half-loaded server's batches start")


def _judged(target: dict[str, Any]) -> str:
    rounds = target["rounds_p99_us"]
    if not rounds:
        return "this p99"
    listed = ", ".join(number(value / 1e3, 2) for value in rounds)
    return f"the median p99 of {len(rounds)} interleaved rounds, {number(target['judged_p99_us'] / 1e3, 2)} ms " \
           f"(rounds: {listed})"
