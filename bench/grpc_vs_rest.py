"""`grpc-vs-rest`: the same predict call over TF Serving's REST API and its gRPC API, against one backend, in one run.

One backend subprocess on loopback serves the demo models. Each case is one predict call with one input tensor "x":
  half_plus_two v1  [1.0, 2.0, 5.0], rest-latency's call (every response must be exactly [2.5, 3.0, 4.5])
  mlp v1            1 row and 32 rows of 784 seeded floats in [0, 1) (every response must have the right shapes)
and runs two closed loops at concurrency 1, each for --seconds after a --warmup:
  REST   one keep-alive HTTP/1.1 connection (bench.rest_client), row format {"instances": [...]}, JSON decoded
  gRPC   one channel, the official PredictionService stub, a PredictRequest built once with tf.make_tensor_proto
Each side does what its client must to read the answer and no more: REST parses the JSON body; gRPC reads the
response the stub has already parsed (the backend sends float_val, as TF Serving does by default), with no copy to
NumPy. A wrong or failed response is counted as an error and not timed. Ratios are gRPC/REST per case, for
requests/s (above 1: gRPC is faster) and p50 latency (below 1: gRPC is faster).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import orjson

from backend.demo_models import ensure_demo_models
from bench import rest_latency
from bench.backend_process import HOST, demo_backend
from bench.closed_loop import measure
from bench.latency import LatencyRecorder, RequestFailed
from bench.options import add_loop_options
from bench.report import environment, format_ratios, format_table, print_errors, ratio, write_json
from bench.rest_client import KeepAliveClient

if TYPE_CHECKING:  # these import TensorFlow
    from tensorflow.core.framework.tensor_pb2 import TensorProto
    from tensorflow_serving.apis.predict_pb2 import PredictResponse

    from bench.grpc_client import PredictClient

MLP_ROWS = (1, 32)
MLP_FEATURES, MLP_CLASSES = 784, 10  # the demo mlp's input and output widths (backend/demo_models.py)
MLP_SEED = 0
PROTOCOLS = {"rest": "REST", "grpc": "gRPC"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "grpc-vs-rest.json"


@dataclass(frozen=True, slots=True)
class Case:
    """One predict call, sent as the same tensor over both protocols, and what every response to it must hold."""
    key: str
    model: str
    version: int
    size: str  # of the input, for the label
    x: np.ndarray
    rest_ok: Callable[[Any], bool]  # given the "predictions" of a row-format response
    grpc_ok: Callable[[PredictResponse], bool]

    @property
    def label(self) -> str:
        return f"{self.model} v{self.version}, {self.size}"


def _cases() -> list[Case]:
    expected = rest_latency.EXPECTED
    half_plus_two = Case(
        "half_plus_two", rest_latency.MODEL, rest_latency.VERSION, "3 values",
        np.array(rest_latency.BODY["instances"], np.float32),
        rest_ok=lambda predictions: predictions == expected,
        grpc_ok=lambda response: (_dims(response.outputs["y"]) == (len(expected),)
                                  and list(response.outputs["y"].float_val) == expected))
    return [half_plus_two, *(_mlp_case(rows) for rows in MLP_ROWS)]


def _mlp_case(rows: int) -> Case:
    def rest_ok(predictions: Any) -> bool:  # several outputs: one object per row
        return len(predictions) == rows and all(
            len(row["probabilities"]) == MLP_CLASSES and isinstance(row["class_id"], int) for row in predictions)

    def grpc_ok(response: PredictResponse) -> bool:
        outputs = response.outputs
        return _dims(outputs["probabilities"]) == (rows, MLP_CLASSES) and _dims(outputs["class_id"]) == (rows,)

    x = np.random.default_rng(MLP_SEED).random((rows, MLP_FEATURES), dtype=np.float32)
    return Case(f"mlp_{rows}", "mlp", 1, f"{rows} row{'s' if rows > 1 else ''}", x, rest_ok, grpc_ok)


def _dims(tensor: TensorProto) -> tuple[int, ...]:
    return tuple(dim.size for dim in tensor.tensor_shape.dim)


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("grpc-vs-rest", help="the same predict over gRPC and REST, one backend",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_options(parser, DEFAULT_OUT)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the table and write the JSON; exit status 1 if any request failed."""
    models_dir = ensure_demo_models()
    reports: dict[str, dict[str, Any]] = {}
    with demo_backend(models_dir) as backend:
        # TensorFlow (for make_tensor_proto): imported while the backend loads, and never for `--help`.
        from bench.grpc_client import PredictClient, predict_request

        calls = [(case, orjson.dumps({"instances": case.x.tolist()}),
                  predict_request(case.model, case.version, {"x": case.x})) for case in _cases()]
        backend.wait_ready()
        for case, body, request in calls:
            path = f"/v1/models/{case.model}/versions/{case.version}:predict"
            with closing(KeepAliveClient(backend.url, path, body)) as rest, \
                    closing(PredictClient(backend.grpc_port, request)) as grpc_client:
                recorders = {"rest": measure(f"{case.label}, REST", _rest_call(rest, case.rest_ok), args.seconds,
                                             args.warmup),
                             "grpc": measure(f"{case.label}, gRPC", _grpc_call(grpc_client, case.grpc_ok), args.seconds,
                                             args.warmup)}
            reports[case.key] = _case_report(case, body, request.ByteSize(), recorders, rest.connections)
        targets = {"rest": backend.url, "grpc": f"{HOST}:{backend.grpc_port}"}
    write_json(args.out, {"benchmark": "grpc-vs-rest", "targets": targets, "concurrency": 1, "seconds": args.seconds,
                          "warmup_s": args.warmup, "environment": environment(), "cases": reports})
    _print_report(args, reports)
    return 1 if any(result["errors"] for report in reports.values() for result in report["results"].values()) else 0


def _rest_call(client: KeepAliveClient, ok: Callable[[Any], bool]) -> Callable[[], None]:
    def call() -> None:
        data = client.post()
        if not ok(orjson.loads(data)["predictions"]):
            raise RequestFailed("wrong predictions", data[:300].decode(errors="replace"))

    return call


def _grpc_call(client: PredictClient, ok: Callable[[PredictResponse], bool]) -> Callable[[], None]:
    def call() -> None:
        response = client.predict()
        if not ok(response):
            raise RequestFailed("wrong outputs", str(response)[:300])

    return call


def _case_report(case: Case, body: bytes, request_bytes: int, recorders: dict[str, LatencyRecorder],
                 connections: int) -> dict[str, Any]:
    results = {key: recorder.summary() for key, recorder in recorders.items()}
    results["rest"]["connections"] = connections
    rest, grpc = results["rest"], results["grpc"]
    return {
        "label": case.label, "model": case.model, "version": case.version, "input_shape": list(case.x.shape),
        "rest_body_bytes": len(body), "grpc_request_bytes": request_bytes, "results": results,
        "ratios": {"grpc_over_rest_requests_per_s": ratio(grpc["requests_per_s"], rest["requests_per_s"]),
                   "grpc_over_rest_p50": ratio(grpc["latency_us"]["p50"], rest["latency_us"]["p50"])},
    }


def _print_report(args: argparse.Namespace, reports: dict[str, dict[str, Any]]) -> None:
    rows = [((report["label"], PROTOCOLS[key]), result)
            for report in reports.values() for key, result in report["results"].items()]
    print(f"\ngrpc-vs-rest: concurrency 1, {args.seconds:g} s per row after {args.warmup:g} s warm-up; REST over one "
          "keep-alive HTTP/1.1 connection, gRPC over one channel; latency in microseconds (us)")
    print(format_table(rows, headers=("model", "protocol")))
    for report in reports.values():
        ratios = report["ratios"]
        print(format_ratios(f"gRPC/REST, {report['label']}", {"requests/s": ratios["grpc_over_rest_requests_per_s"],
                                                               "p50": ratios["grpc_over_rest_p50"]}))
    print_errors((", ".join(labels), result) for labels, result in rows)
    print(f"results: {args.out}", file=sys.stderr)
