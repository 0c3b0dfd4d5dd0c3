"""`load`: drive a running server on loopback with REST or gRPC predicts at fixed concurrencies or arrival rates.

The URL picks the protocol: http:// or https:// for TF Serving's REST API (N keep-alive HTTP/1.1 connections,
one request in flight on each), grpc:// or grpcs:// for its gRPC API (N concurrent calls over --channels channels,
with the official PredictionService stub). Every request carries the same seeded input: --rows rows of shape
--row-shape (float32 in [0, 1)) for the signature's input --input (REST sends it in the row format,
{"instances": ...}). --path GETs a fixed REST path instead (e.g. /v2/health/live: what the generator itself can
drive). Each --concurrency value is a closed-loop run; each --rate value an open-loop run with at most
--max-in-flight requests in flight, latency counted from the scheduled send time (see bench/load.py). A run is
--seconds long after --warmup. Results: a table on stdout, JSON at --out and a PNG of latency against throughput
beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

from bench.load import Load, run_load
from bench.options import add_loop_options, comma_list, loopback_url, positive_float, positive_int
from bench.plot import plot_latency
from bench.report import Column, environment, format_table, latency_column, number, print_errors, write_json
from bench.targets import GRPC_SCHEMES, REST_SCHEMES, RestTarget, Target, grpc_predict, rest_predict, seeded_rows

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "load.json"
LOAD_COLUMNS = (
    Column("rows/s", 11, lambda result: number(result["rows_per_s"])),
    Column("requests/s", 12, lambda result: number(result["requests_per_s"])),
    *(latency_column(key, "ms") for key in ("p50", "p90", "p99", "p99.9")),
    Column("errors", 8, lambda result: str(result["errors"])),
    Column("gen CPU", 9, lambda result: f"{result['generator_cpu']:.0%}"),
)


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("load", help="load generator: REST or gRPC, closed or open loop, on loopback",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, type=loopback_url(*REST_SCHEMES, *GRPC_SCHEMES),
                        help="http[s]://127.0.0.1:PORT (REST) or grpc[s]://127.0.0.1:PORT (gRPC)")
    parser.add_argument("--model", help="model name (required unless --path)")
    parser.add_argument("--version", type=int, help="model version (default: the latest)")
    parser.add_argument("--signature", default="", help="signature name (default: serving_default)")
    parser.add_argument("--input", default="x", help="the signature's input name (gRPC)")
    parser.add_argument("--rows", type=positive_int, default=1, help="rows per request")
    parser.add_argument("--row-shape", type=_shape, default=(784,), help="shape of one row, e.g. 784 or 28,28")
    parser.add_argument("--path", help="GET this path instead of predicting (REST), e.g. /v2/health/live")
    parser.add_argument("--concurrency", type=comma_list(positive_int), default=[],
                        help="closed loop at each of these concurrencies, e.g. 1,8,64 (default 8 without --rate)")
    parser.add_argument("--rate", type=comma_list(positive_float), default=[],
                        help="open loop at each of these requests/s, e.g. 100,200,400")
    parser.add_argument("--max-in-flight", type=positive_int, default=64, help="callers of an open-loop run")
    parser.add_argument("--channels", type=positive_int, default=1, help="gRPC channels (TCP connections)")
    parser.add_argument("--cacert", type=Path, help="CA certificate for https:// or grpcs://")
    add_loop_options(parser, DEFAULT_OUT)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the table, write the JSON and PNG; exit status 1 if any request failed."""
    target = _target(args)
    loads = [Load(concurrency, None, args.seconds, args.warmup) for concurrency in args.concurrency]
    loads += [Load(args.max_in_flight, rate, args.seconds, args.warmup) for rate in args.rate]
    if not loads:
        loads = [Load(8, None, args.seconds, args.warmup)]
    described = target.describe()
    results = [run_load(target, load, f"{described['protocol']}, {load.describe()}") for load in loads]
    write_json(args.out, {"benchmark": "load", "target": described, "seconds": args.seconds,
                          "warmup_s": args.warmup, "environment": environment(), "runs": results})
    title = f"{described['protocol']} {described.get('path') or args.model} at {args.url}"
    series = {"closed loop": [result for result in results if result["mode"] == "closed"],
              f"open loop, at most {args.max_in_flight} in flight": [result for result in results
                                                                      if result["mode"] == "open"]}
    plot_latency(args.out.with_suffix(".png"), f"load: {title}", {name: runs for name, runs in series.items() if runs},
                 "requests_per_s", "requests/s", _point_label)
    rows = [((_describe_run(load, result),), result) for load, result in zip(loads, results)]
    print(f"\nload: {title}, {described['rows']} row(s) per request, {args.seconds:g} s per run after "
          f"{args.warmup:g} s warm-up; gen CPU is the generator's own share of one core")
    print(format_table(rows, headers=("run",), columns=LOAD_COLUMNS))
    print_errors((labels[0], result) for labels, result in rows)
    print(f"results: {args.out}", file=sys.stderr)
    return 1 if any(result["errors"] for result in results) else 0


def _point_label(result: Mapping[str, Any]) -> str:
    return f"{result['rate']:g}/s" if result["mode"] == "open" else f"{result['concurrency']} in flight"


def _describe_run(load: Load, result: dict[str, Any]) -> str:
    text = load.describe()
    if result.get("unsent"):
        text += f", {result['unsent']} unsent"
    return text


def _target(args: argparse.Namespace) -> Target:
    grpc = args.url.startswith(GRPC_SCHEMES)
    if args.path:
        if grpc:
            raise SystemExit("load: --path is for REST URLs")
        return RestTarget(args.url, args.path, cacert=args.cacert)
    if not args.model:
        raise SystemExit("load: --model is required (or --path)")
    x = seeded_rows(args.rows, args.row_shape)
    if grpc:
        return grpc_predict(args.url, args.model, args.version, args.input, x, args.signature, args.channels,
                            args.cacert)
    return rest_predict(args.url, args.model, args.version, x, args.signature, args.cacert)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(dim) for dim in text.split(",") if dim.strip())
