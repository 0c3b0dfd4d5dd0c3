"""Warm-up: replay `assets.extra/tf_serving_warmup_requests` against a freshly loaded version before it is served.

The file is TF Serving's: a TFRecord of `PredictionLog`s. Replaying them makes TensorFlow build and cache what the
first real requests would otherwise wait for. Like TF Serving, at most 1000 records are read, and a record that
fails fails the load (a warm-up file that does not match its model is a broken model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from backend import inference
from backend.errors import InvalidArgument
from backend.examples import serialized_examples_from_proto
from backend.servable import Servable

log = logging.getLogger(__name__)

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000


def run_warmup(servable: Servable, version_path: Path) -> int:
    """Replay the version's warm-up records, if it has any; return how many ran."""
    path = version_path / WARMUP_FILE
    if not path.exists():
        return 0
    count = 0
    for record in tf.data.TFRecordDataset(str(path)).take(MAX_WARMUP_RECORDS + 1):
        count += 1
        if count > MAX_WARMUP_RECORDS:
            raise InvalidArgument(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
        entry = prediction_log_pb2.PredictionLog()
        entry.ParseFromString(record.numpy())
        _replay(servable, entry)
    log.info("warm-up of %s version %d: %d records replayed", servable.name, servable.version, count)
    return count


def _replay(servable: Servable, entry: prediction_log_pb2.PredictionLog) -> None:
    kind = entry.WhichOneof("log_type")
    if kind == "predict_log":
        request = entry.predict_log.request
        inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
        inference.predict(servable, request.model_spec.signature_name, inputs, list(request.output_filter))
    elif kind == "classify_log":
        request = entry.classify_log.request
        inference.classify(servable, request.model_spec.signature_name, serialized_examples_from_proto(request.input))
    elif kind == "regress_log":
        request = entry.regress_log.request
        inference.regress(servable, request.model_spec.signature_name, serialized_examples_from_proto(request.input))
    else:
        raise InvalidArgument(f"Unsupported log_type for warmup: {kind}")
