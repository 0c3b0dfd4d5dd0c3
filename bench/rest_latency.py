"""`rest-latency`: what one REST predict costs end to end, against the same predict in-process, in one run.

Three closed loops at concurrency 1, each for --seconds after a --warmup, on half_plus_two version 1 with the body
{"instances": [1.0, 2.0, 5.0]}:
  (a) rest             one keep-alive HTTP/1.1 connection to a real backend, started here on loopback (or --url)
  (b) in_process       backend.inference.predict on the same version loaded here: the ceiling without HTTP or JSON
  (c) in_process_json  the REST handler's JSON decode/parse/encode around that same predict
(a)/(b) is the share of the core's rate the REST API keeps. (c) does all of (a)'s work but HTTP, so (a)/(c) is what
HTTP leaves (client, loopback, aiohttp, the executor hop); (a) includes this Python client's own time. Every response
is checked against the expected predictions inside the timed call, with the cheapest check for its layer; a wrong
or failed request is counted as an error and not timed. The backend is stopped before (b) and (c) run.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from backend.demo_models import ensure_demo_models
from bench.backend_process import demo_backend
from bench.closed_loop import measure
from bench.latency import RequestFailed
from bench.options import add_loop_options, loopback_url
from bench.report import environment, format_ratios, format_table, print_errors, ratio, write_json
from bench.rest_client import KeepAliveClient

MODEL, VERSION = "half_plus_two", 1
BODY = {"instances": [1.0, 2.0, 5.0]}
EXPECTED = [2.5, 3.0, 4.5]  # version 1 computes 0.5 * x + 2
LABELS = {
    "rest": "(a) REST, 1 keep-alive connection",
    "in_process": "(b) in-process predict",
    "in_process_json": "(c) in-process JSON + predict",
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rest-latency.json"


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("rest-latency", help="REST predict latency vs. the same predict in-process",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_options(parser, DEFAULT_OUT)
    parser.add_argument("--url", type=loopback_url("http"),
                        help="a running server on loopback (e.g. http://127.0.0.1:8501) instead of starting one")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the table and write the JSON; exit status 1 if any request failed."""
    # TensorFlow: imported here so `--help` never pays for it.
    from backend.servable import load_servable
    from bench.in_process import json_predict_call, predict_call

    models_dir = ensure_demo_models()
    body = orjson.dumps(BODY)
    with ExitStack() as stack:
        backend = None if args.url else stack.enter_context(demo_backend(models_dir))
        url = args.url if backend is None else backend.url
        client = KeepAliveClient(url, f"/v1/models/{MODEL}/versions/{VERSION}:predict", body)
        stack.callback(client.close)
        servable = load_servable(MODEL, VERSION, models_dir / MODEL / str(VERSION), tags=("serve",))
        if backend is not None:
            backend.wait_ready()  # after the local load, which overlapped the backend's own start
        rest = measure(LABELS["rest"], lambda: _check_json(client.post()), args.seconds, args.warmup)
    inputs = {"x": np.array([1, 2, 5], np.float32)}
    core = measure(LABELS["in_process"], predict_call(servable, inputs, _check_tensors), args.seconds, args.warmup)
    with_json = measure(LABELS["in_process_json"], json_predict_call(servable, body, _check_json), args.seconds,
                        args.warmup)

    results = {"rest": {**rest.summary(), "connections": client.connections},
               "in_process": core.summary(), "in_process_json": with_json.summary()}
    rates = {key: result["requests_per_s"] for key, result in results.items()}
    ratios = {"rest_over_in_process": ratio(rates["rest"], rates["in_process"]),
              "rest_over_in_process_json": ratio(rates["rest"], rates["in_process_json"])}
    write_json(args.out, {
        "benchmark": "rest-latency", "model": MODEL, "version": VERSION, "body": BODY, "target": url,
        "backend_started_by_benchmark": backend is not None, "seconds": args.seconds, "warmup_s": args.warmup,
        "environment": environment(), "results": {key: {"label": LABELS[key], **result}
                                                   for key, result in results.items()},
        "ratios": ratios,
    })
    _print_report(args, body, results, ratios)
    return 1 if any(result["errors"] for result in results.values()) else 0


def _print_report(args: argparse.Namespace, body: bytes, results: dict[str, dict[str, Any]],
                  ratios: dict[str, float | None]) -> None:
    print(f"\nrest-latency: {MODEL} v{VERSION}, body {body.decode()}, concurrency 1, {args.seconds:g} s per row "
          f"after {args.warmup:g} s warm-up; latency in microseconds (us)")
    print(format_table([((LABELS[key],), result) for key, result in results.items()]))
    print(format_ratios("requests/s ratios", {"(a)/(b)": ratios["rest_over_in_process"],
                                              "(a)/(c)": ratios["rest_over_in_process_json"]}))
    print_errors((LABELS[key], result) for key, result in results.items())
    print(f"results: {args.out}", file=sys.stderr)


def _check_json(data: bytes) -> None:
    if orjson.loads(data) != {"predictions": EXPECTED}:
        raise RequestFailed("wrong predictions", data[:300].decode(errors="replace"))


def _check_tensors(outputs: dict[str, np.ndarray]) -> None:
    if outputs["y"].tolist() != EXPECTED:
        raise RequestFailed("wrong predictions", repr(outputs))
