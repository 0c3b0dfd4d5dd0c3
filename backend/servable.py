"""One loaded version of a SavedModel: its signatures, and a thread-safe way to run them.

How it works: `saved_model.pb` is read first for its SignatureDefs, then the version is loaded with the v1 loader
into its own `Session`, TF2 and TF1-era SavedModels alike, which is what TF Serving does in C++. A signature runs as
a compiled step (`Session::MakeCallable`) fed and fetched by the signature's tensor names, one step per set of
inputs and outputs a client asks for. On the demo MLP this takes 0.4-0.7 ms less per call at 1-3 rows than running
the TF2 signature as an eager concrete function did, and a 64-row batch in the batching server a median 4.6 ms
instead of 7.7: the eager call's Python glue and function runtime are gone. Steps are safe to call from several
threads at once. Metadata always comes from the SignatureDefs as written, so it matches TF Serving's.
"""

from __future__ import annotations

import logging
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow.python.util import deprecation

from backend import errors
from backend.batching_config import BatchingParameters

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
# A TF2 SavedModel's initializer, written as a SignatureDef of an op: listed in metadata (as TF Serving does), never
# served.
INIT_OP_SIGNATURE_KEY = "__saved_model_init_op"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

Runner = Callable[[Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a signature says about one of its tensors: dtype and (possibly unknown) shape, -1 for unknown dims."""

    dtype: tf.DType
    shape: tuple[int, ...] | None
    # The NumPy dtype when the tensor holds numbers (not strings, bools or bfloat16), else None: asked on every
    # REST predict, so worked out once here.
    numeric: np.dtype | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        as_numpy = None if self.dtype == tf.string else np.dtype(self.dtype.as_numpy_dtype)
        object.__setattr__(self, "numeric", as_numpy if as_numpy is not None and as_numpy.kind in "fiu" else None)

    @classmethod
    def from_proto(cls, info: meta_graph_pb2.TensorInfo) -> TensorSpec:
        shape = info.tensor_shape
        dims = None if shape.unknown_rank else tuple(int(dim.size) for dim in shape.dim)
        return cls(dtype=tf.dtypes.as_dtype(info.dtype), shape=dims)

    def describe(self) -> str:
        shape = "unknown" if self.shape is None else "[" + ",".join(map(str, self.shape)) + "]"
        return f"{self.dtype.name} {shape}"


@dataclass(frozen=True, slots=True)
class Signature:
    key: str
    method_name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    run: Runner


@dataclass(frozen=True, slots=True)
class Servable:
    """A loaded model version. Immutable: unloading drops the reference, in-flight requests keep theirs."""

    name: str
    version: int
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    signatures: Mapping[str, Signature]
    batching: BatchingParameters | None = None  # the version's own batching_params.pbtxt, if batching is on

    def signature(self, key: str) -> Signature:
        found = self.signatures.get(key or DEFAULT_SIGNATURE)
        if found is None:
            raise errors.InvalidArgument(f'Serving signature name: "{key or DEFAULT_SIGNATURE}" not found in '
                                         "signature def")
        return found


# ConfigProto's inter_op_parallelism_threads below zero: a step runs its ops in the thread that called it.
CALLER_THREAD = -1


def session_config(intra_op: int, inter_op: int) -> tf.compat.v1.ConfigProto:
    """A Session's thread pools. intra_op 0 is TensorFlow's choice (all cores). inter_op 0 or below is tfgate's
    choice: no pool, each step runs its ops in the thread that called it. Handing every op to a pool thread costs a
    thread switch per op, which is most of a small model's time (half_plus_two: 32–57 µs a call through the pool,
    8–14 in the caller; the demo MLP at 1 row 368–425 µs against 283–287, at 64 rows ~3.0 ms against ~2.8), while
    concurrent requests and batch threads already keep the cores busy; a positive count restores a pool, for graphs
    wide enough to need one."""
    return tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op,
                                    inter_op_parallelism_threads=inter_op if inter_op > 0 else CALLER_THREAD)


def load_servable(name: str, version: int, path: Path, tags: Sequence[str],
                  session_config: tf.compat.v1.ConfigProto | None = None) -> Servable:
    """Load one version directory; raise ServingError (NOT_FOUND / INVALID_ARGUMENT / INTERNAL) on failure."""
    meta_graph = _find_meta_graph(path, tags)
    runners = _load_into_session(path, tags, meta_graph, session_config)
    signatures = {
        key: Signature(
            key=key,
            method_name=definition.method_name,
            inputs=MappingProxyType({k: TensorSpec.from_proto(v) for k, v in definition.inputs.items()}),
            outputs=MappingProxyType({k: TensorSpec.from_proto(v) for k, v in definition.outputs.items()}),
            run=runners[key],
        )
        for key, definition in meta_graph.signature_def.items()
        if key in runners
    }
    return Servable(name=name, version=version,
                    signature_defs=MappingProxyType(dict(meta_graph.signature_def)),
                    signatures=MappingProxyType(signatures))


def _find_meta_graph(path: Path, tags: Sequence[str]) -> meta_graph_pb2.MetaGraphDef:
    pb_path = path / "saved_model.pb"
    try:
        data = pb_path.read_bytes()
    except OSError as error:
        raise errors.NotFound(f"Could not find SavedModel .pb in {path}: {error.strerror}") from None
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString(data)
    except Exception as error:  # protobuf raises its own DecodeError; any failure means a corrupt file
        raise errors.InvalidArgument(f"Could not parse {pb_path}: {error}") from None
    wanted = set(tags)
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == wanted:
            return meta_graph
    found = [sorted(m.meta_info_def.tags) for m in saved_model.meta_graphs]
    raise errors.NotFound(f"MetaGraphDef associated with tags {sorted(wanted)} could not be found in SavedModel "
                          f"{path}; available tag sets: {found}")


def _load_into_session(path: Path, tags: Sequence[str], meta_graph: meta_graph_pb2.MetaGraphDef,
                       session_config: tf.compat.v1.ConfigProto | None) -> dict[str, Runner]:
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=session_config)
    try:
        # The v1 loader's deprecation notice ("use tf.saved_model.load") is meant for training code; logged for every
        # version a server loads, it would only mislead operators.
        with graph.as_default(), deprecation.silence():
            tf.compat.v1.saved_model.loader.load(session, list(tags), str(path))
    except Exception as error:  # TF raises many types while loading; all mean "this version cannot load"
        session.close()
        raise errors.Internal(f"Failed to load SavedModel {path}: {error}") from error
    return {key: _session_runner(session, key, definition) for key, definition in meta_graph.signature_def.items()
            if key != INIT_OP_SIGNATURE_KEY}


# Distinct (inputs, outputs) pairs one signature keeps a compiled step for; clients pick outputs with
# output_filter, so the pairs are few in practice, but never unbounded.
_STEPS_PER_SIGNATURE = 64


def _session_runner(session: tf.compat.v1.Session, signature_key: str, definition: meta_graph_pb2.SignatureDef
                    ) -> Runner:
    input_names = {key: info.name for key, info in definition.inputs.items()}
    output_names = {key: info.name for key, info in definition.outputs.items()}

    @lru_cache(maxsize=_STEPS_PER_SIGNATURE)
    def make_step(feeds: tuple[str, ...], fetches: tuple[str, ...]) -> Callable[..., list[np.ndarray]]:
        # Session::MakeCallable: the step is pruned and placed once, and each call only passes tensors. The public
        # make_callable with feeds falls back to Session.run, whose feed and fetch handling costs more per call than
        # this whole model at batch 1 (~0.4 ms of Python; measured on the demo MLP).
        options = config_pb2.CallableOptions(feed=[input_names[key] for key in feeds],
                                             fetch=[output_names[key] for key in fetches])
        return session._make_callable_from_options(options)

    # Making a step takes tens of milliseconds (the demo MLP's first call: 68 ms, later ones 1-2). One lock, so
    # batch threads that miss together make it once instead of each making its own.
    lock = threading.Lock()

    def step(feeds: tuple[str, ...], fetches: tuple[str, ...]) -> Callable[..., list[np.ndarray]]:
        with lock:
            return make_step(feeds, fetches)

    def run(inputs: Mapping[str, np.ndarray], output_keys: Sequence[str]) -> dict[str, np.ndarray]:
        with _tf_errors_as_serving_errors():
            values = step(tuple(inputs), tuple(output_keys))(*inputs.values())
        return dict(zip(output_keys, values))

    # Made while the version loads, not by its first request: the step most calls use, every input and every output
    # in the SignatureDef's order (what a request without output_filter asks for). A signature whose step cannot be
    # made still loads; a request to it reports why.
    try:
        step(tuple(input_names), tuple(output_names))
    except tf.errors.OpError as error:
        log.warning("signature %r: its step could not be made at load time: %s", signature_key,
                    _client_message(error.message))
    return run


@contextmanager
def _tf_errors_as_serving_errors() -> Iterator[None]:
    """Translate TensorFlow's run-time errors into ServingErrors with the same status code."""
    try:
        yield
    except errors.ServingError:
        raise
    except tf.errors.OpError as error:
        raise _OP_ERRORS.get(type(error), errors.Internal)(_client_message(error.message)) from error
    except (TypeError, ValueError) as error:
        raise errors.InvalidArgument(str(error)) from error


_TF_NOISE = re.compile(
    r"^(Graph execution error:|Detected at node |<stack traces unavailable>|Node: '|\s*\[\[\{\{node )")
_OP_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\]\s*$")


def _client_message(message: str) -> str:
    """TensorFlow's error without its graph-location preamble and node suffixes: the part a client can act on."""
    lines = [line for line in message.splitlines() if line.strip() and not _TF_NOISE.match(line)]
    return _OP_SUFFIX.sub("", "\n".join(lines)) or message


_OP_ERRORS: dict[type, type[errors.ServingError]] = {
    tf.errors.InvalidArgumentError: errors.InvalidArgument,
    tf.errors.NotFoundError: errors.NotFound,
    tf.errors.FailedPreconditionError: errors.FailedPrecondition,
    tf.errors.DeadlineExceededError: errors.DeadlineExceeded,
    tf.errors.ResourceExhaustedError: errors.ResourceExhausted,
    tf.errors.UnavailableError: errors.Unavailable,
    tf.errors.OutOfRangeError: errors.InvalidArgument,
    tf.errors.UnknownError: errors.Unknown,
}
